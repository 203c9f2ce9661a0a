#!/usr/bin/env bash
# Download what the GPU machine's image lacks (it has torch+CUDA, transformers, peft, accelerate, tokenizers,
# safetensors, sentencepiece, pyarrow, pandas, tensorboard, but not deepspeed or datasets) for its Python 3.12
# on x86-64, at the versions this repository's .venv runs, into a git-ignored folder that a GPU run carries.
#   bash benchmarks/gpu/prepare_wheelhouse.sh [OUT_DIR]      (default benchmarks/gpu/wheelhouse; ~20 MB)
# benchmarks/gpu/gpu_check.py installs it with pip --no-index --no-deps into a scratch folder on the machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-$root/benchmarks/gpu/wheelhouse}"
python="${PYTHON:-$root/.venv/bin/python}"
# deepspeed's runtime needs, datasets and its own, and transformers at the pinned version (the image's is older)
# with the one dependency whose floor is newer than the image's.
packages=(hjson pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess transformers regex)
pinned=()
for name in "${packages[@]}"; do
    version="$("$python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")"
    pinned+=("$name==$version")
done
deepspeed="deepspeed==$("$python" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
rm -rf "$out"
mkdir -p "$out"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$out" "${pinned[@]}"
# deepspeed is published as a source distribution only; the GPU script builds it without ops (DS_BUILD_OPS=0)
"$python" -m pip download --quiet --no-deps --no-binary=:all: --no-build-isolation -d "$out" "$deepspeed"
ls -1 "$out"
du -sh "$out"
