#!/usr/bin/env bash
# Regenerate go.mod/go.sum of the device-plugin harness for a Kubernetes version (default 1.34.4).
#
# The harness requires k8s.io/kubernetes, whose go.mod requires every staging module at v0.0.0 and
# maps them with local replaces that only apply in k/k itself (kubernetes/kubernetes#79384). So, like
# vnpu/cluster/build-binaries.sh, replace each staging module with its published v0.X.Y twin — the
# list is derived from the real go.mod, never hard-coded.
set -euo pipefail
K8S_VERSION=${K8S_VERSION:-1.34.4}
STAGING="v0.${K8S_VERSION#1.}"
cd "$(dirname "$0")"
export GOFLAGS=-mod=mod
gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
{
  printf 'module local.invalid/vnpu-dpharness\n\ngo 1.24.0\n\ngodebug default=go1.24\n\n'
  printf 'require k8s.io/kubernetes v%s\n\n' "$K8S_VERSION"
  grep -E '^[[:space:]]+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$gomod" | awk -v v="$STAGING" '{print "replace "$1" => "$1" "v}'
} > go.mod
rm -f go.sum
go mod tidy
echo "go.mod/go.sum regenerated for k8s v$K8S_VERSION" >&2
