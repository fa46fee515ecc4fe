#!/usr/bin/env bash
# Generation speed side by side: nuq_generate on SmolLM2-135M quantized by nuq (3-bit + 0.45%, with the
# embedding as copied and packed) against llama.cpp's own `llama-bench` (tg: tokens generated from an
# empty context) on the same model quantized by llama.cpp to its types of the nearest sizes, same
# machine, same minutes, 1 and 2 threads, alternating the two programs. llama.cpp is built outside the
# project from the sources vendored in the llama-cpp-python sdist on PyPI (as scripts/bench-ggml.sh does)
# and never enters the repository.
#   NUQ_BUILD_DIR   nuq build (default ./build): needs nuq and examples/nuq_generate
#   NUQ_GGML_DIR    where llama.cpp is unpacked and built (default ~/.cache/nuq/ggml)
#   NUQ_MODELS_DIR  fetched models (scripts/fetch-models.sh; default ~/.cache/nuq/models)
#   NUQ_GEN_DIR     where the quantized models go (default a temporary directory)
#   NUQ_GEN_STEPS   tokens to generate (default 128)
#   NUQ_GEN_REPEATS runs of each program per thread count (default 3; each line is one run)
#   NUQ_GEN_TYPES   llama.cpp types (default "Q3_K_S Q4_K_S Q4_0")
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${NUQ_BUILD_DIR:-$root/build}
ggml_dir=${NUQ_GGML_DIR:-$HOME/.cache/nuq/ggml}
gguf=${NUQ_MODELS_DIR:-$HOME/.cache/nuq/models}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
work=${NUQ_GEN_DIR:-$(mktemp -d)}
steps=${NUQ_GEN_STEPS:-128}
repeats=${NUQ_GEN_REPEATS:-3}
types=${NUQ_GEN_TYPES:-Q3_K_S Q4_K_S Q4_0}
[ -f "$gguf" ] || { echo "bench-generate.sh: $gguf is missing; run scripts/fetch-models.sh" >&2; exit 1; }
for tool in nuq examples/nuq_generate; do
  [ -x "$build/$tool" ] || { echo "bench-generate.sh: $build/$tool is missing; build nuq with examples" >&2; exit 1; }
done
mkdir -p "$ggml_dir" "$work"

src=$(ls -d "$ggml_dir"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -n 1 || true)
if [ -z "$src" ]; then
  (cd "$ggml_dir" && python3 -m pip download --no-deps --no-binary :all: llama-cpp-python -d . >/dev/null)
  tar -xzf "$(ls "$ggml_dir"/llama_cpp_python-*.tar.gz | head -n 1)" -C "$ggml_dir"
  src=$(ls -d "$ggml_dir"/llama_cpp_python-*/vendor/llama.cpp | head -n 1)
fi
bin=$src/build-tools/bin
if [ ! -x "$bin/llama-bench" ] || [ ! -x "$bin/llama-quantize" ]; then
  cmake -S "$src" -B "$src/build-tools" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DGGML_CUDA=OFF >/dev/null
  cmake --build "$src/build-tools" -j"$(nproc)" --target llama-bench llama-quantize
fi

# The models. llama.cpp requantizes the fetched Q4_1 file (the only SmolLM2 weights this project fetches;
# the values differ from a quantization of the original fp16 weights, the bytes per token do not).
# K-quant types need rows of a multiple of 256: SmolLM2's 576-wide rows take llama.cpp's fallback type.
for t in $types; do
  [ -f "$work/smollm2-$t.gguf" ] ||
    "$bin/llama-quantize" --allow-requantize "$gguf" "$work/smollm2-$t.gguf" "$t" >"$work/quantize-$t.log" 2>&1
done
echo '{"layers": {"token_embd": {"bits": 4}}}' >"$work/embedding-4bit.json"
[ -d "$work/nuq-3s" ] || "$build/nuq" quantize "$gguf" --out "$work/nuq-3s" --bits 3 --sparse 0.45% --quiet >/dev/null
[ -d "$work/nuq-3s-e4" ] || "$build/nuq" quantize "$gguf" --out "$work/nuq-3s-e4" --bits 3 --sparse 0.45% \
  --plan "$work/embedding-4bit.json" --quiet >/dev/null

echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores; $(date -u +%FT%TZ)"
echo "# llama.cpp $(basename "$(dirname "$(dirname "$src")")"); $steps tokens per run; one line per run"
sizes() {  # file or directory: MiB on disk
  du -sb "$1" | awk '{ printf "%.1f MiB", $1 / 1048576 }'
}
for t in $types; do echo "# llama.cpp $t: $(sizes "$work/smollm2-$t.gguf")"; done
echo "# nuq 3-bit + 0.45%, embedding as copied (F32): $(sizes "$work/nuq-3s")"
echo "# nuq 3-bit + 0.45%, embedding (tied classifier) 4-bit: $(sizes "$work/nuq-3s-e4")"
for threads in 1 2; do
  for ((r = 1; r <= repeats; r++)); do
    for t in $types; do
      "$bin/llama-bench" -m "$work/smollm2-$t.gguf" -p 0 -n "$steps" -t "$threads" -r 1 -o csv 2>/dev/null |
        awk -F, -v t="$t" -v th="$threads" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i ~ /avg_ts/) c = i; next }
          { gsub(/"/, "", $c); printf "llama.cpp %-8s threads %d  %7.1f tokens/s\n", t, th, $c }'
    done
    for m in nuq-3s nuq-3s-e4; do
      "$build/examples/nuq_generate" --model "$work/$m" --tokenizer "$gguf" --steps "$steps" --threads "$threads" \
        2>&1 >/dev/null | sed -nE "s/.*generated ([0-9]+) tokens in ([0-9.]+) s \(([0-9.]+) tokens\/s.*/nuq $m threads $threads  \3 tokens\/s (\1 tokens)/p"
    done
  done
done
