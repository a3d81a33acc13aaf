#!/usr/bin/env bash
# The runtime's CUDA paths, measured in one go on a machine with an NVIDIA GPU and no network.
#
# Needs: python3 with torch (CUDA), numpy, tokenizers, jinja2, aiohttp, prometheus-client, pyyaml,
# tqdm, matplotlib and nvidia-ml-py; wheels of vnpu and gguf in .whl/ (hack/gpu-prepare.sh makes
# them, with .gpu/tiny.gguf, whose tokenizer the synthetic models take). The real SmolLM2 weights
# (98 MB) stay behind: the models are random weights in SmolLM2-135M's shape and in a 1B shape.
# Writes every log and result under $OUT (default ./gpu-out). Each step runs under its own timeout
# and a failed step does not stop the next. DEVICE, BIG and SMALL (presets of `vnpu bench
# synthetic-model`) let the same steps run as a dry run on a CPU: DEVICE=cpu BIG=tiny SMALL=tiny.
set -uo pipefail
DEVICE=${DEVICE:-cuda} BIG=${BIG:-1b} SMALL=${SMALL:-smollm2-135m}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT" /tmp/vnpu-gpu
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
[ -f .gpu/commit ] && export VNPU_BENCH_COMMIT=$(cat .gpu/commit)  # no .git travels with the tree
step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - start)) s"
}
step install 120 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
if [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv | tee "$OUT/gpu.csv"
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
fi
for preset in $(printf '%s\n' "$SMALL" "$BIG" | sort -u); do
  step "model-$preset" 120 python3 -m vnpu bench synthetic-model --like .gpu/tiny.gguf \
    --out "/tmp/vnpu-gpu/$preset.gguf" --preset "$preset"
done
step "runtime-$BIG" "${RUNTIME_LIMIT:-240}" python3 -m vnpu bench runtime --device "$DEVICE" \
  --model "/tmp/vnpu-gpu/$BIG.gguf" --replicas "${REPLICAS:-1,8}" --tokens "${TOKENS:-1024}" --reps "${REPS:-3}" \
  --out-dir "$OUT/runtime"
# Shared weights under async offload: the holder keeps the resident units in a device arena its
# replicas map (per replica: ring, KV cache and CUDA context, not the resident units again).
step "offload-memory-$BIG" "${RUNTIME_LIMIT:-240}" python3 -m vnpu bench runtime --device "$DEVICE" \
  --model "/tmp/vnpu-gpu/$BIG.gguf" --sections memory --replicas "${OFFLOAD_REPLICAS:-1,4}" \
  --memory-offload-mib "${OFFLOAD_MIB:-1536}" --out-dir "$OUT/offload-memory"
step "serving-$SMALL" "${SERVING_LIMIT:-200}" python3 -m vnpu bench serving --device "$DEVICE" \
  --model "/tmp/vnpu-gpu/$SMALL.gguf" --out-dir "$OUT/serving"
for f in "$OUT"/runtime/runtime.md "$OUT"/offload-memory/runtime.md "$OUT"/serving/serving.md; do [ -f "$f" ] && cat "$f"; done
for f in "$OUT"/*.log; do echo "--- $f"; tail -n 15 "$f"; done
