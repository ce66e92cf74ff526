//go:build tools

// Package tools pins the control-plane commands that build.sh compiles, so that `go mod tidy`
// keeps their whole dependency graph in go.mod and go.sum.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
