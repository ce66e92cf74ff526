#!/usr/bin/env bash
# Installs the Kubeflow training operator's manager (cmd/training-operator.v1 of
# github.com/kubeflow/training-operator, Apache-2.0), built from the Go module proxy, into the
# tests' tool cache once per version. Safe to run concurrently and to interrupt: the binary is
# built into a temporary directory that is renamed into place when complete.
# Prints the path of the binary (named `training-operator`) as its last line of stdout.
#
# Running it outside a cluster against the kube-apiserver of $KUBECONFIG (or --kubeconfig=...), as
# read in the v1.9.3 module source (M = github.com/kubeflow/training-operator@v1.9.3, R =
# github.com/open-policy-agent/cert-controller@v0.12.0/pkg/rotator/rotator.go, C =
# sigs.k8s.io/controller-runtime@v0.19.1) and checked against the tests' control plane:
# - Flags: --enable-scheme=pytorchjob (M/cmd/training-operator.v1/main.go:94; without it every
#   kind's controller starts, main.go:206-208, and those whose CRD is missing fail);
#   --metrics-bind-address (default :8080, main.go:88; "0" disables it, C/pkg/metrics/server/
#   server.go:120), --health-probe-bind-address (default :8081, main.go:89) and
#   --webhook-server-port (default 9443, main.go:116; it listens on every interface,
#   main.go:146-148): free ports, e.g. 127.0.0.1:PORT for the first two. Leader election is off by
#   default (--leader-elect, main.go:90). /readyz on the probe address answers 200 once the
#   certificates are ready and the webhook server serves (main.go:247-253): the moment its
#   controllers run.
# - There is no flag to turn off cert rotation or the webhook server: main.go:166 always starts
#   the rotator, and the controllers wait for it (main.go:185-187) before they and the webhook
#   server start (main.go:216-228).
# - Namespace `kubeflow` (M/pkg/cert/cert.go:32, or the env MY_POD_NAMESPACE, cert.go:72-77)
#   holding an existing Secret `training-operator-webhook-cert` (--webhook-secret-name,
#   main.go:118). An empty Secret is enough: the rotator fills it with a CA and a serving cert for
#   DNS name <--webhook-service-name, default training-operator>.<namespace>.svc (cert.go:49). It
#   only reads and updates it (R:324, R:484): without it the operator exits 1 within a second
#   ("acquiring secret to update certificates: Secret ... not found", R:286).
# - The files /tmp/k8s-webhook-server/serving-certs/tls.crt and tls.key (a matching key pair; the
#   kubelet mounts the Secret there in a cluster). The rotator never writes them: it waits for
#   tls.crt to exist (the directory is a constant, cert.go:29; R:854-875, polling after 1, 2, 4 ...
#   s, giving up and exiting after 8-17 minutes), and the webhook server then loads both from
#   $TMPDIR/k8s-webhook-server/serving-certs (C/pkg/webhook/server.go:143-144, 202-207), so leave
#   TMPDIR unset (or /tmp). If their certificate is not one the apiserver is to trust, any pair
#   will do (e.g. a throwaway self-signed one written before the start: ready in about 1 s;
#   written later, the rotator's next poll finds it). The path is per machine: operators running
#   at once share it (write the same pair for all, or give each a mount namespace).
# - The ValidatingWebhookConfiguration `validator.training-operator.kubeflow.org` (main.go:57) is
#   optional: when it is missing the rotator logs "Webhook not found" (R:822) and counts the CA as
#   injected anyway (R:796), and no admission call happens. To have the apiserver call the
#   validating webhook (it rejects e.g. a PyTorchJob without a container named pytorch), create
#   it with clientConfig.url https://127.0.0.1:<webhook port>/validate-kubeflow-org-v1-pytorchjob
#   (no Service needed), and pre-fill the Secret with ca.crt, ca.key (RSA, PKCS#1, i.e. `openssl
#   genrsa -traditional`; R:526), tls.crt and tls.key that the rotator accepts so it keeps them:
#   the CA valid more than 90 days ahead with SAN DNS:training-operator-ca, the serving cert
#   signed by it with SANs DNS:training-operator.kubeflow.svc and IP:127.0.0.1, extendedKeyUsage
#   serverAuth, valid more than 90 days ahead (R:46, R:318-360, R:625-680); write the same tls.crt
#   and tls.key as the files above. The rotator puts ca.crt into the configuration's caBundle. (In a
#   cluster, a Service `training-operator` in that namespace, port 443 -> 9443, routes the calls
#   instead.)
# - RBAC: an admin kubeconfig works; otherwise the ClusterRole of M/manifests/base/rbac/role.yaml.
# - On a real node, each worker pod of a PyTorchJob with a Master gets an init container
#   `alpine:3.10` (imagePullPolicy IfNotPresent) running `sh -c '... nslookup <job>-master-0 ...'`
#   (M/pkg/controller.v1/pytorch/initcontainer.go:35-46, 116-133): point
#   --pytorch-init-container-image at a local image with sh, seq and nslookup, or replace the
#   whole container with --pytorch-init-container-template-file (a YAML list of containers, Go
#   template fields .MasterAddr .InitContainerImage .MaxTries; initcontainer.go:97-103).
# - On SIGTERM it stops, then panics ("close of closed channel", main.go:160 closes a channel the
#   rotator closed): exit status 2 after a clean stop is normal.
set -euo pipefail

TRAINING_OPERATOR=v1.9.3

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
CACHE=${CHATFLOW_CACHE_DIR:-$HOME/.cache/chatflow}/tools
DIR=$CACHE/training-operator-$TRAINING_OPERATOR

if [ ! -x "$DIR/training-operator" ]; then
    echo "building training-operator $TRAINING_OPERATOR into $DIR (minutes the first time)" >&2
    mkdir -p "$CACHE"
    TMP=$(mktemp -d "$CACHE/.training-operator.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    chmod 755 "$TMP"
    # The module has no replace directives, so `go install pkg@version` builds it as released.
    CGO_ENABLED=0 GOBIN=$TMP nice -n 10 "$GO" install -trimpath -ldflags "-s -w" \
        "github.com/kubeflow/training-operator/cmd/training-operator.v1@$TRAINING_OPERATOR"
    mv "$TMP/training-operator.v1" "$TMP/training-operator"
    # A concurrent build may have won the race; its result is as good as ours.
    mv -T "$TMP" "$DIR" 2>/dev/null || test -x "$DIR/training-operator"
fi
echo "$DIR/training-operator"
