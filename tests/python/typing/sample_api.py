"""A script using nuq's Python API as a user would; tests/python/test_typing.py checks it with
`mypy --strict`. It is type-checked, never run."""
from __future__ import annotations

import pathlib
from typing import List

import numpy as np
import numpy.typing as npt

import nuq


def route(gguf: pathlib.Path, text: pathlib.Path, work: pathlib.Path) -> float:
    stats: nuq.CalibrateResult = nuq.calibrate(gguf, text, work / "act.safetensors",
                                               hessian=work / "xtx.safetensors", max_tokens=2048, progress=False)
    windows: int = stats["windows"]
    q: nuq.QuantizeCheckpointResult = nuq.quantize_checkpoint(gguf, work / "q3", 3, outlier_fraction="0.45%",
                                                              hessian=stats["hessian"], force=True)
    names: List[str] = [layer["name"] for layer in q["layers"]]
    f: nuq.FisherResult = nuq.fisher(gguf, text, work / "fisher.safetensors", max_tokens=windows * 511)
    result: nuq.EvalResult = nuq.evaluate(work / "q3", text, tokenizer=gguf, max_tokens=1024,
                                          progress=lambda event: print(event["stage"]))
    out: nuq.GenerateResult = nuq.generate(work / "q3", "Once upon a time", tokenizer=gguf, max_new_tokens=8)
    print(names, f["mean_loss"], out["text"].strip(), result["kv_cache"])
    ppl: float = result["perplexity"]
    return ppl


def layers() -> npt.NDArray[np.float32]:
    w = np.zeros((8, 64), np.float32)
    layer: nuq.PackedLayer = nuq.quantize(w, 3, outlier_fraction=0.01)
    rows: int = layer.rows
    y: npt.NDArray[np.float32] = nuq.linear(layer, np.ones((2, 64), np.float32))
    ck = nuq.Checkpoint("model-q3")
    first: nuq.PackedLayer = ck.layer(ck.layers[0])
    acc = nuq.HessianAccumulator()
    acc.add("layer", w)
    h: npt.NDArray[np.float64] = acc.matrix("layer")
    print(rows, first.bits, h.shape)
    return y
