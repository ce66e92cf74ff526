// The node's pod sandbox ("pause") image: a process that holds the pod's namespaces and exits on
// SIGTERM or SIGINT, as Kubernetes' own pause does. Written here because no registry serves
// registry.k8s.io/pause to these machines.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
