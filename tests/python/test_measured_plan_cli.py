"""`nuq plan --text` (measured sensitivity, --omega kl, and the search) on the real stories260K.

The table's KL is recomputed with the independent NumPy decoder of test_llama.py from the packed candidate
the table stores, which must be the layer `nuq quantize` produces; the table must come out byte-identical
after a SIGKILL and a resumed run; and the plan's measured divergences, its budget and the search's
acceptance rule are checked from the files `nuq quantize --plan` then writes."""
import json
import signal
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_llama import numpy_logits, read_llama2c
from test_quantize_cli import dequantize, load_output, run
from conftest import find_binary

CTX = 64


@pytest.fixture(scope="module")
def s260(nuq_cli, shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("s260")
    r = run(nuq_cli, "convert", shared_data / "stories260K.bin", "--out", d / "hf")
    assert r.returncode == 0, r.stderr
    text = d / "calib.txt"
    text.write_text((shared_data / "tinystories_valid.txt").read_text()[200000:212000])
    r = run(find_binary("examples/nuq_generate"), "--tokenizer", shared_data / "tok512.bin", "--tokenize", text)
    assert r.returncode == 0, r.stderr
    ids = [int(t) for t in r.stdout.split()]
    return {"hf": d / "hf", "text": text, "ids": ids, "tok": shared_data / "tok512.bin"}


def plan_args(s, out, table, *extra):
    return ["plan", "--model", s["hf"], "--tokenizer", s["tok"], "--text", s["text"], "--ctx", CTX,
            "--table-windows", 2, "--table", table, "--out", out, "--threads", 2, *extra]


def windows(ids, first, count):
    per = CTX - 1
    out = []
    for w in range(first, first + count):
        chunk = ids[w * per:(w + 1) * per]
        out.append(([1] + chunk[:-1], chunk))
    return out


def reference_log_probs(ref, cfg, wins):
    return [log_softmax(numpy_logits(ref, cfg, inputs)) for inputs, _ in wins]


def numpy_divergence(ref_lp, model, cfg, wins):
    kl = nll = n = 0.0
    for lp, (inputs, targets) in zip(ref_lp, wins):
        lq = log_softmax(numpy_logits(model, cfg, inputs))
        kl += float((np.exp(lp) * (lp - lq)).sum())
        nll -= float(lq[np.arange(len(targets)), targets].sum())
        n += len(targets)
    return kl / n, nll / n


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def table_meta(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(json.loads(f.read(n))["__metadata__"]["nuq_stats"])


HF_TO_NUMPY = {"mlp.down_proj": "down", "mlp.gate_proj": "gate", "mlp.up_proj": "up", "self_attn.v_proj": "v",
               "self_attn.o_proj": "o"}  # q and k are permuted by `nuq convert`; the NumPy model keeps llama2.c's rows


def test_table_kl_is_the_output_divergence_of_that_layer_alone(nuq_cli, shared_data, s260, tmp_path):
    table = tmp_path / "kl.safetensors"
    r = run(nuq_cli, *plan_args(s260, tmp_path / "p.json", table, "--budget", "4.78bpw", "--generations", 0,
                                "--validation-windows", 0, "--quiet"))
    assert r.returncode == 0, r.stderr
    meta = table_meta(table)
    assert meta["kind"] == "kl" and meta["positions"] == 2 * (CTX - 1)
    assert len(meta["layers"]) == 35 and len(meta["candidates"]) == 6  # bits 2/3/4 × sparse 0/0.45%
    tensors = load_file(str(table))
    ref, cfg = read_llama2c(shared_data / "stories260K.bin")
    wins = windows(s260["ids"], 0, 2)
    ref_lp = reference_log_probs(ref, cfg, wins)
    _, ref_nll = numpy_divergence(ref_lp, ref, cfg, wins)
    checked = 0
    for layer in meta["layers"]:
        base = layer["name"][:-len(".weight")]
        i, kind = int(base.split(".")[2]), ".".join(base.split(".")[3:])
        if i != 3 or kind not in HF_TO_NUMPY:
            continue
        for k, c in enumerate(layer["candidates"]):
            config = meta["candidates"][c["config"]]
            if config["bits"] == 4:
                continue
            cb = f"{base}.candidate{c['config']}"
            q, _ = dequantize(tensors, cb, {"rows": layer["rows"], "cols": layer["cols"], "bits": c["bits"],
                                            "group_size": c["group_size"], "nnz": c["nnz"]})
            model = {**ref, "layers": [dict(l) for l in ref["layers"]]}
            model["layers"][i][HF_TO_NUMPY[kind]] = q.astype(np.float64)
            kl, nll = numpy_divergence(ref_lp, model, cfg, wins)
            assert tensors[base + ".kl"][k] == pytest.approx(kl, rel=2e-3, abs=1e-7), (base, config)
            assert tensors[base + ".nll"][k] == pytest.approx(nll - ref_nll, rel=2e-3, abs=2e-6), (base, config)
            checked += 1
    assert checked == 5 * 4  # five kinds of layer 3, bits 2 and 3 with and without the sparse part

    # The stored candidate is the layer `nuq quantize` makes with the same settings.
    out = tmp_path / "q"
    r = run(nuq_cli, "quantize", s260["hf"], "--out", out, "--bits", 2, "--sparse", "0.45%",
            "--include", r"model\.layers\.3\.mlp\.down_proj", "--quiet")
    assert r.returncode == 0, r.stderr
    got, layers = load_output(out)
    config = next(i for i, c in enumerate(meta["candidates"]) if c["bits"] == 2 and c["outlier_fraction"] > 0)
    for suffix in ("qweight", "lut", "sparse_row_ptr", "sparse_col_idx", "sparse_values"):
        np.testing.assert_array_equal(got[f"model.layers.3.mlp.down_proj.{suffix}"],
                                      tensors[f"model.layers.3.mlp.down_proj.candidate{config}.{suffix}"])


def test_table_is_reproducible_and_resumes_to_the_same_bytes(nuq_cli, s260, tmp_path):
    args = ["--budget", "4.78bpw", "--generations", 0, "--validation-windows", 0]
    r = run(nuq_cli, *plan_args(s260, tmp_path / "a.json", tmp_path / "a.safetensors", *args, "--quiet"))
    assert r.returncode == 0, r.stderr
    second = tmp_path / "b.safetensors"
    cmd = [str(a) for a in [nuq_cli, *plan_args(s260, tmp_path / "b.json", second, *args)]]
    partial = tmp_path / "b.safetensors.partial"
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("layer-*.safetensors"))) < 6:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert partial.is_dir() and not second.exists()
    finished = len(list(partial.glob("layer-*.safetensors")))
    assert 6 <= finished < 35
    r = run(nuq_cli, *plan_args(s260, tmp_path / "b.json", second, *args))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("resumed") == finished
    assert second.read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    assert not partial.exists()
    # The same inputs again: the table is reused, not measured.
    r = run(nuq_cli, *plan_args(s260, tmp_path / "b.json", second, *args))
    assert r.returncode == 0 and "reusing table" in r.stdout


def test_plan_budget_report_and_search_acceptance(nuq_cli, shared_data, s260, tmp_path):
    table = tmp_path / "kl.safetensors"
    knapsack, searched = tmp_path / "k.json", tmp_path / "s.json"
    common = ["--budget", "4.5bpw", "--validation-windows", 3]
    r = run(nuq_cli, *plan_args(s260, knapsack, table, *common, "--generations", 0, "--quiet"))
    assert r.returncode == 0, r.stderr
    r = run(nuq_cli, *plan_args(s260, searched, table, *common, "--generations", 6, "--offspring", 4, "--seed", 3))
    assert r.returncode == 0, r.stderr
    assert "predicted (Σ of the table) vs measured (whole model)" in r.stdout
    k, s = json.loads(knapsack.read_text()), json.loads(searched.read_text())
    search = s["nuq_plan"]["search"]
    assert search["generations"] == 6
    plans = {m["plan"]: m for m in s["nuq_plan"]["measured"]["plans"]}
    assert search["start_kl"] == plans["knapsack"]["kl"] and search["search_kl"] == plans["search"]["kl"]
    # The search's plan is written only when the whole model measurably diverges less with it.
    assert search["accepted"] == (search["search_kl"] < search["start_kl"])
    if search["accepted"]:
        assert s["nuq_plan"]["bytes"] == plans["search"]["bytes"]
    else:
        assert s["layers"] == k["layers"]

    # What `nuq quantize --plan` stores is within the budget, of the plan's size, and diverges from the
    # reference as measured (NumPy decoder on the validation windows, which follow the table's two).
    out = tmp_path / "q"
    r = run(nuq_cli, "quantize", s260["hf"], "--out", out, "--bits", 3, "--plan", searched, "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "quant_report.json").read_text())
    assert report["quantized_bytes"] == s["nuq_plan"]["bytes"] <= s["nuq_plan"]["budget_bytes"]
    assert report["average_bits_per_weight"] <= 4.5
    tensors, layers = load_output(out)
    ref, cfg = read_llama2c(shared_data / "stories260K.bin")
    model = {**ref, "layers": [dict(l) for l in ref["layers"]]}
    for base, meta in layers.items():
        i, kind = int(base.split(".")[2]), ".".join(base.split(".")[3:])
        if kind in HF_TO_NUMPY:
            model["layers"][i][HF_TO_NUMPY[kind]] = dequantize(tensors, base, meta)[0].astype(np.float64)
        else:  # q/k: undo `nuq convert`'s permutation of each head's rows to the half-split layout
            q = dequantize(tensors, base, meta)[0].astype(np.float64)
            hd = cfg["head_dim"]
            back = np.empty_like(q)
            for h in range(q.shape[0] // hd):
                rows = q[h * hd:(h + 1) * hd]
                back[h * hd:(h + 1) * hd][0::2], back[h * hd:(h + 1) * hd][1::2] = rows[:hd // 2], rows[hd // 2:]
            model["layers"][i][kind.split(".")[1][0]] = back
    wins = windows(s260["ids"], 2, 3)
    kl, nll = numpy_divergence(reference_log_probs(ref, cfg, wins), model, cfg, wins)
    chosen = plans["search"] if search["accepted"] else plans["knapsack"]
    assert chosen["kl"] == pytest.approx(kl, rel=2e-3)
    assert chosen["nll"] == pytest.approx(nll, rel=1e-4)


def test_measured_plan_errors(nuq_cli, s260, tmp_path):
    r = run(nuq_cli, "plan", "--model", s260["hf"], "--omega", "kl", "--budget", "4bpw", "--out", tmp_path / "p.json")
    assert r.returncode == 1 and "needs a measured table" in r.stderr
    r = run(nuq_cli, *plan_args(s260, tmp_path / "p.json", tmp_path / "t.safetensors", "--budget", "4bpw",
                                "--omega", "fisher"))
    assert r.returncode == 1 and "--omega kl" in r.stderr
    r = run(nuq_cli, *plan_args(s260, tmp_path / "p.json", tmp_path / "t.safetensors", "--budget", "1bpw",
                                "--generations", 0, "--validation-windows", 0, "--quiet"))
    assert r.returncode == 1 and "infeasible" in r.stderr
    assert not (tmp_path / "p.json").exists()
