#!/usr/bin/env python3
"""Writes the seed corpus for fuzz_gguf: a few tiny GGUF files (each under 4 KB) made with the
reference `gguf` package, covering every metadata value type and each tensor type nuq decodes.

Usage: python3 tests/fuzz/make_gguf_seeds.py [output-dir]   (default: tests/fuzz/corpus/gguf)
"""
import pathlib
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT


def write(path, build, alignment=None):
    w = gguf.GGUFWriter(str(path), arch="seed")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert path.stat().st_size < 4096, f"{path} is {path.stat().st_size} bytes"


def metadata(w):
    w.add_uint8("u8", 7)
    w.add_int8("i8", -7)
    w.add_uint16("u16", 700)
    w.add_int16("i16", -700)
    w.add_uint32("u32", 70000)
    w.add_int32("i32", -70000)
    w.add_float32("f32", 0.5)
    w.add_uint64("u64", 2**40)
    w.add_int64("i64", -(2**40))
    w.add_float64("f64", 0.25)
    w.add_bool("bool", True)
    w.add_string("str", "seed")
    w.add_array("strs", ["a", "bc"])
    w.add_key_value("u8s", [1, 2, 3], VT.ARRAY, sub_type=VT.UINT8)
    w.add_array("nested", [[1, 2], [3]])


def float_tensors(w):
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((2, 4)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((3,)).astype(np.float16))
    w.add_tensor("bf16", gguf.quants.quantize(rng.standard_normal((1, 8)).astype(np.float32), QT.BF16), raw_dtype=QT.BF16)
    w.add_tensor("f64", np.array([1.0, -2.0], dtype=np.float64))
    w.add_tensor("i8", np.array([1, -2, 3], dtype=np.int8))
    w.add_tensor("i16", np.array([1, -2], dtype=np.int16))
    w.add_tensor("i32", np.array([1, -2], dtype=np.int32))


def quant_tensors(w):
    rng = np.random.default_rng(1)
    for name, qtype in [("q8_0", QT.Q8_0), ("q4_0", QT.Q4_0), ("q4_1", QT.Q4_1), ("q5_0", QT.Q5_0), ("q5_1", QT.Q5_1)]:
        w.add_tensor(name, gguf.quants.quantize(rng.standard_normal((2, 32)).astype(np.float32), qtype), raw_dtype=qtype)


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "corpus" / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    write(out / "metadata_only.gguf", metadata)
    write(out / "float_tensors.gguf", float_tensors)
    write(out / "quant_tensors.gguf", quant_tensors, alignment=16)
    write(out / "everything.gguf", lambda w: (metadata(w), quant_tensors(w)))


if __name__ == "__main__":
    main()
