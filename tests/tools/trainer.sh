#!/usr/bin/env bash
# Installs the Kubeflow Trainer v2 controller manager (cmd/trainer-controller-manager of
# github.com/kubeflow/trainer/v2, Apache-2.0: LICENSE of the module), built from the Go module
# proxy, into the tests' tool cache once per version. Safe to run concurrently and to interrupt:
# the binary is built into a temporary directory that is renamed into place when complete.
# Prints the path of the binary (named `trainer-controller-manager`) as its last line of stdout.
#   trainer.sh --crds        prints instead the CRD files, one a line (absolute paths)
#   trainer.sh --module-dir  prints instead the module's directory in the Go module cache
# Both download the module source if needed (`go mod download`) and build nothing.
# Measured on 2 cores: 7 minutes with its dependency versions not yet in Go's caches (downloads
# included), 10 ms once cached.
#
# CRDs (plain YAML, 0.55-0.93 MB each: too large for a client-side apply's annotation, apply them
# server-side), in the module: manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml,
# manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml and
# manifests/base/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml (the copies under
# charts/kubeflow-trainer/templates/crd/ are Helm templates). The TrainJob controller watches
# JobSets (pkg/runtime/framework/plugins/jobset/jobset.go:253-270): install the JobSet CRD
# (tests/tools/jobset.sh --crds) before starting this manager. Upstream runtimes:
# manifests/base/runtimes/ (torch_distributed.yaml: one replicatedJob `node`, container `node`;
# no dataset-initializer, see runtimes/torchtune/ and runtimes/data-cache/ for ones with it).
#
# Running it outside a cluster against the kube-apiserver of $KUBECONFIG (or --kubeconfig=...), as
# read in the v2.3.0 module source (T = github.com/kubeflow/trainer/v2@v2.3.0, R =
# github.com/open-policy-agent/cert-controller@v0.16.0/pkg/rotator/rotator.go, C =
# sigs.k8s.io/controller-runtime@v0.24.1) and checked against the tests' control plane:
# - Flags: only --config (T/cmd/trainer-controller-manager/main.go:74), --feature-gates
#   (main.go:78, overrides the config's featureGates, main.go:99-110), --kubeconfig (C's
#   pkg/client/config/config.go:43-44; else $KUBECONFIG, main.go:112) and the --zap-* log flags
#   (main.go:82-86). Ports, leader election and cert management come only from a Configuration
#   file (main.go:92; T/pkg/config/config.go:52-98), so pass one: the defaults (T/pkg/apis/config/
#   v1alpha1/defaults.go:24-75) are metrics :8443 HTTPS (no authn filter, self-signed cert),
#   health :8081, webhook 9443 on every interface, status server 10443 on every interface, and
#   they collide with the JobSet manager's. Leader election is off unless the file has a
#   leaderElection section (config.go:78-88). E.g.
#     apiVersion: config.trainer.kubeflow.org/v1alpha1
#     kind: Configuration
#     webhook: {port: PORT, host: 127.0.0.1}
#     metrics: {bindAddress: "0"}            # or 127.0.0.1:PORT (HTTPS)
#     health: {healthProbeBindAddress: 127.0.0.1:PORT}
#     certManagement: {enable: false}        # see below
#     statusServer: {port: PORT}             # used only with the TrainJobStatus gate
#     featureGates: {TrainJobStatus: true}   # optional, see below
#   Unknown fields are errors (strict decoding, config.go:42).
# - /readyz on the probe address answers 200 once the certificates are ready and the webhook
#   server serves (main.go:179-204); the controllers start at the same moment (main.go:157-170).
#   /healthz is a plain ping.
# - Webhook server certificates: C's default cert dir, $TMPDIR/k8s-webhook-server/serving-certs
#   (C/pkg/webhook/server.go:143-144; the Configuration has no certDir), files tls.crt and
#   tls.key; when they are missing the manager exits 1 as the webhook server starts, within
#   2 s ("open .../tls.crt: no such file or directory").
#   With certManagement.enable: false (simplest out of cluster) nothing else is needed: no
#   namespace, no Secret, no waiting (main.go:134-137); point TMPDIR at a directory holding
#   k8s-webhook-server/serving-certs/tls.{crt,key} (any pair; ready in about 1-2 s).
#   With cert management on (the default, main.go:123-133; T/pkg/util/cert/cert.go:66-96): the
#   namespace is kubeflow-system (only /var/run/secrets/kubernetes.io/serviceaccount/namespace
#   overrides it, cert.go:37,45-52; there is no env variable), and the Secret
#   <certManagement.webhookSecretName, default kubeflow-trainer-webhook-cert> must exist there:
#   without it the manager exits 1 within 2 s ("acquiring secret to update certificates",
#   R:330-331, R:292-295). An empty Secret is enough: the rotator fills in ca.crt, ca.key,
#   tls.crt, tls.key for DNS name <webhookServiceName, default
#   kubeflow-trainer-controller-manager>.kubeflow-system.svc (cert.go:70). It never writes files:
#   it waits for tls.crt in the constant /tmp/k8s-webhook-server/serving-certs (cert.go:43;
#   R:877-898, polls after about 1, 3, 7 ... s, exits after 17-34 minutes), shared by every
#   process on the machine, and the webhook server then reads $TMPDIR/... (same dir if TMPDIR is
#   unset). Files present at start: ready in about 2 s. The webhook configurations
#   validator.trainer.kubeflow.org and defaulter.trainer.kubeflow.org (main.go:52-53) are
#   optional: when missing the rotator logs "Webhook not found" and counts the CA as injected
#   (R:844-846, R:819). To keep a pre-filled Secret (so the apiserver can trust the served cert):
#   ca.key RSA PKCS#1 (`openssl genrsa -traditional`, R:533), CA cert with SAN
#   DNS:kubeflow-trainer-ca, serving cert for DNS:kubeflow-trainer-controller-manager.
#   kubeflow-system.svc and IP:127.0.0.1 with serverAuth, both valid > 90 days (R:46, R:632-646);
#   the rotator then injects ca.crt into the two configurations' caBundle (checked).
# - Webhooks are optional for this manager: without configurations TrainJobs still reconcile
#   (no validation; runtimePatches[].time unset). To have the apiserver call them, create the
#   configurations with clientConfig.url https://127.0.0.1:<webhook port><path> and a caBundle
#   that signs the served cert; paths in T/manifests/base/webhook/manifests.yaml
#   (/mutate-trainer-kubeflow-org-v1alpha1-trainjob, /validate-trainer-kubeflow-org-v1alpha1-
#   {trainjob,trainingruntime,clustertrainingruntime}).
# - Feature gate TrainJobStatus (alpha, default off, T/pkg/features/features.go:38,48;
#   --feature-gates=TrainJobStatus=true or featureGates in the file). It adds
#   (T/pkg/runtime/framework/plugins/trainjobstatus/trainjobstatus.go, registered only with the
#   gate, plugins/registry.go:54-56) to every container of the trainer step: env
#   KUBEFLOW_TRAINER_SERVER_URL = https://<webhookServiceName>.<namespace>.svc:<statusServer.port>
#   /apis/trainer.kubeflow.org/v1alpha1/namespaces/<ns>/trainjobs/<name>/status (:121-123; note:
#   not KUBEFLOW_TRAINER_STATUS_SERVER_URL), KUBEFLOW_TRAINER_SERVER_CA_CERT =
#   /var/run/secrets/kubeflow/trainer/ca.crt and KUBEFLOW_TRAINER_SERVER_TOKEN =
#   /var/run/secrets/kubeflow/trainer/token (:43-51, :125-135), a read-only volume
#   kubeflow-trainer-token there: projected ServiceAccount token (audience
#   trainer.kubeflow.org/v1alpha1/namespaces/<ns>/trainjobs/<name>/status, 3600 s) plus key
#   ca.crt of ConfigMap <trainjob>-tls-config (:138-172), which it creates from ca.crt of the
#   webhook Secret in its namespace (:175-210; as read, not run: without that Secret or its
#   ca.crt no JobSet is created, even with cert management off). A pod whose spec has no
#   serviceAccountName is rejected ("serviceAccountToken: Forbidden: must not be specified when
#   serviceAccountName is not set") when the apiserver runs without the ServiceAccount admission
#   plugin, as the tests' control plane does: set serviceAccountName in the runtime's pod
#   template there.
#   The status server (T/pkg/statusserver) listens on :<statusServer.port>, every interface
#   (server.go:98), TLS with tls.crt/tls.key of the constant /tmp/k8s-webhook-server/
#   serving-certs (util/cert/cert.go:101-116), and takes POST <path above> with body
#   {"trainerStatus": {progressPercentage, estimatedRemainingSeconds, metrics: [{name, value}],
#   lastUpdatedTime}} (server.go:87, :148-215; server-side apply, field manager trainer-status),
#   authorized by a bearer token with that audience whose kubernetes.io.namespace claim is the
#   TrainJob's (auth.go:84-114; 403 otherwise). At start it reads the issuer from
#   /var/run/secrets/kubernetes.io/serviceaccount/token and fetches <issuer>/.well-known/
#   openid-configuration with the manager's credentials (auth.go:60-82, 132-158): out of a
#   cluster the manager exits 1 when that file is missing, or when the issuer is
#   https://kubernetes.default.svc (the tests' control plane: unresolvable here). What worked:
#   an apiserver whose first --service-account-issuer is its own URL (https://127.0.0.1:PORT),
#   and the manager run as root in a private mount namespace holding a token it issued:
#     unshare -m --propagation private -- sh -c 'set -e; mount -t tmpfs tmpfs /run
#       mkdir -p /run/secrets/kubernetes.io/serviceaccount
#       cp DIR/token DIR/namespace /run/secrets/kubernetes.io/serviceaccount/
#       mount --bind CERTDIR /tmp/k8s-webhook-server/serving-certs; exec "$@"' sh MANAGER ...
#   (/var/run is /run here; the bind target must exist on the host; DIR/namespace holds
#   kubeflow-system). Then readiness in about 1 s, and a POST with a token from
#   `kubectl create token default -n NS --audience=...` updated status.trainerStatus.
# - RBAC: an admin kubeconfig works; otherwise the ClusterRole of T/manifests/base/rbac/role.yaml.
# - On SIGTERM it stops within a second, exit 0. With the TrainJobStatus gate it waits for the
#   full 30 s grace period (C/pkg/manager/internal.go:57) and exits 1 ("failed waiting for all
#   runnables to end within grace period"): the status server's Start never returns
#   (T/pkg/statusserver/server.go:121-137 waits on a channel nobody closes). Send SIGKILL after
#   a short wait instead.
set -euo pipefail

TRAINER=v2.3.0
MODULE=github.com/kubeflow/trainer/v2

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
CACHE=${CHATFLOW_CACHE_DIR:-$HOME/.cache/chatflow}/tools
DIR=$CACHE/trainer-$TRAINER

module_dir() {
    # Outside any module, so that a go.mod in the caller's directory plays no part.
    (cd / && "$GO" mod download -json "$MODULE@$TRAINER") |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

case "${1:-}" in
    --module-dir)
        module_dir
        exit
        ;;
    --crds)
        SRC=$(module_dir)
        for crd in trainjobs trainingruntimes clustertrainingruntimes; do
            test -f "$SRC/manifests/base/crds/trainer.kubeflow.org_$crd.yaml"
            echo "$SRC/manifests/base/crds/trainer.kubeflow.org_$crd.yaml"
        done
        exit
        ;;
    "") ;;
    *)
        echo "usage: $0 [--crds | --module-dir]" >&2
        exit 2
        ;;
esac

if [ ! -x "$DIR/trainer-controller-manager" ]; then
    echo "building trainer-controller-manager $TRAINER into $DIR (minutes the first time)" >&2
    mkdir -p "$CACHE"
    TMP=$(mktemp -d "$CACHE/.trainer.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    chmod 755 "$TMP"
    # The module has no replace directives, so `go install pkg@version` builds it as released.
    CGO_ENABLED=0 GOBIN=$TMP nice -n 10 "$GO" install -trimpath -ldflags "-s -w" \
        "$MODULE/cmd/trainer-controller-manager@$TRAINER"
    # A concurrent build may have won the race; its result is as good as ours.
    mv -T "$TMP" "$DIR" 2>/dev/null || test -x "$DIR/trainer-controller-manager"
fi
echo "$DIR/trainer-controller-manager"
