"""A local Kubernetes control plane made of the real components, for tests and ``vnpu up``.

- :mod:`vnpu.cluster.binaries`: build (or reuse) etcd, kube-apiserver, … from the Go module proxy.
- :mod:`vnpu.cluster.pki`: a throw-away CA, serving and client certificates.
- :mod:`vnpu.cluster.controlplane`: start/stop etcd, kube-apiserver, scheduler, controller-manager, kwok.
- :mod:`vnpu.cluster.kwok`: fake NPU nodes advertising ``vnpu.io/memory``.
"""
