#!/usr/bin/env bash
# Reproduces the tables of docs/results.md: quantizes stories260K and SmolLM2-135M with every method and
# evaluates perplexity with `nuq eval`, printing one Markdown row per configuration with the exact
# command used. Needs a release build (NUQ_BUILD_DIR, default build/) and the real data:
# ../shared/data (NUQ_SHARED_DATA) and the fetched SmolLM2 GGUF (scripts/fetch-models.sh).
#   NUQ_EVAL_TOKENS   tokens scored per evaluation (default 8192)
#   NUQ_RESULTS_MODELS  "stories260K smollm2" (default both)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
nuq=${NUQ_BUILD_DIR:-$root/build}/nuq
data=${NUQ_SHARED_DATA:-$root/../shared/data}
models=${NUQ_MODELS_DIR:-$HOME/.cache/nuq/models}
tokens=${NUQ_EVAL_TOKENS:-8192}
work=${NUQ_RESULTS_DIR:-$(mktemp -d)}
mkdir -p "$work"

row() {  # row LABEL MODEL_DIR TOKENIZER TEXT...: one table row per text
  local label=$1 model=$2 tok=$3
  shift 3
  local cells=""
  local bpw="" tps=""
  for text in "$@"; do
    local j
    j=$("$nuq" eval --json --quiet ${NUQ_EVAL_FLAGS:-} --model "$model" --tokenizer "$tok" --text "$text" \
          --max-tokens "$tokens")
    cells+=" $(python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["perplexity"])' <<<"$j") |"
    bpw=$(python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["linear_bits_per_weight"])' <<<"$j")
    tps=$(python3 -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["tokens_per_second"])' <<<"$j")
  done
  echo "| $label | $bpw |$cells $tps |"
}

quantize() {  # quantize NAME INPUT ARGS...: prints nothing, leaves $work/NAME
  local name=$1 input=$2
  shift 2
  echo "<!-- nuq quantize $(basename "$input") --out $name $* -->" >&2
  "$nuq" quantize "$input" --out "$work/$name" --force --quiet "$@" >/dev/null
}

if [[ " ${NUQ_RESULTS_MODELS:-stories260K smollm2} " == *" stories260K "* ]]; then
  tok=$data/tok512.bin
  texts=("$data/tinystories_valid.txt")
  "$nuq" convert "$data/stories260K.bin" --out "$work/s260-hf" >/dev/null
  "$nuq" calibrate --model "$work/s260-hf" --tokenizer "$tok" --text "$data/tinystories_valid.txt" \
    --skip-tokens 100000 --max-tokens 16384 --out "$work/s260-act.safetensors" \
    --hessian "$work/s260-xtx.safetensors" >/dev/null 2>&1
  "$nuq" fisher --model "$work/s260-hf" --tokenizer "$tok" --text "$data/tinystories_valid.txt" \
    --skip-tokens 100000 --max-tokens 16384 --out "$work/s260-fisher.safetensors" --quiet >/dev/null
  echo "### stories260K ($tokens tokens of tinystories_valid.txt, windows of 512)"
  echo
  echo "| configuration | bits/weight | TinyStories ppl | tokens/s |"
  echo "|---|---|---|---|"
  row "fp32" "$work/s260-hf" "$tok" "${texts[@]}"
  for spec in "rtn4:--method rtn --bits 4" "rtn3:--method rtn --bits 3" "rtn2:--method rtn --bits 2" \
              "km3:--method kmeans --bits 3" \
              "nuq4a:--bits 4 --fisher $work/s260-act.safetensors --sparse 0" \
              "nuq3a:--bits 3 --fisher $work/s260-act.safetensors --sparse 0" \
              "nuq3a05:--bits 3 --fisher $work/s260-act.safetensors --sparse 0.05%" \
              "nuq3a45:--bits 3 --fisher $work/s260-act.safetensors --sparse 0.45%" \
              "nuq2a45:--bits 2 --fisher $work/s260-act.safetensors --sparse 0.45%" \
              "nuq4f:--bits 4 --fisher $work/s260-fisher.safetensors --sparse 0" \
              "nuq3f45:--bits 3 --fisher $work/s260-fisher.safetensors --sparse 0.45%"; do
    name=${spec%%:*}
    # shellcheck disable=SC2086
    quantize "s260-$name" "$work/s260-hf" ${spec#*:}
    label=${spec#*:}
    row "${label//"$work/"/}" "$work/s260-$name" "$tok" "${texts[@]}"
  done
  # Codebook tuning by distillation (docs/quantization.md#codebook-tuning-nuq-tune) on 65 408 TinyStories tokens
  # from token 100 000; this tiny model takes a larger step than the default.
  "$nuq" tune "$work/s260-nuq3a45" --reference "$work/s260-hf" --tokenizer "$tok" --out "$work/s260-nuq3a45-tuned" \
    --text "$data/tinystories_valid.txt" --skip-tokens 100000 --max-tokens 65408 --lr 5e-3 --norms --quiet >/dev/null
  row "--bits 3 --sparse 0.45% activation-weighted, then \`nuq tune --lr 5e-3 --norms\`" "$work/s260-nuq3a45-tuned" \
    "$tok" "${texts[@]}"
  echo
  # Mixed precision from measured output divergence (docs/sensitivity.md#measured-sensitivity-and-search):
  # plans and uniform rows with the same statistics and error feedback, evaluated on both texts.
  q=(--fisher "$work/s260-act.safetensors" --hessian "$work/s260-xtx.safetensors")
  echo "| configuration (activation statistics + error feedback) | bits/weight | TinyStories ppl | WikiText-2 ppl | tokens/s |"
  echo "|---|---|---|---|---|"
  both=("$data/tinystories_valid.txt" "$data/wikitext2_test.txt")
  for spec in "u3:--bits 3" "u3s:--bits 3 --sparse 0.45%" "u2s:--bits 2 --sparse 0.45%"; do
    # shellcheck disable=SC2086
    quantize "s260-${spec%%:*}" "$work/s260-hf" ${spec#*:} "${q[@]}"
    row "uniform ${spec#*:}" "$work/s260-${spec%%:*}" "$tok" "${both[@]}"
  done
  for budget in 4.7797bpw 4.97bpw 3.60bpw; do
    "$nuq" plan --model "$work/s260-hf" --tokenizer "$tok" --text "$data/tinystories_valid.txt" \
      --text "$data/wikitext2_test.txt" --skip-tokens 100000 --max-tokens 8192 "${q[@]/--fisher/--stats}" \
      --table "$work/s260-kl.safetensors" --budget "$budget" --out "$work/s260-plan-$budget.json" --quiet >/dev/null
    quantize "s260-plan-$budget" "$work/s260-hf" --bits 3 --plan "$work/s260-plan-$budget.json" "${q[@]}"
    row "plan \`--budget $budget\`" "$work/s260-plan-$budget" "$tok" "${both[@]}"
  done
  echo
fi

if [[ " ${NUQ_RESULTS_MODELS:-stories260K smollm2} " == *" smollm2 "* ]]; then
  gguf=$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  texts=("$data/wikitext2_test.txt" "$data/tinystories_valid.txt")
  "$nuq" calibrate --model "$gguf" --text "$data/wikitext2_test.txt" --skip-tokens 100000 --max-tokens 16384 \
    --out "$work/smol-act.safetensors" --hessian "$work/smol-xtx.safetensors" >/dev/null 2>&1
  "$nuq" fisher --model "$gguf" --text "$data/wikitext2_test.txt" --skip-tokens 100000 --max-tokens 16384 \
    --out "$work/smol-fisher.safetensors" --quiet >/dev/null
  echo "### SmolLM2-135M-Instruct ($tokens tokens of each text, windows of 512)"
  echo
  echo "| configuration | bits/weight | WikiText-2 ppl | TinyStories ppl | tokens/s |"
  echo "|---|---|---|---|---|"
  row "Q4_1 GGUF dequantized to fp32 (reference)" "$gguf" "$gguf" "${texts[@]}"
  for spec in "rtn4:--method rtn --bits 4" "rtn4g64:--method rtn --bits 4 --group-size 64" \
              "rtn3g64:--method rtn --bits 3 --group-size 64" "rtn2g64:--method rtn --bits 2 --group-size 64" \
              "km3:--method kmeans --bits 3" \
              "nuq4a:--bits 4 --fisher $work/smol-act.safetensors --sparse 0" \
              "nuq3a:--bits 3 --fisher $work/smol-act.safetensors --sparse 0" \
              "nuq3a05:--bits 3 --fisher $work/smol-act.safetensors --sparse 0.05%" \
              "nuq3a45:--bits 3 --fisher $work/smol-act.safetensors --sparse 0.45%" \
              "nuq3p45:--bits 3 --sparse 0.45%" \
              "nuq2a45:--bits 2 --fisher $work/smol-act.safetensors --sparse 0.45%" \
              "nuq4f:--bits 4 --fisher $work/smol-fisher.safetensors --sparse 0" \
              "nuq3f45:--bits 3 --fisher $work/smol-fisher.safetensors --sparse 0.45%" \
              "gptq3g64:--method rtn --bits 3 --group-size 64 --hessian $work/smol-xtx.safetensors" \
              "nuq4h:--bits 4 --hessian $work/smol-xtx.safetensors" \
              "nuq4fh:--bits 4 --fisher $work/smol-fisher.safetensors --hessian $work/smol-xtx.safetensors" \
              "nuq3h:--bits 3 --hessian $work/smol-xtx.safetensors" \
              "nuq3h45:--bits 3 --sparse 0.45% --hessian $work/smol-xtx.safetensors" \
              "nuq3fh45:--bits 3 --sparse 0.45% --fisher $work/smol-fisher.safetensors --hessian $work/smol-xtx.safetensors"; do
    name=${spec%%:*}
    # shellcheck disable=SC2086
    quantize "smol-$name" "$gguf" ${spec#*:}
    label=${spec#*:}
    row "${label//"$work/"/}" "$work/smol-$name" "$gguf" "${texts[@]}"
  done
  # Codebook tuning by distillation (docs/quantization.md#codebook-tuning-nuq-tune) of two rows above, on
  # 65 408 tokens of each text from token 100 000 (disjoint from the evaluated ones): ~25 minutes each.
  args=(--text "$data/wikitext2_test.txt" --text "$data/tinystories_valid.txt" --skip-tokens 100000
        --max-tokens 65408 --norms)
  for spec in "nuq4h|--bits 4 --hessian" "nuq3fh45|--bits 3 --sparse 0.45% --fisher --hessian"; do
    name=${spec%%|*}
    echo "<!-- nuq tune smol-$name --reference $(basename "$gguf") --out smol-$name-tuned ${args[*]//"$data/"/} -->" >&2
    "$nuq" tune "$work/smol-$name" --reference "$gguf" --out "$work/smol-$name-tuned" --quiet "${args[@]}" >/dev/null
    row "${spec#*|}, then \`nuq tune --norms\`" "$work/smol-$name-tuned" "$gguf" "${texts[@]}"
    # ... and with the indices moving too (~30 minutes each).
    echo "<!-- nuq tune smol-$name --reference $(basename "$gguf") --out smol-$name-tuned-idx ${args[*]//"$data/"/} --indices -->" >&2
    "$nuq" tune "$work/smol-$name" --reference "$gguf" --out "$work/smol-$name-tuned-idx" --quiet "${args[@]}" \
      --indices >/dev/null
    row "${spec#*|}, then \`nuq tune --norms --indices\`" "$work/smol-$name-tuned-idx" "$gguf" "${texts[@]}"
  done
  # Mixed precision from measured output divergence (docs/sensitivity.md#measured-sensitivity-and-search):
  # one table (both texts from token 100000), plans at three sizes, and the uniform rows they compete with,
  # all with the same statistics and error feedback.
  q=(--fisher "$work/smol-act.safetensors" --hessian "$work/smol-xtx.safetensors")
  for spec in "u3:--bits 3" "u3s:--bits 3 --sparse 0.45%" "u2s:--bits 2 --sparse 0.45%"; do
    # shellcheck disable=SC2086
    quantize "smol-${spec%%:*}" "$gguf" ${spec#*:} "${q[@]}"
    row "uniform ${spec#*:} --fisher act --hessian" "$work/smol-${spec%%:*}" "$gguf" "${texts[@]}"
  done
  for budget in 3.1875bpw 3.25bpw 2.5bpw; do
    "$nuq" plan --model "$gguf" --text "$data/wikitext2_test.txt" --text "$data/tinystories_valid.txt" \
      --skip-tokens 100000 --max-tokens 8192 "${q[@]/--fisher/--stats}" --table "$work/smol-kl.safetensors" \
      --budget "$budget" --out "$work/smol-plan-$budget.json" --quiet >/dev/null
    quantize "smol-plan-$budget" "$gguf" --bits 3 --plan "$work/smol-plan-$budget.json" "${q[@]}"
    row "plan \`--budget $budget\` (measured KL + search)" "$work/smol-plan-$budget" "$gguf" "${texts[@]}"
  done
  # Two epochs of the 4-bit run with indices (~40 minutes alone).
  echo "<!-- nuq tune smol-nuq4h --reference $(basename "$gguf") --out smol-nuq4h-tuned-idx-e2 ${args[*]//"$data/"/} --indices --epochs 2 -->" >&2
  "$nuq" tune "$work/smol-nuq4h" --reference "$gguf" --out "$work/smol-nuq4h-tuned-idx-e2" --quiet "${args[@]}" \
    --indices --epochs 2 >/dev/null
  row "--bits 4 --hessian, then \`nuq tune --norms --indices --epochs 2\`" "$work/smol-nuq4h-tuned-idx-e2" "$gguf" \
    "${texts[@]}"
fi
