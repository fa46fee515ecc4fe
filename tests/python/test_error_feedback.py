"""Error feedback (GPTQ-style rounding with the layers' XᵀX): `nuq calibrate --hessian` against XᵀX of the
layer inputs computed by an independent NumPy decoder, `nuq quantize --hessian` / `--measure-only` on the
real stories260K model, and `nuq.quantize(hessian=...)` against output errors computed in NumPy."""
import json

import numpy as np
import pytest

from nuq_package import dense_weight, import_nuq
from test_fisher_cli import find_generate, hf  # noqa: F401 (hf: the converted stories260K fixture)
from test_llama import numpy_hidden, numpy_logits, read_llama2c
from test_quantize_cli import assert_error, run


@pytest.fixture(scope="module")
def nuq():
    return import_nuq()


def correlated_inputs(tokens, cols, seed):
    # A few strong directions shared by all tokens, as LLM activations have, plus per-channel noise.
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((4, cols))
    return (2.0 * rng.standard_normal((tokens, 4)) @ basis
            + 0.3 * rng.standard_normal((tokens, cols)) * (1 + np.arange(cols) % 5))


def test_numpy_quantize_with_hessian_lowers_the_output_error(nuq):
    x = correlated_inputs(512, 96, 0)
    w = (np.random.default_rng(1).standard_t(4, size=(40, 96)) * 0.02).astype(np.float32)
    h = x.T @ x / len(x)

    def output_error(layer):
        return np.sum(((w.astype(np.float64) - dense_weight(layer)) @ x.T) ** 2)

    energy = np.sum((w.astype(np.float64) @ x.T) ** 2)
    for method in ("nuq", "rtn"):
        plain = nuq.quantize(w, 3, method=method)
        fb = nuq.quantize(w, 3, method=method, hessian=h)
        measured = nuq.quantize(w, 3, method=method, hessian=h, error_feedback=False)
        assert output_error(fb) < 0.5 * output_error(plain), method
        assert fb.stats["relative_output_error"] == pytest.approx(output_error(fb) / energy, rel=1e-3)
        assert measured.stats["relative_output_error"] == pytest.approx(output_error(measured) / energy, rel=1e-3)
        assert plain.stats["relative_output_error"] == 0
    # rtn's codebooks do not depend on H, so measuring only must give plain rounding's bytes
    plain, measured = nuq.quantize(w, 3, method="rtn"), nuq.quantize(w, 3, method="rtn", hessian=h, error_feedback=False)
    assert np.array_equal(np.asarray(plain.qweight), np.asarray(measured.qweight))

    with pytest.raises(TypeError, match="hessian must have dtype float64"):
        nuq.quantize(w, 3, hessian=h.astype(np.float32))
    with pytest.raises(ValueError, match="hessian"):
        nuq.quantize(w, 3, hessian=h[:10, :10].copy())
    with pytest.raises(ValueError, match="error_feedback"):
        nuq.quantize(w, 3, error_feedback=False)
    bad = h.copy()
    bad[0, 1] = np.nan
    with pytest.raises(Exception, match=r"XᵀX \[0, 1\] is nan"):
        nuq.quantize(w, 3, hessian=bad)


HF_KINDS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def test_calibrate_hessian_matches_numpy_and_drives_quantize(nuq, nuq_cli, shared_data, hf, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text((shared_data / "tinystories_valid.txt").read_text()[:300])  # one window
    act, hess = tmp_path / "act.safetensors", tmp_path / "h.safetensors"
    r = run(nuq_cli, "calibrate", "--model", hf, "--tokenizer", shared_data / "tok512.bin", "--text", text,
            "--out", act, "--hessian", hess)
    assert r.returncode == 0, r.stderr
    assert "XᵀX of 21 distinct layer inputs (36 layers)" in r.stdout  # the 35 linear layers and the classifier

    r = run(find_generate(), "--tokenizer", shared_data / "tok512.bin", "--tokenize", text)
    assert r.returncode == 0, r.stderr
    ids = [int(t) for t in r.stdout.split()]
    tokens = [1] + ids[:-1]  # BOS, then every token that predicts a next one (nuq eval's window)
    w, cfg = read_llama2c(shared_data / "stories260K.bin")
    expected = []
    numpy_logits(w, cfg, tokens, layer_inputs=expected)
    acc = nuq.HessianAccumulator.load(str(hess))
    aliases = acc.aliases()
    resolve = lambda n: aliases.get(n, n)  # noqa: E731
    for layer in range(5):
        name = {kind: f"model.layers.{layer}.{path}" for kind, path in HF_KINDS.items()}
        # q/k/v read one input, gate/up another: stored once each; o and down have their own
        assert resolve(name["k"]) == resolve(name["q"]) == resolve(name["v"])
        assert resolve(name["gate"]) == resolve(name["up"])
        assert len({resolve(name[k]) for k in ("q", "o", "gate", "down")}) == 4
        for kind in ("q", "o", "gate", "down"):
            x = expected[layer][kind]
            want = x.T @ x / len(x)
            got = acc.matrix(name[kind])
            assert acc.count(name[kind]) == len(tokens)
            assert np.abs(got - want).max() <= 2e-4 * np.abs(want).max(), (layer, kind)
    # The classifier's input, the final normed hidden states, under the tied embedding's name.
    h = numpy_hidden(w, cfg, tokens)
    want, got = h.T @ h / len(h), acc.matrix("model.embed_tokens")
    assert acc.count("model.embed_tokens") == len(tokens)
    assert np.abs(got - want).max() <= 2e-4 * np.abs(want).max()

    # Error feedback lowers nearly every layer's output error on the calibration inputs (what it minimizes).
    fb, measured = tmp_path / "fb", tmp_path / "measured"
    for out, extra in ((fb, []), (measured, ["--measure-only"])):
        r = run(nuq_cli, "quantize", hf, "--out", out, "--bits", 3, "--hessian", hess, "--quiet", *extra)
        assert r.returncode == 0, r.stderr
    rep_fb = {l["name"]: l for l in json.loads((fb / "quant_report.json").read_text())["layers"]}
    rep_m = {l["name"]: l for l in json.loads((measured / "quant_report.json").read_text())["layers"]}
    assert all(l["error_feedback"] for l in rep_fb.values()) and not any(l["error_feedback"] for l in rep_m.values())
    ratios = np.array([rep_fb[n]["relative_output_error"] / rep_m[n]["relative_output_error"] for n in rep_fb])
    assert np.all(np.isfinite(ratios)) and len(ratios) == 35
    assert np.mean(ratios < 1) >= 0.9 and np.exp(np.log(ratios).mean()) < 0.8, ratios

    # The diagonal-only file of `nuq calibrate --out` is not enough, and --measure-only needs --hessian.
    r = run(nuq_cli, "quantize", hf, "--out", tmp_path / "bad", "--bits", 3, "--hessian", act)
    assert_error(r, "needs the full XᵀX")
    r = run(nuq_cli, "quantize", hf, "--out", tmp_path / "bad", "--bits", 3, "--measure-only")
    assert_error(r, "--measure-only needs --hessian")


def test_a_nan_in_a_later_xtx_fails_at_that_layer_naming_it(nuq_cli, shared_data, hf, tmp_path):
    # Only headers are checked before the first layer (reading every matrix up front took 5 minutes on a
    # 7B model); a bad value is found when its layer is reached, and the run stops there, naming it.
    text = tmp_path / "t.txt"
    text.write_text((shared_data / "tinystories_valid.txt").read_text()[:300])
    act, hess = tmp_path / "act.safetensors", tmp_path / "h.safetensors"
    r = run(nuq_cli, "calibrate", "--model", hf, "--tokenizer", shared_data / "tok512.bin", "--text", text,
            "--out", act, "--hessian", hess)
    assert r.returncode == 0, r.stderr
    raw = bytearray(hess.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    name = next(n for n in header if n.startswith("model.layers.4.mlp.down_proj") and n.endswith("xtx"))
    info = header[name]
    assert info["dtype"] == "F32"
    at = 8 + header_len + info["data_offsets"][0] + 4 * 3  # element [0, 3]
    raw[at:at + 4] = np.array([np.nan], dtype=np.float32).tobytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    out = tmp_path / "q"
    r = run(nuq_cli, "quantize", hf, "--out", out, "--bits", 3, "--hessian", bad, "--quiet")
    assert_error(r, name)
    assert "nan" in r.stderr.lower(), r.stderr
    assert not (out / "model.safetensors").exists()


def test_plan_with_error_feedback_is_what_quantize_produces(nuq_cli, shared_data, hf, tmp_path):
    # Fisher and XᵀX on the same tokens; the plan rounds its candidates with error feedback and weighs
    # output errors by the Fisher's per-row gradient scale (fisher-output), and `nuq quantize` given the
    # same files reproduces the planned layers byte for byte.
    text = tmp_path / "t.txt"
    text.write_text((shared_data / "tinystories_valid.txt").read_text()[:6000])
    fisher, act, hess = (tmp_path / f"{n}.safetensors" for n in ("fisher", "act", "h"))
    common = ["--model", hf, "--tokenizer", shared_data / "tok512.bin", "--text", text]
    assert run(nuq_cli, "fisher", *common, "--out", fisher).returncode == 0
    assert run(nuq_cli, "calibrate", *common, "--out", act, "--hessian", hess).returncode == 0
    plan_path = tmp_path / "plan.json"
    r = run(nuq_cli, "plan", "--model", hf, "--stats", fisher, "--hessian", hess, "--budget", "6bpw",
            "--bits", "3,4", "--out", plan_path)
    assert r.returncode == 0, r.stderr
    plan = json.loads(plan_path.read_text())
    assert plan["nuq_plan"]["omega"] == "fisher-output" and plan["nuq_plan"]["hessian"] == str(hess)
    assert len({json.dumps(e, sort_keys=True) for e in plan["layers"].values()}) > 1  # mixed precision
    out = tmp_path / "q"
    r = run(nuq_cli, "quantize", hf, "--out", out, "--bits", 3, "--plan", plan_path, "--fisher", fisher,
            "--hessian", hess, "--quiet")
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "quant_report.json").read_text())
    assert rep["quantized_bytes"] == plan["nuq_plan"]["bytes"]
    assert all(layer["error_feedback"] for layer in rep["layers"])

    # fisher-output needs both files
    r = run(nuq_cli, "plan", "--model", hf, "--stats", fisher, "--omega", "fisher-output", "--budget", "6bpw",
            "--out", tmp_path / "p2.json")
    assert_error(r, "fisher-output needs the full XᵀX")
    r = run(nuq_cli, "plan", "--model", hf, "--stats", fisher, "--hessian", act, "--budget", "6bpw",
            "--out", tmp_path / "p3.json")
    assert_error(r, "must be the full XᵀX")
