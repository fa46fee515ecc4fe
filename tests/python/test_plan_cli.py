"""`nuq plan` and `nuq stats merge` end to end on synthetic LLaMA-named checkpoints.

The plan is applied with `nuq quantize --plan`, and its outcome is judged from the quantized files with
the independent NumPy decoder of test_quantize_cli.py: the achieved bits/weight (quant_report.json) must
meet the budget, and the Fisher-weighted error Σ F·(W - Ŵ)² must be no larger than that of any uniform
configuration of no greater size."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from test_quantize_cli import assert_error, dequantize, load_output, run

# Wide enough rows that per-row codebooks cost little, so 2/3/4-bit candidates straddle ~3.3 bits/weight.
DIM, HIDDEN = 512, 1024
PROJ = {"self_attn.q_proj": (DIM, DIM), "self_attn.o_proj": (DIM, DIM), "mlp.up_proj": (HIDDEN // 4, DIM),
        "mlp.down_proj": (DIM // 4, HIDDEN)}


def checkpoint(tmp_path, layers=2):
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((64, DIM)).astype(np.float32),
         "model.norm.weight": np.ones(DIM, np.float32)}
    fisher = {}
    for i in range(layers):
        for p, shape in PROJ.items():
            # Layers differ in scale and in sensitivity, so a good plan is not uniform.
            w = 0.02 * (1 + 2 * i) * rng.standard_t(5, shape)
            t[f"model.layers.{i}.{p}.weight"] = w.astype(np.float32 if p.startswith("self") else np.float16)
            fisher[f"model.layers.{i}.{p}.weight"] = (rng.chisquare(2, shape) * (10.0 if "down" in p else 1.0)).astype(np.float32)
    d = tmp_path / "in"
    d.mkdir()
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    meta = {"kind": "fisher", "version": 1, "value": "mean", "counts": {k: 4 for k in fisher}}
    save_file(fisher, str(tmp_path / "fisher.safetensors"), metadata={"nuq_stats": json.dumps(meta)})
    return d, t, fisher


def fisher_omega(out_dir, weights, fisher):
    tensors, layers = load_output(out_dir)
    total = 0.0
    for base, meta in layers.items():
        w = weights[base + ".weight"].astype(np.float64)
        q, _ = dequantize(tensors, base, meta)
        total += float((fisher[base + ".weight"].astype(np.float64) * (w - q) ** 2).sum())
    return total


def report(out_dir):
    return json.loads((out_dir / "quant_report.json").read_text())


def test_plan_meets_budget_and_beats_uniform_configs(nuq_cli, tmp_path):
    src, weights, fisher = checkpoint(tmp_path)
    plan_path = tmp_path / "plan.json"
    r = run(nuq_cli, "plan", "--model", src, "--stats", tmp_path / "fisher.safetensors", "--budget", "3.3bpw",
            "--out", plan_path, "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "Pareto frontier" in r.stdout and "wrote" in r.stdout
    assert r.stderr.count("model.layers.") == 8  # one progress line per planned layer
    plan = json.loads(plan_path.read_text())
    assert sorted(plan["layers"]) == sorted(k[:-len(".weight")] for k in fisher)
    assert len({json.dumps(e, sort_keys=True) for e in plan["layers"].values()}) > 1  # mixed precision

    out = tmp_path / "q"
    r = run(nuq_cli, "quantize", src, "--out", out, "--bits", "3", "--plan", plan_path,
            "--fisher", tmp_path / "fisher.safetensors", "--quiet")
    assert r.returncode == 0, r.stderr
    rep = report(out)
    assert rep["average_bits_per_weight"] <= 3.3
    assert rep["quantized_bytes"] == plan["nuq_plan"]["bytes"]
    omega = fisher_omega(out, weights, fisher)
    # The planner's own figure for Ω is the error of what `nuq quantize` then produced.
    assert omega == pytest.approx(plan["nuq_plan"]["total_omega"], rel=1e-5)

    compared = 0
    for bits, sparse in [(2, "0"), (2, "0.45%"), (3, "0"), (3, "0.45%"), (4, "0")]:
        u = tmp_path / f"u{bits}-{sparse}"
        r = run(nuq_cli, "quantize", src, "--out", u, "--bits", bits, "--sparse", sparse,
                "--fisher", tmp_path / "fisher.safetensors", "--quiet")
        assert r.returncode == 0, r.stderr
        if report(u)["quantized_bytes"] > rep["quantized_bytes"]:
            continue
        compared += 1
        assert omega <= fisher_omega(u, weights, fisher) * (1 + 1e-9), (bits, sparse)
    assert compared >= 2


def test_plan_by_bytes_without_statistics(nuq_cli, tmp_path):
    src, weights, _ = checkpoint(tmp_path, layers=1)
    n = sum(np.prod(s) for s in PROJ.values())
    budget = int(2.6 * n / 8)
    r = run(nuq_cli, "plan", "--model", src, "--budget", str(budget), "--out", tmp_path / "p.json", "--bits", "2,3",
            "--sparse", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "unweighted" in r.stdout
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["nuq_plan"]["bytes"] <= budget
    assert {e["bits"] for e in plan["layers"].values()} == {2, 3}
    assert all(e["outlier_fraction"] == 0 for e in plan["layers"].values())


def test_plan_errors(nuq_cli, tmp_path):
    src, _, _ = checkpoint(tmp_path, layers=1)
    fisher = tmp_path / "fisher.safetensors"
    assert_error(run(nuq_cli, "plan", "--model", src, "--stats", fisher, "--budget", "3.25bits", "--out", tmp_path / "p.json"),
                 "--budget takes", "3.25bits")
    assert_error(run(nuq_cli, "plan", "--model", src, "--stats", tmp_path / "absent.safetensors", "--budget", "3bpw",
                     "--out", tmp_path / "p.json"), "absent.safetensors")
    r = run(nuq_cli, "plan", "--model", src, "--stats", fisher, "--budget", "1.5bpw", "--out", tmp_path / "p.json")
    assert_error(r, "infeasible", "smallest candidates take")
    # The weights' own file is not a statistics file.
    assert_error(run(nuq_cli, "plan", "--model", src, "--stats", src / "model.safetensors", "--budget", "3bpw",
                     "--out", tmp_path / "p.json"), "nuq_stats")
    assert not (tmp_path / "p.json").exists()


def test_stats_merge_weights_means_by_counts(nuq_cli, tmp_path):
    rng = np.random.default_rng(1)
    a = {"w": rng.random((3, 4), dtype=np.float32), "v": rng.random(5, dtype=np.float32)}
    b = {"w": rng.random((3, 4), dtype=np.float32)}
    save_file(a, str(tmp_path / "a.safetensors"),
              metadata={"nuq_stats": json.dumps({"kind": "fisher", "version": 1, "counts": {"w": 2, "v": 3}})})
    save_file(b, str(tmp_path / "b.safetensors"),
              metadata={"nuq_stats": json.dumps({"kind": "fisher", "version": 1, "counts": {"w": 6}})})
    r = run(nuq_cli, "stats", "merge", tmp_path / "m.safetensors", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert r.returncode == 0, r.stderr
    m = load_file(str(tmp_path / "m.safetensors"))
    np.testing.assert_allclose(m["w"], (2 * a["w"].astype(np.float64) + 6 * b["w"]) / 8, rtol=1e-6)
    np.testing.assert_array_equal(m["v"], a["v"])
    with open(tmp_path / "m.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(json.loads(f.read(n))["__metadata__"]["nuq_stats"])
    assert meta["counts"] == {"w": 8, "v": 3}
    hess = {"l.xtx_diag": np.ones(3, np.float32)}
    save_file(hess, str(tmp_path / "h.safetensors"),
              metadata={"nuq_stats": json.dumps({"kind": "hessian", "version": 1, "counts": {"l": 1}})})
    assert_error(run(nuq_cli, "stats", "merge", tmp_path / "x.safetensors", tmp_path / "a.safetensors",
                     tmp_path / "h.safetensors"), "hessian", "fisher")


def test_plan_from_hessian_statistics_with_aliases(nuq_cli, tmp_path):
    """XᵀX statistics written by NumPy (q_proj and o_proj share one input through an alias): the plan's
    Ω must be tr(ΔW H ΔWᵀ) of what `nuq quantize --plan` (unweighted) then stores."""
    src, weights, _ = checkpoint(tmp_path, layers=1)
    rng = np.random.default_rng(2)
    stats, counts, hess = {}, {}, {}
    for p, (rows, cols) in PROJ.items():
        base = f"model.layers.0.{p}"
        if p == "self_attn.o_proj":
            continue  # aliased to q_proj below
        x = rng.standard_normal((200, cols)) * rng.uniform(0.1, 3.0, cols)  # channels of unequal scale
        h = x.T @ x / len(x)
        stats[base + ".xtx"] = h.astype(np.float32)
        stats[base + ".xtx_diag"] = np.diag(h).astype(np.float32)
        counts[base] = len(x)
        hess[base] = stats[base + ".xtx"].astype(np.float64)
    hess["model.layers.0.self_attn.o_proj"] = hess["model.layers.0.self_attn.q_proj"]
    meta = {"kind": "hessian", "version": 1, "value": "mean", "counts": counts,
            "aliases": {"model.layers.0.self_attn.o_proj": "model.layers.0.self_attn.q_proj"}}
    save_file(stats, str(tmp_path / "h.safetensors"), metadata={"nuq_stats": json.dumps(meta)})

    r = run(nuq_cli, "plan", "--model", src, "--stats", tmp_path / "h.safetensors", "--budget", "3.2bpw",
            "--out", tmp_path / "plan.json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "sensitivity measure: hessian from" in r.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    out = tmp_path / "q"
    r = run(nuq_cli, "quantize", src, "--out", out, "--bits", "3", "--plan", tmp_path / "plan.json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert report(out)["average_bits_per_weight"] <= 3.2
    tensors, layers = load_output(out)
    omega = 0.0
    for base, layer in layers.items():
        d = weights[base + ".weight"].astype(np.float64) - dequantize(tensors, base, layer)[0]
        omega += float(np.einsum("ij,jk,ik->", d, hess[base], d))
    assert omega == pytest.approx(plan["nuq_plan"]["total_omega"], rel=1e-5)

    # Without the alias, o_proj has no statistics: named before any work is done.
    meta.pop("aliases")
    save_file(stats, str(tmp_path / "h2.safetensors"), metadata={"nuq_stats": json.dumps(meta)})
    assert_error(run(nuq_cli, "plan", "--model", src, "--stats", tmp_path / "h2.safetensors", "--budget", "3.2bpw",
                     "--out", tmp_path / "p2.json"), "model.layers.0.self_attn.o_proj")


def test_plan_from_nuq_calibrate_statistics(nuq_cli, tmp_path):
    """`nuq calibrate`'s per-column mean squared inputs (diag of XᵀX / tokens, under the weight names):
    the planner weighs errors with them (hessian-diag) and steers the quantizer with them as
    `nuq quantize --fisher` does, so its Ω is the error of the quantized output."""
    src, weights, _ = checkpoint(tmp_path, layers=1)
    rng = np.random.default_rng(3)
    act = {f"model.layers.0.{p}.weight": rng.uniform(0.01, 4.0, cols).astype(np.float32) for p, (_, cols) in PROJ.items()}
    save_file(act, str(tmp_path / "act.safetensors"), metadata={"nuq_statistics": "activation_mean_square", "tokens": "99"})
    r = run(nuq_cli, "plan", "--model", src, "--stats", tmp_path / "act.safetensors", "--budget", "3.2bpw",
            "--out", tmp_path / "plan.json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "sensitivity measure: hessian-diag" in r.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    out = tmp_path / "q"
    r = run(nuq_cli, "quantize", src, "--out", out, "--bits", "3", "--plan", tmp_path / "plan.json",
            "--fisher", tmp_path / "act.safetensors", "--quiet")
    assert r.returncode == 0, r.stderr
    assert report(out)["quantized_bytes"] == plan["nuq_plan"]["bytes"]
    tensors, layers = load_output(out)
    omega = 0.0
    for base, layer in layers.items():
        d = weights[base + ".weight"].astype(np.float64) - dequantize(tensors, base, layer)[0]
        omega += float(((d ** 2).sum(axis=0) * act[base + ".weight"]).sum())
    assert omega == pytest.approx(plan["nuq_plan"]["total_omega"], rel=1e-5)


def test_relative_omega_is_error_over_layer_energy(nuq_cli, tmp_path):
    src, weights, _ = checkpoint(tmp_path, layers=1)
    rng = np.random.default_rng(4)
    act = {f"model.layers.0.{p}.weight": rng.uniform(0.01, 4.0, cols).astype(np.float32) for p, (_, cols) in PROJ.items()}
    save_file(act, str(tmp_path / "act.safetensors"), metadata={"nuq_statistics": "activation_mean_square"})
    r = run(nuq_cli, "plan", "--model", src, "--stats", tmp_path / "act.safetensors", "--relative", "--budget", "3.2bpw",
            "--out", tmp_path / "plan.json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "(relative)" in r.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["nuq_plan"]["relative"] is True
    out = tmp_path / "q"
    r = run(nuq_cli, "quantize", src, "--out", out, "--bits", "3", "--plan", tmp_path / "plan.json",
            "--fisher", tmp_path / "act.safetensors", "--quiet")
    assert r.returncode == 0, r.stderr
    tensors, layers = load_output(out)
    omega = 0.0
    for base, layer in layers.items():
        w = weights[base + ".weight"].astype(np.float64)
        d = w - dequantize(tensors, base, layer)[0]
        a = act[base + ".weight"]
        omega += float(((d ** 2).sum(axis=0) * a).sum() / ((w ** 2).sum(axis=0) * a).sum())
    assert omega == pytest.approx(plan["nuq_plan"]["total_omega"], rel=1e-5)
