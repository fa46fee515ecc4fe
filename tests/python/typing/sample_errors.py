"""Misuses of nuq's API that `mypy --strict` must report (tests/python/test_typing.py): proof that the
types are real, not Any. Each line marked `# error` must be reported, and nothing else."""
import nuq

result = nuq.evaluate("model.gguf", "text.txt")
result["perplexity"].upper()  # error: a float has no .upper
nuq.quantize_checkpoint("in.gguf", "out", bits="3")  # error: bits is an int
nuq.calibrate("m.gguf", "t.txt", "o.safetensors", hesian="x.safetensors")  # error: no such argument
layer = nuq.quantize(None, 3)
layer.rows.append(1)  # error: rows is an int
nuq.generate("m.gguf", "prompt", progress="yes")  # error: progress is a bool or a callable
