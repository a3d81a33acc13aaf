#!/usr/bin/env bash
# Build the real Kubernetes components vnpu's tests and `vnpu up` run against, from the Go module proxy,
# and cache them by version outside the work tree. Re-running with a warm cache is a no-op.
#
#   hack/build-binaries.sh            # build what is missing, print the bin directory last
#   VNPU_CACHE_DIR=/x hack/build-binaries.sh
#
# Why a wrapper module: k8s.io/kubernetes requires its staging modules at v0.0.0 and maps them with
# local replaces, which only apply in the main module (kubernetes/kubernetes#79384). The wrapper
# requires k8s.io/kubernetes and replaces every staging module with its published v0.X.Y twin.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.34.4}
ETCD_VERSION=${ETCD_VERSION:-3.6.16}
KWOK_VERSION=${KWOK_VERSION:-0.8.0}
HELM_VERSION=${HELM_VERSION:-3.22.0}
KUBECONFORM_VERSION=${KUBECONFORM_VERSION:-0.7.0}

CACHE=${VNPU_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vnpu}
KEY="k8s-v${K8S_VERSION}_etcd-v${ETCD_VERSION}_kwok-v${KWOK_VERSION}_helm-v${HELM_VERSION}_kubeconform-v${KUBECONFORM_VERSION}"
BIN=$CACHE/bin/$KEY
WORK=$CACHE/build
mkdir -p "$BIN" "$WORK"

WANTED=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kwok kwok-stages.yaml helm kubeconform)
missing=()
for b in "${WANTED[@]}"; do [[ -e $BIN/$b ]] || missing+=("$b"); done
if ((${#missing[@]} == 0)); then
  echo "vnpu: reusing cached binaries in $BIN" >&2
  echo "$BIN"
  exit 0
fi

# Kubernetes 1.34 (and the go.mod files below) need Go >= 1.24. A Go >= 1.21 takes that toolchain from
# the module proxy itself (GOTOOLCHAIN, like any module); an older one cannot (Debian 12's golang-go is
# 1.19), so say what to do here rather than fail deep inside a build.
GO_NEEDED_MINOR=24
go_minor=$(go version 2>/dev/null | sed -nE 's/.* go1\.([0-9]+).*/\1/p')
if [[ -z $go_minor ]]; then
  echo "vnpu: building the Kubernetes binaries needs Go >= 1.$GO_NEEDED_MINOR and there is no 'go' on PATH" \
    "(or set VNPU_BIN_DIR to prebuilt binaries)" >&2
  exit 1
elif ((go_minor < 21)); then
  echo "vnpu: building the Kubernetes binaries needs Go >= 1.$GO_NEEDED_MINOR; '$(go version)' is too old to" \
    "fetch it (Debian 12's golang-go is 1.19): put a Go >= 1.21 first on PATH (it fetches go1.$GO_NEEDED_MINOR" \
    "itself) or set VNPU_BIN_DIR to prebuilt binaries" >&2
  exit 1
elif ((go_minor < GO_NEEDED_MINOR)); then
  export GOTOOLCHAIN=${GOTOOLCHAIN:-go1.$GO_NEEDED_MINOR.0}
  echo "vnpu: $(go env GOVERSION 2>/dev/null || true) < go1.$GO_NEEDED_MINOR: using GOTOOLCHAIN=$GOTOOLCHAIN" \
    "from the module proxy" >&2
fi

need() { [[ " ${missing[*]} " == *" $1 "* ]]; }
total=0
need etcd && total=$((total + 1))
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do need "$b" && { total=$((total + 1)); break; }; done
for b in kwok kwok-stages.yaml helm kubeconform; do need "$b" && total=$((total + 1)); done
step=0; t0=$SECONDS
# A progress line per component with elapsed time, plus a heartbeat every 30 s so long Go builds
# visibly move on a slow 2-core machine.
progress() { step=$((step + 1)); printf '[%d/%d] %-24s (total %ds)\n' "$step" "$total" "$1" $((SECONDS - t0)) >&2; }
heartbeat() { local what=$1 start=$SECONDS; while sleep 30; do printf '      … still building %s (%ds)\n' "$what" $((SECONDS - start)) >&2; done; }
run_step() {  # run_step NAME CMD...
  local name=$1; shift
  progress "$name"
  heartbeat "$name" & local hb=$!
  if ! "$@" >"$WORK/$name.log" 2>&1; then
    kill "$hb" 2>/dev/null || true
    echo "vnpu: building $name failed; last lines of $WORK/$name.log:" >&2
    tail -n 30 "$WORK/$name.log" >&2
    exit 1
  fi
  kill "$hb" 2>/dev/null || true
  wait "$hb" 2>/dev/null || true
}
export GOFLAGS=${GOFLAGS:--mod=mod} CGO_ENABLED=0
MINOR=${K8S_VERSION#1.}; MINOR=${MINOR%%.*}
STAGING="v0.${K8S_VERSION#1.}"

build_k8s() {
  local dir=$WORK/k8s-$K8S_VERSION
  mkdir -p "$dir" && cd "$dir"
  if [[ ! -f go.sum ]]; then
    cat > go.mod <<EOM
module local.invalid/k8sbuild

go 1.24.0

godebug default=go1.24

require k8s.io/kubernetes v$K8S_VERSION
EOM
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
    # Every staging module k/k requires at v0.0.0 gets the published v0.X.Y: derived from the real go.mod.
    grep -E '^[[:space:]]+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$gomod" \
      | awk -v v="$STAGING" '{print "replace "$1" => "$1" "v}' >> go.mod
    cat > tools.go <<'EOM'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
EOM
    go mod tidy
  fi
  local ldf="-s -w" kv
  for kv in "gitVersion=v$K8S_VERSION" "gitMajor=1" "gitMinor=$MINOR" "gitTreeState=clean" "buildDate=2000-01-01T00:00:00Z"; do
    ldf+=" -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
  done
  local pkgs=()
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do need "$b" && pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  ((${#pkgs[@]})) && go build -trimpath -ldflags "$ldf" -o "$BIN/" "${pkgs[@]}"
  if need kubelet; then CGO_ENABLED=1 go build -trimpath -ldflags "$ldf" -o "$BIN/" k8s.io/kubernetes/cmd/kubelet; fi
}

build_etcd() {
  local dir=$WORK/etcd-$ETCD_VERSION
  mkdir -p "$dir" && cd "$dir"
  if [[ ! -f go.sum ]]; then
    printf 'module local.invalid/etcdbuild\n\ngo 1.24.0\n' > go.mod
    printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
    go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
    go mod tidy
  fi
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
}

build_go_install() {  # build_go_install BINARY MODULE@VERSION [ldflags]
  GOBIN=$BIN go install -trimpath -ldflags "-s -w ${3:-}" "$2"
}

HELM_LDF="-X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$MINOR -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$MINOR"

need etcd && run_step etcd build_etcd
k8s_missing=""
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do need "$b" && k8s_missing+="$b "; done
[[ -n $k8s_missing ]] && run_step "kubernetes" build_k8s
# kwok >= 0.7 ships no built-in behaviour: its standard "fast" node/pod stages and the node heartbeat
# come as Stage manifests inside the module; assemble them from the module cache (not the repo).
kwok_stages() {
  local dir
  dir=$(go mod download -json "sigs.k8s.io/kwok@v$KWOK_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
  local f out=$BIN/kwok-stages.yaml.tmp
  : > "$out"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    { echo "---"; cat "$dir/kustomize/stage/$f"; } >> "$out"
  done
  mv "$out" "$BIN/kwok-stages.yaml"
}
need kwok && run_step kwok build_go_install kwok "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION"
need kwok-stages.yaml && run_step kwok-stages kwok_stages
need helm && run_step helm build_go_install helm "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" "$HELM_LDF"
need kubeconform && run_step kubeconform build_go_install kubeconform "github.com/yannh/kubeconform/cmd/kubeconform@v$KUBECONFORM_VERSION"

for b in "${WANTED[@]}"; do
  [[ -e $BIN/$b ]] || { echo "vnpu: $b missing from $BIN after the build" >&2; exit 1; }
done
printf 'vnpu: built %s in %ds into %s\n' "${missing[*]}" $((SECONDS - t0)) "$BIN" >&2
echo "$BIN"
