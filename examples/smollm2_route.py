"""SmolLM2-135M-Instruct from its GGUF to a 3-bit + 0.45% sparse nuq checkpoint with error feedback, and
its WikiText-2 perplexity, all from Python: the row `--bits 3 --sparse 0.45% --hessian` of docs/results.md
(51.341), made with the same steps as scripts/results.sh:

  nuq calibrate --model SmolLM2.gguf --text wikitext2_test.txt --skip-tokens 100000 --max-tokens 16384 \
      --out act.safetensors --hessian xtx.safetensors
  nuq quantize SmolLM2.gguf --out q3h45 --bits 3 --sparse 0.45% --hessian xtx.safetensors
  nuq eval --model q3h45 --tokenizer SmolLM2.gguf --text wikitext2_test.txt --max-tokens 8192

Usage: python examples/smollm2_route.py [WORK_DIR]   (models from scripts/fetch-models.sh, text from
../shared/data or $NUQ_SHARED_DATA). Prints one JSON line with the perplexity and the time of each step.
"""
import json
import os
import pathlib
import sys
import time

import nuq

root = pathlib.Path(__file__).resolve().parents[1]
models = pathlib.Path(os.environ.get("NUQ_MODELS_DIR", pathlib.Path.home() / ".cache" / "nuq" / "models"))
data = pathlib.Path(os.environ.get("NUQ_SHARED_DATA", root.parent / "shared" / "data"))
gguf = models / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
text = data / "wikitext2_test.txt"
work = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "smollm2-route")
work.mkdir(parents=True, exist_ok=True)

times = {}
t = time.monotonic()
stats = nuq.calibrate(gguf, text, work / "act.safetensors", hessian=work / "xtx.safetensors",
                      skip_tokens=100000, max_tokens=16384)
times["calibrate"] = time.monotonic() - t
t = time.monotonic()
q = nuq.quantize_checkpoint(gguf, work / "q3h45", 3, outlier_fraction="0.45%", hessian=stats["hessian"],
                            force=True)
times["quantize"] = time.monotonic() - t
t = time.monotonic()
result = nuq.evaluate(work / "q3h45", text, tokenizer=gguf, max_tokens=8192)
times["evaluate"] = time.monotonic() - t
print(json.dumps({"perplexity": result["perplexity"], "linear_bits_per_weight": result["linear_bits_per_weight"],
                  "average_bits_per_weight": q["average_bits_per_weight"], "seconds": times}))
