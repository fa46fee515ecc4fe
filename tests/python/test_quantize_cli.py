"""`nuq quantize` end to end: synthetic checkpoints with LLaMA tensor names (and the real SmolLM2 GGUF
when fetched), decoded by an independent NumPy reader written from docs/format.md, never by nuq itself.

Covers: which tensors are quantized (default rule, --include/--exclude, --plan), the packed tensors and
their metadata, the error figures in quant_report.json against the NumPy decoding, dense + sparse
reproducing kept weights, --fisher (weighted, missing tensors, bad shapes and values), bad input leaving
nothing behind, a full disk (RLIMIT_FSIZE), sharding, refusing to clobber, and SIGKILL at several
moments followed by a resume that must give byte-identical files."""
import json
import os
import re
import resource
import signal
import struct
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file


def run(cli, *args, preexec_fn=None, timeout=600):
    return subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def assert_error(result, *fragments):
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("nuq: error: "), result.stderr
    for f in fragments:
        assert f in err, (f, err)


# ---- an independent reader of the packed format (docs/format.md) ----------------------------------------

def safetensors_metadata(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)).get("__metadata__", {})


def unpack_indices(qweight, cols, bits):
    rows = qweight.shape[0]
    padded = (cols + 63) // 64 * 64
    planes = {2: [(2, 0)], 3: [(2, 0), (1, padded // 4)], 4: [(4, 0)]}[bits]
    out = np.zeros((rows, padded), dtype=np.int64)
    shift = 0
    for width, offset in planes:
        plane = qweight[:, offset:offset + padded * width // 8]
        bits_lsb_first = np.unpackbits(plane, axis=1, bitorder="little").reshape(rows, padded, width)
        field = (bits_lsb_first.astype(np.int64) << np.arange(width)).sum(axis=2)
        out |= field << shift
        shift += width
    assert not out[:, cols:].any(), "padding indices must be zero"
    return out[:, :cols]


def dequantize(tensors, base, meta):
    rows, cols, bits, group = meta["rows"], meta["cols"], meta["bits"], meta["group_size"]
    idx = unpack_indices(tensors[base + ".qweight"], cols, bits)
    lut = tensors[base + ".lut"].astype(np.float32)
    assert lut.shape == (rows, cols // group, 2 ** bits)
    groups = np.arange(cols) // group
    dense = lut[np.arange(rows)[:, None], groups[None, :], idx]
    sparse = np.zeros((rows, cols), dtype=np.float32)
    if meta["nnz"]:
        ptr = tensors[base + ".sparse_row_ptr"]
        col = tensors[base + ".sparse_col_idx"].astype(np.int64)
        val = tensors[base + ".sparse_values"].astype(np.float32)
        assert ptr[0] == 0 and ptr[-1] == meta["nnz"] == len(val)
        for r in range(rows):
            sparse[r, col[ptr[r]:ptr[r + 1]]] = val[ptr[r]:ptr[r + 1]]
    return dense + sparse, sparse


def load_output(out_dir):
    """All tensors and the merged quantization_config of a (possibly sharded) output directory."""
    index = out_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors, layers = {}, {}
    for f in files:
        tensors.update(load_file(str(out_dir / f)))
        config = json.loads(safetensors_metadata(out_dir / f)["quantization_config"])
        assert config["format_version"] == 1 and config["quant_method"] == "nuq"
        layers.update(config["layers"])
    return tensors, layers


# ---- synthetic checkpoints ------------------------------------------------------------------------------

DIM, HIDDEN, VOCAB = 128, 320, 96
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]


def proj_shape(p):
    return {"mlp.gate_proj": (HIDDEN, DIM), "mlp.up_proj": (HIDDEN, DIM), "mlp.down_proj": (DIM, HIDDEN)}.get(p, (DIM, DIM))


def llama_tensors(layers=2, seed=0, heavy_tails=True):
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, DIM)).astype(np.float32),
         "model.norm.weight": np.ones(DIM, np.float32), "lm_head.weight": rng.standard_normal((VOCAB, DIM)).astype(np.float16)}
    for i in range(layers):
        t[f"model.layers.{i}.input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(DIM, np.float32)
        for p in PROJ:
            w = rng.standard_t(4, proj_shape(p)) if heavy_tails else rng.standard_normal(proj_shape(p))
            t[f"model.layers.{i}.{p}.weight"] = (0.02 * w).astype(np.float32 if i % 2 == 0 else np.float16)
    return t


def write_checkpoint(tmp_path, tensors, name="in"):
    d = tmp_path / name
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": DIM}))
    return d


def quantized_names(tensors):
    return sorted(n[:-len(".weight")] for n in tensors if ".layers." in n and any(p in n for p in PROJ))


# ---- tests ----------------------------------------------------------------------------------------------

def test_a_broken_config_json_is_refused_before_any_work(nuq_cli, tmp_path):
    inp = write_checkpoint(tmp_path, llama_tensors())
    (inp / "config.json").write_text('{"model_type": "llama", ')  # truncated
    out = tmp_path / "out"
    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", 3)
    assert r.returncode != 0
    assert f"{inp / 'config.json'}: not a JSON object" in r.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_default_rule_packs_projections_and_keeps_the_rest(nuq_cli, tmp_path, bits):
    src = llama_tensors()
    inp = write_checkpoint(tmp_path, src)
    out = tmp_path / "out"
    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", bits, "--sparse", "0.45%")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "quant_report.json"]
    tensors, layers = load_output(out)
    assert sorted(layers) == quantized_names(src)
    # config.json: the input's keys, plus the quantization_config transformers reads (the metadata's
    # layers, and the summary: uniform bits, one codebook per row, the share of sparse values).
    config = json.loads((out / "config.json").read_text())
    quantization = config.pop("quantization_config")
    assert config == json.loads((inp / "config.json").read_text())
    assert quantization["layers"] == layers and quantization["quant_method"] == "nuq"
    assert quantization["bits"] == bits and quantization["group_size"] == 0
    assert quantization["sparse_fraction"] == pytest.approx(
        sum(m["nnz"] for m in layers.values()) / sum(m["rows"] * m["cols"] for m in layers.values()))
    for name, value in src.items():
        base = name[:-len(".weight")]
        if base in layers:
            assert name not in tensors
            continue
        assert tensors[name].dtype == value.dtype and np.array_equal(tensors[name], value), name
    report = {l["base"]: l for l in json.loads((out / "quant_report.json").read_text())["layers"]}
    total_bytes = total_weights = 0
    for base, meta in layers.items():
        w = src[base + ".weight"].astype(np.float32)
        assert (meta["rows"], meta["cols"], meta["bits"]) == (*w.shape, bits)
        assert meta["group_size"] == w.shape[1] and meta["method"] == "nuq"
        assert meta["source_dtype"] == {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[src[base + ".weight"].dtype]
        deq, sparse = dequantize(tensors, base, meta)
        kept = sparse != 0
        err = deq - w
        # The report's figures are what an independent decoder measures.
        assert report[base]["mse"] == pytest.approx(float(np.mean(err.astype(np.float64) ** 2)), rel=1e-5)
        assert report[base]["max_abs_error"] == pytest.approx(float(np.abs(err).max()), rel=1e-5)
        # Kept weights are reproduced to fp16 precision: the stored residual is rounded once (half an fp16
        # ulp of the residual), and the fp32 sum once more.
        assert kept.sum() == meta["nnz"] > 0
        bound = np.abs(sparse[kept]) * 2.0 ** -11 + np.abs(w[kept]) * 2.0 ** -23 + 2.0 ** -25
        assert np.all(np.abs(err[kept]) <= bound)
        assert np.abs(err[kept]).max() < 0.01 * np.abs(err[~kept]).max()
        # 0.45% of each matrix, chosen by magnitude: every kept weight is at least as large as every other.
        assert meta["nnz"] == round(0.0045 * w.size)
        assert np.abs(w[kept]).min() >= np.abs(w[~kept]).max()
        # Quality: 2^bits non-uniform levels beat the uniform grid over the same range by a clear margin.
        rel = np.mean(err ** 2) / np.var(w)
        assert rel < {2: 0.13, 3: 0.04, 4: 0.011}[bits], (base, rel)
        nbytes = sum(tensors[base + s].nbytes for s in [".qweight", ".lut", ".sparse_row_ptr", ".sparse_col_idx", ".sparse_values"])
        assert report[base]["bits_per_weight"] == pytest.approx(8 * nbytes / w.size)
        total_bytes += nbytes
        total_weights += w.size
    assert json.loads((out / "quant_report.json").read_text())["average_bits_per_weight"] == pytest.approx(8 * total_bytes / total_weights)
    check = run(nuq_cli, "inspect", "--check", out)
    assert check.returncode == 0, check.stderr


def test_progress_lines_summary_and_quiet(nuq_cli, tmp_path):
    inp = write_checkpoint(tmp_path, llama_tensors(layers=1))
    r = run(nuq_cli, "quantize", inp, "--out", tmp_path / "a", "--bits", "3")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("[")]
    assert len(lines) == 7 and lines[0].startswith("[1/7] model.layers.0.") and "bits/weight" in lines[0]
    assert "quantized 7 layers" in r.stdout and "copied 5 tensors" in r.stdout
    q = run(nuq_cli, "quantize", inp, "--out", tmp_path / "b", "--bits", "3", "--quiet")
    assert q.returncode == 0 and q.stderr == "" and "quantized 7 layers" in q.stdout


def test_include_exclude_and_plan(nuq_cli, tmp_path):
    src = llama_tensors()
    inp = write_checkpoint(tmp_path, src)
    out = tmp_path / "ie"
    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", 4, "--include", r"embed_tokens|layers\.\d\.mlp",
            "--exclude", r"layers\.1\.", "--exclude", "down_proj")
    assert r.returncode == 0, r.stderr
    tensors, layers = load_output(out)
    assert sorted(layers) == ["model.embed_tokens", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert np.array_equal(tensors["model.layers.1.mlp.up_proj.weight"], src["model.layers.1.mlp.up_proj.weight"])

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {
        "model.layers.0.self_attn.q_proj": {"bits": 2},
        "model.layers.1.mlp.down_proj.weight": {"method": "rtn", "group_size": 64, "outlier_fraction": 0.01},
        "lm_head": {"bits": 4}}}))
    out = tmp_path / "plan"
    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", 3, "--plan", plan)
    assert r.returncode == 0, r.stderr
    tensors, layers = load_output(out)
    assert layers["model.layers.0.self_attn.q_proj"]["bits"] == 2
    down = layers["model.layers.1.mlp.down_proj"]
    assert (down["method"], down["bits"], down["group_size"], down["nnz"]) == ("rtn", 3, 64, round(0.01 * DIM * HIDDEN))
    assert layers["lm_head"]["bits"] == 4  # a plan may quantize what the default rule keeps
    assert layers["model.layers.1.mlp.up_proj"]["bits"] == 3
    # RTN's codebook is an evenly spaced grid per group of 64 columns.
    lut = tensors["model.layers.1.mlp.down_proj.lut"].astype(np.float64)
    assert lut.shape == (DIM, HIDDEN // 64, 8)
    steps = np.diff(lut, axis=2)
    assert np.all(np.abs(steps - steps[..., :1]) <= np.abs(lut).max(axis=2, keepdims=True) * 2.0 ** -9 + 1e-8)  # 4 fp16 roundings

    for bad, fragment in [({"layers": {"model.layers.7.mlp.up_proj": {"bits": 3}}}, "model.layers.7.mlp.up_proj"),
                          ({"layers": {"lm_head": {"bitz": 3}}}, "unknown setting \"bitz\""),
                          ({"layers": {"lm_head": {"bits": 5}}}, "\"bits\" is 5"),
                          ({"layers": {"model.norm.weight": {"bits": 3}}}, "only 2-D")]:
        plan.write_text(json.dumps(bad))
        r = run(nuq_cli, "quantize", inp, "--out", tmp_path / "bad", "--bits", 3, "--plan", plan)
        assert_error(r, fragment)
        assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_fisher_weighting_and_its_errors(nuq_cli, tmp_path):
    src = llama_tensors(layers=1)
    inp = write_checkpoint(tmp_path, src)
    rng = np.random.default_rng(1)
    fisher = {n: (rng.random(v.shape) ** 8).astype(np.float32) for n, v in src.items()
              if n.endswith("_proj.weight") and "v_proj" not in n}
    fpath = tmp_path / "fisher.safetensors"
    save_file(fisher, str(fpath))
    out = tmp_path / "f"
    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", 3, "--sparse", "0.45%", "--fisher", fpath)
    assert r.returncode == 0, r.stderr
    assert "nuq: warning:" in r.stderr and "model.layers.0.self_attn.v_proj.weight" in r.stderr
    report = {l["base"]: l for l in json.loads((out / "quant_report.json").read_text())["layers"]}
    assert report["model.layers.0.self_attn.v_proj"]["sensitivity"] == "missing"
    plain = tmp_path / "plain"
    assert run(nuq_cli, "quantize", inp, "--out", plain, "--bits", 3, "--sparse", "0.45%").returncode == 0
    tensors, layers = load_output(out)
    plain_tensors, plain_layers = load_output(plain)
    for base, rec in report.items():
        if rec["sensitivity"] != "fisher":
            continue
        w = src[base + ".weight"].astype(np.float32)
        s = fisher[base + ".weight"]
        assert rec["sensitive"] == round(0.0005 * w.size) and rec["outliers"] == round(0.004 * w.size)
        deq, sparse = dequantize(tensors, base, layers[base])
        # The most sensitive weights are among the kept ones.
        top = np.argsort(-s, axis=None, kind="stable")[:rec["sensitive"]]
        assert (sparse != 0).reshape(-1)[top].all()
        weighted = float(np.sum(s * (deq - w) ** 2) / np.sum(s))
        assert rec["weighted_mse"] == pytest.approx(weighted, rel=1e-4)
        # Weighting pays off where it is measured: a lower sensitivity-weighted error than without --fisher.
        plain_deq, _ = dequantize(plain_tensors, base, plain_layers[base])
        assert weighted < float(np.sum(s * (plain_deq - w) ** 2) / np.sum(s)), base

    # One sensitivity per input column (activation statistics) applies to every row.
    cols = {n: rng.random(v.shape[1]).astype(np.float32) ** 4 for n, v in src.items() if n.endswith("_proj.weight")}
    save_file(cols, str(fpath))
    out_c = tmp_path / "c"
    r = run(nuq_cli, "quantize", inp, "--out", out_c, "--bits", 3, "--fisher", fpath)
    assert r.returncode == 0, r.stderr
    tensors_c, layers_c = load_output(out_c)
    rep_c = {l["base"]: l for l in json.loads((out_c / "quant_report.json").read_text())["layers"]}
    base = "model.layers.0.mlp.down_proj"
    w = src[base + ".weight"].astype(np.float32)
    s_full = np.broadcast_to(cols[base + ".weight"], w.shape)
    deq, _ = dequantize(tensors_c, base, layers_c[base])
    assert rep_c[base]["sensitivity"] == "fisher"
    assert rep_c[base]["weighted_mse"] == pytest.approx(float(np.sum(s_full * (deq - w) ** 2) / np.sum(s_full)), rel=1e-4)
    cols["model.layers.0.mlp.up_proj.weight"] = np.ones(HIDDEN, np.float32)  # rows, not columns
    save_file(cols, str(fpath))
    r = run(nuq_cli, "quantize", inp, "--out", tmp_path / "c2", "--bits", 3, "--fisher", fpath)
    assert_error(r, "model.layers.0.mlp.up_proj.weight", f"[{HIDDEN}]", f"[{DIM}]")

    bad = dict(fisher)
    bad["model.layers.0.mlp.up_proj.weight"] = np.ones((DIM, HIDDEN), np.float32)
    save_file(bad, str(fpath))
    r = run(nuq_cli, "quantize", inp, "--out", tmp_path / "g", "--bits", 3, "--fisher", fpath)
    assert_error(r, "model.layers.0.mlp.up_proj.weight", f"[{DIM}, {HIDDEN}]", f"[{HIDDEN}, {DIM}]")
    for value, word in [(np.nan, "nan"), (-0.5, "-0.5"), (np.inf, "inf")]:
        bad = dict(fisher)
        arr = bad["model.layers.0.mlp.up_proj.weight"].copy()
        arr[3, 5] = value
        bad["model.layers.0.mlp.up_proj.weight"] = arr
        save_file(bad, str(fpath))
        r = run(nuq_cli, "quantize", inp, "--out", tmp_path / "g", "--bits", 3, "--fisher", fpath)
        assert_error(r, "model.layers.0.mlp.up_proj.weight", "[3, 5]", word)
        assert not (tmp_path / "g" / "model.safetensors").exists()


def test_bad_weights_and_dtypes_are_named(nuq_cli, tmp_path):
    src = llama_tensors(layers=1)
    src["model.layers.0.mlp.up_proj.weight"][7, 11] = np.nan
    inp = write_checkpoint(tmp_path, src)
    r = run(nuq_cli, "quantize", inp, "--out", tmp_path / "o", "--bits", 3)
    assert_error(r, "model.layers.0.mlp.up_proj.weight", "[7, 11]", "nan")
    assert not (tmp_path / "o" / "model.safetensors").exists()
    # The layers finished before the bad one are kept for a resume after the input is fixed.
    assert any(n.startswith("layer-") for n in os.listdir(tmp_path / "o" / ".nuq-partial"))

    src_inf = llama_tensors(layers=1)
    src_inf["model.layers.0.self_attn.k_proj.weight"][2, 3] = -np.inf
    r = run(nuq_cli, "quantize", write_checkpoint(tmp_path, src_inf, "inf"), "--out", tmp_path / "oi", "--bits", 3)
    assert_error(r, "model.layers.0.self_attn.k_proj.weight", "[2, 3]", "inf")
    assert not (tmp_path / "oi" / "model.safetensors").exists()

    ints = {"model.layers.0.ids.weight": np.arange(64 * 64, dtype=np.int32).reshape(64, 64)}
    inp2 = write_checkpoint(tmp_path, ints, "ints")
    r = run(nuq_cli, "quantize", inp2, "--out", tmp_path / "o2", "--bits", 3, "--include", "ids")
    assert_error(r, "model.layers.0.ids.weight", "I32")
    r = run(nuq_cli, "quantize", inp2, "--out", tmp_path / "o2", "--bits", 3)
    assert_error(r, "no tensor selected")
    r = run(nuq_cli, "quantize", inp, "--out", tmp_path / "o3", "--bits", 5)
    assert r.returncode != 0 and not (tmp_path / "o3").exists()
    r = run(nuq_cli, "quantize", inp, "--out", tmp_path / "o3", "--bits", 3, "--sparse", "abc")
    assert_error(r, "--sparse")
    r = run(nuq_cli, "quantize", inp, "--out", tmp_path / "o3", "--bits", 3, "--include", "(")
    assert_error(r, "--include")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes((inp / "model.safetensors").read_bytes()[:5000])
    r = run(nuq_cli, "quantize", truncated, "--out", tmp_path / "o4", "--bits", 3)
    assert_error(r, "trunc.safetensors")


def test_refuses_to_clobber_and_checks_resumed_settings(nuq_cli, tmp_path):
    inp = write_checkpoint(tmp_path, llama_tensors(layers=1))
    out = tmp_path / "o"
    assert run(nuq_cli, "quantize", inp, "--out", out, "--bits", 3).returncode == 0
    before = (out / "model.safetensors").read_bytes()
    assert_error(run(nuq_cli, "quantize", inp, "--out", out, "--bits", 4), "--force")
    assert (out / "model.safetensors").read_bytes() == before
    assert_error(run(nuq_cli, "quantize", inp, "--out", inp, "--bits", 4), "holds the input")
    # Unfinished work from other settings is never mixed in.
    partial = out / ".nuq-partial"
    partial.mkdir()
    (partial / "job.json").write_text(json.dumps({"partial_version": 1, "layers": []}))
    (partial / "layer-00000.safetensors").write_bytes(b"finished work of another job")
    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", 4, "--force")
    assert_error(r, "--restart")
    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", 4, "--force", "--restart")
    assert r.returncode == 0, r.stderr
    _, layers = load_output(out)
    assert {m["bits"] for m in layers.values()} == {4}
    assert not partial.exists()


def test_full_disk_loses_nothing_and_resumes(nuq_cli, tmp_path):
    inp = write_checkpoint(tmp_path, llama_tensors())
    out = tmp_path / "o"
    assert run(nuq_cli, "quantize", inp, "--out", out, "--bits", 2).returncode == 0
    before = (out / "model.safetensors").read_bytes()
    ref = tmp_path / "ref"
    assert run(nuq_cli, "quantize", inp, "--out", ref, "--bits", 3, "--sparse", "1%").returncode == 0
    # Room for the small per-layer files but not for the assembled checkpoint.
    limit = len(before) // 3

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", 3, "--sparse", "1%", "--force", preexec_fn=small_disk)
    assert_error(r, "model.safetensors")
    assert "File too large" in r.stderr or "No space" in r.stderr
    # The previous checkpoint is untouched and no stray temporary file remains next to it.
    assert (out / "model.safetensors").read_bytes() == before
    assert not [n for n in os.listdir(out) if ".tmp." in n]
    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", 3, "--sparse", "1%", "--force")
    assert r.returncode == 0, r.stderr
    assert "14 layers resumed" in r.stdout
    for f in ["model.safetensors", "quant_report.json"]:
        assert (out / f).read_bytes() == (ref / f).read_bytes()


def test_too_little_disk_is_refused_before_any_work(nuq_cli, tmp_path, small_disk):
    inp = write_checkpoint(tmp_path, llama_tensors())
    out = small_disk / "o"  # 64 KiB: the checkpoint needs several times that
    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", 3, "--sparse", "1%")
    assert_error(r, "quantizing needs about")
    assert re.search(r"only \d+\.\d KiB are free; nothing was written", r.stderr), r.stderr
    assert "14 layer files still to write" in r.stderr
    assert not (out / ".nuq-partial").exists() or not [n for n in os.listdir(out / ".nuq-partial")
                                                        if n.startswith("layer-")]
    assert not (out / "model.safetensors").exists()
    # With room, the same command runs and reports what it expects to write.
    r = run(nuq_cli, "quantize", inp, "--out", tmp_path / "o", "--bits", 3, "--sparse", "1%")
    assert r.returncode == 0, r.stderr
    assert re.search(r"writes up to 0\.\d MiB, \d+\.\d\d GiB free", r.stderr), r.stderr


def test_sharded_output_and_switching_back(nuq_cli, tmp_path):
    src = llama_tensors(layers=3)
    inp = write_checkpoint(tmp_path, src)
    out = tmp_path / "o"
    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", 3, "--sparse", "0.45%", "--max-shard-size", "60kB")
    assert r.returncode == 0, r.stderr
    shards = sorted(n for n in os.listdir(out) if n.startswith("model-"))
    assert len(shards) > 2 and all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    tensors, layers = load_output(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert sorted(json.loads(index["metadata"]["quantization_config"])["layers"]) == sorted(layers) == quantized_names(src)
    for shard in shards:
        here = load_file(str(out / shard))
        for base in json.loads(safetensors_metadata(out / shard)["quantization_config"])["layers"]:
            assert base + ".qweight" in here and base + ".lut" in here  # a layer never straddles files
        assert sum(t.nbytes for t in here.values()) <= 60_000 or len(here) <= 5
    unsharded = tmp_path / "u"
    assert run(nuq_cli, "quantize", inp, "--out", unsharded, "--bits", 3, "--sparse", "0.45%").returncode == 0
    t2, _ = load_output(unsharded)
    assert t2.keys() == tensors.keys() and all(np.array_equal(t2[k], tensors[k]) for k in t2)
    assert run(nuq_cli, "inspect", "--check", out).returncode == 0
    r = run(nuq_cli, "quantize", inp, "--out", out, "--bits", 3, "--sparse", "0.45%", "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "quant_report.json"]
    assert (out / "model.safetensors").read_bytes() == (unsharded / "model.safetensors").read_bytes()


def test_sigkill_at_any_moment_then_resume_is_byte_identical(nuq_cli, tmp_path):
    # Big enough that quantizing takes seconds and assembly copies a sizeable embedding.
    rng = np.random.default_rng(7)
    src = {"model.embed_tokens.weight": rng.standard_normal((8192, 1024)).astype(np.float32)}
    for i in range(16):
        src[f"model.layers.{i}.mlp.up_proj.weight"] = (0.02 * rng.standard_t(4, (768, 1024))).astype(np.float32)
    inp = write_checkpoint(tmp_path, src)
    args = ["quantize", str(inp), "--bits", "4", "--sparse", "0.45%", "--max-shard-size", "12MB", "--quiet"]
    ref = tmp_path / "ref"
    assert run(nuq_cli, *args, "--out", ref, "--threads", "2").returncode == 0
    out = tmp_path / "o"
    partial = out / ".nuq-partial"

    def layers_done():
        try:
            return sum(n.startswith("layer-") for n in os.listdir(partial))
        except FileNotFoundError:
            return 0

    def assembling():
        try:
            return any(n.startswith(("model", ".model")) for n in os.listdir(out))
        except FileNotFoundError:
            return False

    # Killed after a few layers, mid-way, and while the output files are being written.
    moments = [lambda: layers_done() >= 3, lambda: layers_done() >= 10, assembling]
    kills = 0
    for k, moment in enumerate(moments):
        p = subprocess.Popen([str(nuq_cli), *args, "--out", str(out), "--threads", str(1 + k % 2)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and not moment():
            time.sleep(0.001)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 2
    r = run(nuq_cli, *args, "--out", out)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    for f in os.listdir(ref):
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f


def test_smollm2_gguf_first_block(nuq_cli, models_dir, tmp_path):
    gguf_path = models_dir / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf_path.exists():
        pytest.skip(f"{gguf_path} is absent: run scripts/fetch-models.sh")
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "smol"
    r = run(nuq_cli, "quantize", gguf_path, "--out", out, "--bits", 4, "--sparse", "0.45%", "--include", r"^blk\.0\.")
    assert r.returncode == 0, r.stderr
    tensors, layers = load_output(out)
    assert sorted(layers) == sorted(f"blk.0.{n}" for n in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"])
    meta = json.loads(safetensors_metadata(out / "model.safetensors")["gguf_metadata"])
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    reader = gguf.GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    for name in ["token_embd.weight", "blk.1.ffn_up.weight", "blk.0.attn_norm.weight"]:
        t = by_name[name]
        want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tensors[name].shape)
        assert np.array_equal(tensors[name], want), name
    for base, m in layers.items():
        t = by_name[base + ".weight"]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(m["rows"], m["cols"])
        deq, _ = dequantize(tensors, base, m)
        assert m["source_dtype"] == "Q4_1"
        assert np.mean((deq - w) ** 2) / np.var(w) < 0.02, base
