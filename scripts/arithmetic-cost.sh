#!/usr/bin/env bash
# What the default arithmetic of generation costs (docs/results.md, "The default arithmetic"): each model
# is quantized at 3 bits + 0.45% sparse and at 4 bits (activation-weighted, as in docs/results.md), then
# evaluated in 16-token forward calls, as generation runs them, once with `--arithmetic exact` (fp32
# products, the reference) and once with the default `--arithmetic fastest` (int8 on CPUs with AVX-512
# VNNI + VBMI). One Markdown row per model, configuration and text; the command of each evaluation is in
# the comment above the table. Needs a release build (NUQ_BUILD_DIR, default build/), ../shared/data
# (NUQ_SHARED_DATA) and the fetched SmolLM2 GGUF (scripts/fetch-models.sh).
#   NUQ_EVAL_TOKENS     tokens scored per evaluation (default 8192)
#   NUQ_RESULTS_MODELS  "stories260K smollm2" (default both)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
nuq=${NUQ_BUILD_DIR:-$root/build}/nuq
data=${NUQ_SHARED_DATA:-$root/../shared/data}
models=${NUQ_MODELS_DIR:-$HOME/.cache/nuq/models}
tokens=${NUQ_EVAL_TOKENS:-8192}
work=${NUQ_RESULTS_DIR:-$(mktemp -d)}
mkdir -p "$work"

rows() {  # rows MODEL LABEL TOKENIZER TEXT...: one row per text, exact against the default
  local model=$1 label=$2 tok=$3
  shift 3
  for text in "$@"; do
    local exact fastest
    exact=$("$nuq" eval --json --quiet --model "$model" --tokenizer "$tok" --text "$text" --max-tokens "$tokens" \
              --step 16 --arithmetic exact)
    fastest=$("$nuq" eval --json --quiet --model "$model" --tokenizer "$tok" --text "$text" --max-tokens "$tokens" \
                --step 16)
    python3 - "$label" "$(basename "$text")" "$exact" "$fastest" <<'EOF'
import json, sys
label, text, exact, fastest = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
pe, pf = exact["perplexity"], fastest["perplexity"]
print(f"| {label} | {exact['linear_bits_per_weight']:.3f} | {text} | {pe:.3f} | {pf:.3f} ({fastest['arithmetic']}) | "
      f"{100 * (pf / pe - 1):+.2f}% | {exact['tokens_per_second']:.0f} | {fastest['tokens_per_second']:.0f} |")
EOF
  done
}

quantize() {  # quantize NAME INPUT ARGS...
  local name=$1 input=$2
  shift 2
  "$nuq" quantize "$input" --out "$work/$name" --force --quiet "$@" >/dev/null
}

echo "<!-- $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores; each row:"
echo "     nuq eval --model <dir> --tokenizer <tok> --text <text> --max-tokens $tokens --step 16 --arithmetic exact"
echo "     nuq eval --model <dir> --tokenizer <tok> --text <text> --max-tokens $tokens --step 16 -->"
echo
echo "| model, configuration | bits/weight | text | exact ppl | default ppl (arithmetic) | change | exact tokens/s | default tokens/s |"
echo "|---|---|---|---|---|---|---|---|"

if [[ " ${NUQ_RESULTS_MODELS:-stories260K smollm2} " == *" stories260K "* ]]; then
  tok=$data/tok512.bin
  "$nuq" convert "$data/stories260K.bin" --out "$work/s260-hf" >/dev/null
  "$nuq" calibrate --model "$work/s260-hf" --tokenizer "$tok" --text "$data/tinystories_valid.txt" \
    --skip-tokens 100000 --max-tokens 16384 --out "$work/s260-act.safetensors" >/dev/null 2>&1
  quantize s260-3s "$work/s260-hf" --bits 3 --sparse 0.45% --fisher "$work/s260-act.safetensors"
  quantize s260-4 "$work/s260-hf" --bits 4 --sparse 0 --fisher "$work/s260-act.safetensors"
  rows "$work/s260-3s" "stories260K, 3-bit + 0.45%" "$tok" "$data/tinystories_valid.txt"
  rows "$work/s260-4" "stories260K, 4-bit" "$tok" "$data/tinystories_valid.txt"
fi

if [[ " ${NUQ_RESULTS_MODELS:-stories260K smollm2} " == *" smollm2 "* ]]; then
  gguf=$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  "$nuq" calibrate --model "$gguf" --text "$data/wikitext2_test.txt" --skip-tokens 100000 --max-tokens 16384 \
    --out "$work/smol-act.safetensors" >/dev/null 2>&1
  quantize smol-3s "$gguf" --bits 3 --sparse 0.45% --fisher "$work/smol-act.safetensors"
  quantize smol-4 "$gguf" --bits 4 --sparse 0 --fisher "$work/smol-act.safetensors"
  rows "$work/smol-3s" "SmolLM2-135M, 3-bit + 0.45%" "$gguf" "$data/wikitext2_test.txt" "$data/tinystories_valid.txt"
  rows "$work/smol-4" "SmolLM2-135M, 4-bit" "$gguf" "$data/wikitext2_test.txt" "$data/tinystories_valid.txt"
fi
