//go:build tools

// Package tools pins the Kubernetes commands that build.sh compiles (the control plane's, and the
// node's that tests/node runs), so that `go mod tidy` keeps their whole dependency graph in go.mod
// and go.sum.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
