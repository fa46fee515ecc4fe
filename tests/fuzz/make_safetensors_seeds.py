#!/usr/bin/env python3
"""Writes the seed corpus for fuzz_safetensors: a few tiny safetensors files (each under 2 KB) made
with the reference `safetensors` package, covering every dtype nuq reads, empty and rank-0 tensors,
metadata, and one hand-built file with BF16/F8 tensors (which numpy cannot express).

Usage: python3 tests/fuzz/make_safetensors_seeds.py [output-dir]   (default: tests/fuzz/corpus/safetensors)
"""
import json
import pathlib
import struct
import sys

import numpy as np
from safetensors.numpy import save_file


def check(path):
    path.chmod(0o644)  # the reference writer creates files 0600
    assert path.stat().st_size < 2048, f"{path} is {path.stat().st_size} bytes"


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "corpus" / "safetensors"
    out.mkdir(parents=True, exist_ok=True)

    save_file({}, str(out / "empty.safetensors"))
    save_file({}, str(out / "metadata_only.safetensors"), metadata={"format": "pt", "note": "h\u00e9llo"})
    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(out / "one_f32.safetensors"))
    save_file({
        "f64": np.array([1.5], dtype=np.float64),
        "f32": np.array([1, -2], dtype=np.float32),
        "f16": np.array([0.5, 2, 3], dtype=np.float16),
        "i64": np.array([-1], dtype=np.int64),
        "u64": np.array([7], dtype=np.uint64),
        "i32": np.array([3], dtype=np.int32),
        "u32": np.array([4], dtype=np.uint32),
        "i16": np.array([5], dtype=np.int16),
        "u16": np.array([6], dtype=np.uint16),
        "i8": np.array([-8, 9, 10], dtype=np.int8),
        "u8": np.array([255], dtype=np.uint8),
        "bool": np.array([True, False]),
    }, str(out / "every_numpy_dtype.safetensors"), metadata={"format": "np"})
    save_file({
        "scalar": np.array(3.0, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float16),
        "rank8": np.zeros((1, 1, 1, 1, 1, 1, 1, 2), dtype=np.int8),
    }, str(out / "edge_shapes.safetensors"))

    header = {"__metadata__": {"k": "v"},
              "bf16": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
              "e4m3": {"dtype": "F8_E4M3", "shape": [3], "data_offsets": [4, 7]},
              "e5m2": {"dtype": "F8_E5M2", "shape": [1], "data_offsets": [7, 8]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (out / "bf16_fp8.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(range(1, 9)))

    for path in out.iterdir():
        check(path)


if __name__ == "__main__":
    main()
