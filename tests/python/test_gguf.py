"""nuq's GGUF reader against the reference `gguf` package (llama.cpp's gguf-py).

Files are written with gguf.GGUFWriter (metadata of every value type, tensors of every type nuq
decodes, odd shapes), read back through `nuq_gguf_tool`, and compared with gguf.GGUFReader for the
header and with gguf.quants.dequantize bit for bit for the data. The real SmolLM2 Q4_1 checkpoint is
checked the same way when it is installed.
"""
import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import GGUFValueType as VT  # noqa: E402

PLAIN_TYPES = {QT.I8: np.int8, QT.I16: np.int16, QT.I32: np.int32, QT.F64: np.float64}


def run_tool(tool, *args, check=True):
    proc = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"nuq_gguf_tool {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr}")
    return proc


def dump(tool, path, tmp_path):
    out = tmp_path / f"{path.name}.json"
    run_tool(tool, "dump", path, out)
    return json.loads(out.read_text())


def nuq_dequant(tool, path, name, shape, tmp_path):
    out = tmp_path / "tensor.f32"
    run_tool(tool, "dequant", path, name, out)
    values = np.fromfile(out, dtype="<f4")
    assert values.size == int(np.prod(shape)), name
    return values.reshape(shape)


def reference_dequant(t):
    if t.tensor_type in PLAIN_TYPES:
        with np.errstate(over="ignore"):  # F64 values beyond the fp32 range become +-inf, as in nuq
            return np.asarray(t.data).astype(np.float32)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32, copy=False)


def assert_bits_equal(got, want, what):
    want = np.ascontiguousarray(want.reshape(got.shape), dtype=np.float32)
    assert got.dtype == np.float32 and want.dtype == np.float32
    mismatch = got.view(np.uint32) != want.view(np.uint32)
    if mismatch.any():
        i = np.flatnonzero(mismatch)[0]
        pytest.fail(f"{what}: {mismatch.sum()} elements differ, first at flat index {i}: "
                    f"{got.flat[i]!r} vs {want.flat[i]!r}")


def flatten(value):
    if isinstance(value, list):
        return [x for item in value for x in flatten(item)]
    return [value]


def compare_metadata(nuq, reader, *, full_arrays=True):
    reader_keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(nuq["metadata"]) == reader_keys
    for key, entry in nuq["metadata"].items():
        field = reader.fields[key]
        assert entry["type"] == field.types[0].name, key
        if field.types[0] != VT.ARRAY:
            assert entry["value"] == field.contents(), key
            continue
        assert entry["array_type"] == field.types[1].name, key
        # GGUFReader flattens nested arrays; so does the comparison.
        items = flatten(entry["value"])
        assert len(items) == len(field.data), key
        if full_arrays or field.types[-1] == VT.STRING:
            assert items == field.contents(), key


def compare_tensor_infos(nuq, reader):
    assert nuq["data_offset"] == reader.data_offset
    assert nuq["alignment"] == reader.alignment
    assert len(nuq["tensors"]) == len(reader.tensors)
    for mine, theirs in zip(nuq["tensors"], reader.tensors):
        assert mine["name"] == theirs.name
        assert mine["type"] == theirs.tensor_type.name, mine["name"]
        assert mine["ne"] == [int(d) for d in theirs.shape], mine["name"]
        assert mine["shape"] == list(reversed(mine["ne"])), mine["name"]
        assert nuq["data_offset"] + mine["offset"] == theirs.data_offset, mine["name"]
        assert mine["nbytes"] == theirs.n_bytes, mine["name"]


# ---- generated files ---------------------------------------------------------------------------------------

QUANT_CASES = [
    # (name, type, shape row-major); row lengths are multiples of 32, everything else is odd.
    ("f32.3x64", QT.F32, (3, 64)),
    ("f32.vec", QT.F32, (7,)),
    ("f16.1x32", QT.F16, (1, 32)),
    ("f16.5x3", QT.F16, (5, 3)),
    ("bf16.7x96", QT.BF16, (7, 96)),
    ("q8_0.7x96", QT.Q8_0, (7, 96)),
    ("q8_0.3d", QT.Q8_0, (2, 3, 64)),
    ("q4_0.3x64", QT.Q4_0, (3, 64)),
    ("q4_0.1x32", QT.Q4_0, (1, 32)),
    ("q4_1.7x96", QT.Q4_1, (7, 96)),
    ("q4_1.4d", QT.Q4_1, (2, 1, 3, 32)),
    ("q5_0.3x64", QT.Q5_0, (3, 64)),
    ("q5_0.1x32", QT.Q5_0, (1, 32)),
    ("q5_1.7x96", QT.Q5_1, (7, 96)),
    ("q5_1.3x64", QT.Q5_1, (3, 64)),
]


def make_data(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(3.0)
    flat = x.reshape(-1)
    flat[:32] = 0.0  # an all-zero block: d = 0
    if flat.size >= 64:
        flat[32:64] = np.float32(1.25)  # a constant block: max == min
    return x


def write_generated(path, alignment=None):
    rng = np.random.default_rng(1234)
    w = gguf.GGUFWriter(str(path), arch="nuqtest")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 255)
    w.add_int8("t.i8", -128)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -32768)
    w.add_uint32("t.u32", 4294967295)
    w.add_int32("t.i32", -2147483648)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo \"world\"\n")
    w.add_string("t.empty_str", "")
    w.add_string("t.long_str", "x" * 1000)
    w.add_array("t.ints", [1, -2, 3, 2**31 - 1])
    w.add_array("t.floats", [0.5, -1.5, 3.25])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.strs", ["a", "", "ü", "<|endoftext|>"])
    w.add_key_value("t.u8s", [0, 1, 255], VT.ARRAY, sub_type=VT.UINT8)
    w.add_key_value("t.u64s", [2**64 - 1, 0], VT.ARRAY, sub_type=VT.UINT64)
    w.add_key_value("t.f64s", [1e100, -0.0], VT.ARRAY, sub_type=VT.FLOAT64)
    w.add_array("t.nested", [[1, 2], [3, 4, 5]])
    w.add_array("t.nested_strs", [["a", "b"], ["c"]])
    w.add_array("t.many", list(range(1000)))

    for name, qtype, shape in QUANT_CASES:
        data = make_data(rng, shape)
        if qtype == QT.F32:
            if name == "f32.vec":
                data[:] = [np.inf, -0.0, 1e-40, np.nan, -np.inf, 3.0, -7.5]
            w.add_tensor(name, data)
        elif qtype == QT.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.add_tensor("i8.3x5", rng.integers(-128, 128, size=(3, 5), dtype=np.int8))
    w.add_tensor("i16.2x3", rng.integers(-32768, 32768, size=(2, 3), dtype=np.int16))
    w.add_tensor("i32.4", np.array([-(2**31), 2**31 - 1, 16777217, 0], dtype=np.int32))
    w.add_tensor("f64.3", np.array([0.1, -1e300, 2.5], dtype=np.float64))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return write_generated(tmp_path_factory.mktemp("gguf") / "generated.gguf")


def test_type_table_matches_gguf_py(gguf_tool, tmp_path):
    out = tmp_path / "types.json"
    run_tool(gguf_tool, "types", out)
    nuq = {t["value"]: t for t in json.loads(out.read_text())}
    assert set(nuq) == {int(t) for t in QT}
    for qtype in QT:
        t = nuq[int(qtype)]
        assert t["name"] == qtype.name
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        assert t["block_size"] == block, qtype.name
        if qtype == QT.Q8_1:
            # gguf-py still lists the pre-2023 layout (fp32 d and s, 40 bytes); ggml's block_q8_1
            # holds two fp16 halves and 32 int8 (static_assert in ggml-common.h): 36 bytes.
            assert (size, t["type_size"]) == (40, 36)
        else:
            assert t["type_size"] == size, qtype.name
    decodable = {t["name"] for t in nuq.values() if t["can_dequantize"]}
    assert decodable == {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}


def test_dump_matches_gguf_reader(gguf_tool, generated, tmp_path):
    nuq = dump(gguf_tool, generated, tmp_path)
    reader = gguf.GGUFReader(generated)
    assert nuq["version"] == 3
    compare_metadata(nuq, reader)
    compare_tensor_infos(nuq, reader)
    meta = nuq["metadata"]
    # Spot checks that do not depend on the reader.
    assert meta["t.u64"]["value"] == 2**64 - 1
    assert meta["t.i64"]["value"] == -(2**63)
    assert meta["t.f32"]["value"] == float(np.float32(0.1))
    assert meta["t.str"]["value"] == "héllo \"world\"\n"
    assert meta["t.nested"]["value"] == [[1, 2], [3, 4, 5]]
    assert meta["t.nested"]["array_type"] == "ARRAY"
    assert meta["t.nested_strs"]["value"] == [["a", "b"], ["c"]]
    assert meta["t.many"]["display"] == "[0, 1, 2, 3, 4, 5, 6, 7, ... (1000 items)]"
    assert meta["t.long_str"]["display"] == '"' + "x" * 60 + '..." (1000 bytes)'
    shapes = {t["name"]: t["shape"] for t in nuq["tensors"]}
    for name, _, shape in QUANT_CASES:
        assert shapes[name] == list(shape), name


def test_dequant_matches_gguf_quants_bit_for_bit(gguf_tool, generated, tmp_path):
    reader = gguf.GGUFReader(generated)
    seen = set()
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        got = nuq_dequant(gguf_tool, generated, t.name, shape, tmp_path)
        assert_bits_equal(got, reference_dequant(t), t.name)
        seen.add(t.tensor_type.name)
    assert seen == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "I8", "I16", "I32", "F64"}


def test_dequant_is_close_to_the_source_data(gguf_tool, generated, tmp_path):
    # Guards against both sides agreeing on garbage: decoded values must be near what was quantized.
    rng = np.random.default_rng(1234)
    tolerance = {QT.F32: 0, QT.F16: 2e-3, QT.BF16: 1e-2, QT.Q8_0: 0.02, QT.Q5_0: 0.15, QT.Q5_1: 0.15,
                 QT.Q4_0: 0.3, QT.Q4_1: 0.3}
    for name, qtype, shape in QUANT_CASES:
        data = make_data(rng, shape)
        if name == "f32.vec":
            continue
        got = nuq_dequant(gguf_tool, generated, name, shape, tmp_path)
        scale = np.abs(data).max()
        assert np.abs(got - data).max() <= tolerance[qtype] * scale, name


def test_custom_alignment(gguf_tool, tmp_path):
    path = write_generated(tmp_path / "aligned.gguf", alignment=256)
    nuq = dump(gguf_tool, path, tmp_path)
    reader = gguf.GGUFReader(path)
    assert nuq["alignment"] == 256
    assert nuq["data_offset"] % 256 == 0
    assert all(t["offset"] % 256 == 0 for t in nuq["tensors"])
    compare_tensor_infos(nuq, reader)
    t = reader.tensors[-3]
    got = nuq_dequant(gguf_tool, path, t.name, tuple(reversed(t.shape.tolist())), tmp_path)
    assert_bits_equal(got, reference_dequant(t), t.name)


def test_unknown_tensor_name_fails_naming_it(gguf_tool, generated, tmp_path):
    proc = run_tool(gguf_tool, "dequant", generated, "no.such.tensor", tmp_path / "x.f32", check=False)
    assert proc.returncode == 1
    assert "no.such.tensor" in proc.stderr and str(generated) in proc.stderr


@pytest.mark.parametrize("fraction", [0.0, 0.002, 0.02, 0.1, 0.5, 0.97])
def test_truncated_generated_file_fails_naming_it(gguf_tool, generated, tmp_path, fraction):
    data = generated.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    proc = run_tool(gguf_tool, "dump", cut, tmp_path / "out.json", check=False)
    assert proc.returncode == 1, proc.stderr
    assert str(cut) in proc.stderr


def test_bad_magic_and_version(gguf_tool, generated, tmp_path):
    data = bytearray(generated.read_bytes())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    proc = run_tool(gguf_tool, "dump", bad, tmp_path / "out.json", check=False)
    assert proc.returncode == 1 and "not a GGUF file" in proc.stderr and str(bad) in proc.stderr
    data[4:8] = (1).to_bytes(4, "little")
    bad.write_bytes(data)
    proc = run_tool(gguf_tool, "dump", bad, tmp_path / "out.json", check=False)
    assert proc.returncode == 1 and "GGUF version 1 is not supported" in proc.stderr


# ---- the real SmolLM2 checkpoint ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_reader(smollm2):
    return gguf.GGUFReader(smollm2)


def test_smollm2_dump_matches_gguf_reader(gguf_tool, smollm2, smollm2_reader, tmp_path):
    nuq = dump(gguf_tool, smollm2, tmp_path)
    compare_metadata(nuq, smollm2_reader, full_arrays=False)
    compare_tensor_infos(nuq, smollm2_reader)
    assert nuq["metadata"]["general.architecture"]["value"] == "llama"
    assert len(nuq["metadata"]["tokenizer.ggml.tokens"]["value"]) == 49152
    types = {t["type"] for t in nuq["tensors"]}
    assert types == {"Q4_1", "F32", "Q8_0"}


def test_smollm2_layers_dequantize_exactly(gguf_tool, smollm2, smollm2_reader, tmp_path):
    picked = [t for t in smollm2_reader.tensors
              if (t.name.startswith(("blk.0.", "blk.29.")) and t.tensor_type in (QT.Q4_1, QT.F32))
              or t.name == "token_embd.weight"]
    assert {t.tensor_type for t in picked} == {QT.Q4_1, QT.F32, QT.Q8_0}
    assert len(picked) >= 19
    for t in picked:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        got = nuq_dequant(gguf_tool, smollm2, t.name, shape, tmp_path)
        assert np.isfinite(got).all(), t.name
        assert_bits_equal(got, reference_dequant(t), t.name)


def test_truncated_smollm2_fails_naming_it(gguf_tool, smollm2, tmp_path):
    cut = tmp_path / "smollm2-cut.gguf"
    with open(smollm2, "rb") as src, open(cut, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate(smollm2.stat().st_size // 2)
    proc = run_tool(gguf_tool, "dump", cut, tmp_path / "out.json", check=False)
    assert proc.returncode == 1
    assert str(cut) in proc.stderr and "runs past the end of the file" in proc.stderr
    with open(cut, "r+b") as f:
        f.truncate(100_000)  # inside the tokenizer's string arrays
    proc = run_tool(gguf_tool, "dump", cut, tmp_path / "out.json", check=False)
    assert proc.returncode == 1
    assert str(cut) in proc.stderr and "tokenizer.ggml" in proc.stderr
