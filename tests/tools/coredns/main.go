// Command coredns is the upstream CoreDNS server, built from its module at the version go.mod pins,
// with only the plugins a test cluster's DNS needs: cluster.local from the Kubernetes API
// (kubernetes), other names answered from hosts/template or forwarded, plus the plugins of
// Kubernetes' default Corefile (errors, health, ready, prometheus, cache, loop, reload,
// loadbalance), log, and bind to listen on one address of the host. Those plugins import four
// more, which are linked in anyway and so are enabled too: metadata, debug, dnstap and transfer.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/debug"
	_ "github.com/coredns/coredns/plugin/dnstap"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metadata"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/template"
	_ "github.com/coredns/coredns/plugin/transfer"
)

// directives are the imported plugins in the order CoreDNS's plugin.cfg runs them (the order of
// a request through them, not of the Corefile): every directive here must be imported above, and
// a Corefile can use no plugin missing here, even one `coredns -plugins` lists.
var directives = []string{
	"metadata",
	"reload",
	"bind",
	"debug",
	"ready",
	"health",
	"prometheus",
	"errors",
	"log",
	"dnstap",
	"loadbalance",
	"cache",
	"template",
	"transfer",
	"hosts",
	"kubernetes",
	"loop",
	"forward",
}

func main() {
	if err := dnsserver.SetDirectives(directives); err != nil {
		panic(err)
	}
	coremain.Run()
}
