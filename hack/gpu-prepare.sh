#!/usr/bin/env bash
# What hack/gpu-check.sh needs beside the repository, made here (where the registries are): wheels of
# vnpu (this work tree) and gguf in .whl/, and .gpu/tiny.gguf, a 8 MB synthetic model that carries
# SmolLM2's tokenizer. Both folders are git-ignored through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-$(bash hack/setup-env.sh)}
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >>.git/info/exclude
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >>.git/info/exclude
rm -rf .whl && mkdir -p .whl .gpu
"$VENV/bin/pip" wheel -q --no-deps --no-build-isolation -w .whl .
"$VENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
like=$("$VENV/bin/python" -c 'from vnpu.bench.weights import smollm2_dir; print(next(smollm2_dir().glob("*.gguf")))')
"$VENV/bin/python" -m vnpu bench synthetic-model --like "$like" --out .gpu/tiny.gguf --preset tiny
commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit+=-dirty
echo "$commit" >.gpu/commit
du -sh .whl .gpu
