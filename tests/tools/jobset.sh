#!/usr/bin/env bash
# Installs the JobSet controller manager (the main package at the root of sigs.k8s.io/jobset,
# Apache-2.0: LICENSE of the module), at the version Kubeflow Trainer v2.3.0's go.mod requires,
# built from the Go module proxy, into the tests' tool cache once per version. Safe to run
# concurrently and to interrupt: the binary is built into a temporary directory that is renamed
# into place when complete.
# Prints the path of the binary (named `jobset-controller-manager`) as its last line of stdout.
#   jobset.sh --crds        prints instead the CRD file (absolute path)
#   jobset.sh --module-dir  prints instead the module's directory in the Go module cache
# Both download the module source if needed (`go mod download`) and build nothing.
# Measured on 2 cores: 8 minutes with its dependency versions not yet in Go's caches (downloads
# included), 10 ms once cached.
#
# CRD (plain YAML, 820 kB: apply it server-side), in the module:
# config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml (identical copy:
# charts/jobset/crds/jobset.x-k8s.io_jobsets.yaml). Webhook paths:
# config/components/webhook/manifests.yaml (+ patches/: the pod webhooks select pods with the
# label jobset.sigs.k8s.io/jobset-name).
#
# Running it outside a cluster against the kube-apiserver of $KUBECONFIG (or --kubeconfig=...), as
# read in the v0.12.0 module source (J = sigs.k8s.io/jobset@v0.12.0, R =
# github.com/open-policy-agent/cert-controller@v0.16.0/pkg/rotator/rotator.go, C =
# sigs.k8s.io/controller-runtime@v0.24.0) and checked against the tests' control plane:
# - Flags (J/main.go:77-87): --metrics-bind-address (default :8443; HTTPS with authentication and
#   authorization of the caller, main.go:179-188: unauthenticated scrapes get 401; "0" disables
#   it), --health-probe-bind-address (default :8081), --leader-elect, --kube-api-qps/-burst,
#   --config (a Configuration file), --kubeconfig (C) and --zap-*. A flag given wins over the
#   file (main.go:125-151).
# - Leader election is ON by default despite the flag's default false: without --leader-elect
#   on the command line the Configuration's value applies, defaulted to true
#   (J/api/config/v1alpha1/defaults.go:55-65), and out of a cluster the manager then exits 1 at
#   once ("unable to find leader election namespace: not running in-cluster"). Pass
#   --leader-elect=false (or leaderElection: {leaderElect: false} in the file).
# - The webhook server's port (default 9443, every interface) is settable only in the file
#   (J/pkg/config/config.go:65-88), e.g.
#     apiVersion: config.jobset.x-k8s.io/v1alpha1
#     kind: Configuration
#     webhook: {port: PORT, host: 127.0.0.1, certDir: DIR}   # certDir: only with cert mgmt off
#     health: {healthProbeBindAddress: 127.0.0.1:PORT}
#     leaderElection: {leaderElect: false}
#     internalCertManagement: {enable: false}                # see below
#   and --metrics-bind-address=0 or 127.0.0.1:PORT.
# - /readyz on the probe address answers 200 once the certificates are ready and the webhook
#   server serves (main.go:258-284); the controllers start at the same moment (main.go:229-256).
# - Certificates. With internalCertManagement.enable: false (main.go:195-203) nothing else is
#   needed (no namespace, no Secret): the webhook server reads tls.crt and tls.key from
#   webhook.certDir (default $TMPDIR/k8s-webhook-server/serving-certs, C/pkg/webhook/server.go:
#   143-144; missing: exit 1 within a second, "open .../tls.crt: no such file"). The metrics
#   server uses the pair in metrics.certDir (default /tmp/k8s-metrics-server/serving-certs,
#   J/pkg/config/config.go:43-51) if there, else a self-signed one (C/pkg/metrics/server/
#   server.go:286-325). Ready in 0.3-0.7 s.
#   With it on (the default; J/pkg/util/cert/cert.go:50-76): namespace jobset-system (only
#   /var/run/secrets/kubernetes.io/serviceaccount/namespace overrides it, cert.go:29,37-44), and
#   the Secret <internalCertManagement.webhookSecretName, default jobset-webhook-server-cert>
#   must exist there, else exit 1 within a second (R:330-331). An empty Secret is enough: the
#   rotator fills in ca.crt, ca.key, tls.crt, tls.key for DNS name jobset-webhook-service.
#   jobset-system.svc (cert.go:55). It never writes files: it waits for tls.crt in the constant
#   /tmp/k8s-webhook-server/serving-certs (cert.go:30, R:877-898: polls after about 1, 3, 7 ... s,
#   exits after 17-34 minutes), shared by every process on the machine (a private mount
#   namespace with a bind mount avoids that), and the webhook server reads its certDir. The
#   webhook configurations jobset-validating-webhook-configuration and
#   jobset-mutating-webhook-configuration (cert.go:31-32) are optional for the rotator ("Webhook
#   not found" is counted as injected, R:844-846). To keep a pre-filled Secret: ca.key RSA PKCS#1
#   (`openssl genrsa -traditional`, R:533), CA cert with SAN DNS:jobset-ca, serving cert for
#   DNS:jobset-webhook-service.jobset-system.svc and IP:127.0.0.1 with serverAuth, both valid
#   > 90 days (R:46, R:632-646); the rotator then injects ca.crt into both configurations'
#   caBundle (checked: ready in about 2 s).
# - The mutating JobSet webhook is NOT optional for Trainer's JobSets: they carry no network,
#   successPolicy or startupPolicy, which only the webhook defaults (J/pkg/webhooks/
#   jobset_webhook.go:111-161), and the reconciler panics on the nil network (J/pkg/controllers/
#   jobset_controller.go:1155, "Observed a panic ... dnsHostnamesEnabled"): no Jobs are created.
#   Create the four webhooks of config/components/webhook/ (mjobset, mpod, vjobset, vpod) with
#   clientConfig.url https://127.0.0.1:<webhook port>/mutate-jobset-x-k8s-io-v1alpha2-jobset,
#   /mutate--v1-pod, /validate-jobset-x-k8s-io-v1alpha2-jobset, /validate--v1-pod (the pod ones
#   with objectSelector jobset.sigs.k8s.io/jobset-name Exists) and a caBundle that signs the
#   served cert (its SANs must cover 127.0.0.1); start this manager before anything creates
#   JobSets (failurePolicy Fail).
# - RBAC: an admin kubeconfig works; otherwise the ClusterRole of
#   J/config/components/rbac/role.yaml.
# - On SIGTERM it stops within about 1 s, exit 0.
set -euo pipefail
JOBSET=v0.12.0
MODULE=sigs.k8s.io/jobset

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
CACHE=${CHATFLOW_CACHE_DIR:-$HOME/.cache/chatflow}/tools
DIR=$CACHE/jobset-$JOBSET

module_dir() {
    # Outside any module, so that a go.mod in the caller's directory plays no part.
    (cd / && "$GO" mod download -json "$MODULE@$JOBSET") |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

case "${1:-}" in
    --module-dir)
        module_dir
        exit
        ;;
    --crds)
        CRD=$(module_dir)/config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml
        test -f "$CRD"
        echo "$CRD"
        exit
        ;;
    "") ;;
    *)
        echo "usage: $0 [--crds | --module-dir]" >&2
        exit 2
        ;;
esac

if [ ! -x "$DIR/jobset-controller-manager" ]; then
    echo "building jobset-controller-manager $JOBSET into $DIR (minutes the first time)" >&2
    mkdir -p "$CACHE"
    TMP=$(mktemp -d "$CACHE/.jobset.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    chmod 755 "$TMP"
    # The module has no replace directives, but `go install sigs.k8s.io/jobset@$JOBSET` fails:
    # it looks the module's deprecation up in its version list (GOPROXY/.../@v/list), which the
    # module proxy answered with 403 here ("This module version is not available"). So build the
    # released module as its own main module instead: a writable copy of its source (`go mod
    # download` fetches it into the module cache), its own go.mod and go.sum, -mod=readonly: the
    # same dependency versions `go install` picks.
    SRC=$(module_dir)
    test -f "$SRC/go.mod"
    cp -r "$SRC" "$TMP/src"
    chmod -R u+w "$TMP/src"
    (cd "$TMP/src" && CGO_ENABLED=0 nice -n 10 "$GO" build -mod=readonly -trimpath \
        -ldflags "-s -w" -o "$TMP/jobset-controller-manager" .)
    rm -rf "$TMP/src"
    # A concurrent build may have won the race; its result is as good as ours.
    mv -T "$TMP" "$DIR" 2>/dev/null || test -x "$DIR/jobset-controller-manager"
fi
echo "$DIR/jobset-controller-manager"
