"""`nuq fisher`: the empirical Fisher diagonal from the decoder's backward pass, on the real stories260K model.

Checked against an independent reference (central finite differences of the NumPy float64 decoder of
test_llama.py), for consistency with itself (two runs over halves of the text merged with `nuq stats merge`
equal one run over the whole), and as input to `nuq quantize --fisher` and `nuq plan --stats`."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_llama import numpy_logits, read_llama2c
from test_quantize_cli import assert_error, run

KINDS = {"attention.wq": "q", "attention.wk": "k", "attention.wv": "v", "attention.wo": "o",
         "feed_forward.w1": "gate", "feed_forward.w3": "up", "feed_forward.w2": "down"}


def stats_metadata(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return json.loads(header["__metadata__"]["nuq_stats"])


@pytest.fixture(scope="module")
def hf(nuq_cli, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fisher") / "s260-hf"
    r = run(nuq_cli, "convert", shared_data / "stories260K.bin", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def fisher(nuq_cli, shared_data, model, out, *extra):
    return run(nuq_cli, "fisher", "--model", model, "--tokenizer", shared_data / "tok512.bin", "--text",
               shared_data / "tinystories_valid.txt", "--out", out, "--threads", 2, *extra)


def nll(w, cfg, inputs, targets):
    logits = numpy_logits(w, cfg, inputs)
    mx = logits.max(-1, keepdims=True)
    logp = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
    return -logp[np.arange(len(targets)), targets].mean()


def test_one_window_matches_numpy_finite_differences(nuq_cli, shared_data, tmp_path):
    # One window (count 1), so the stored value is g² for the gradient g of that window's mean loss.
    text = tmp_path / "t.txt"
    text.write_text((shared_data / "tinystories_valid.txt").read_text()[:200])
    out = tmp_path / "f.safetensors"
    r = run(nuq_cli, "fisher", "--model", shared_data / "stories260K.bin", "--tokenizer", shared_data / "tok512.bin",
            "--text", text, "--ctx", 512, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "window 1/1" in r.stderr and "wrote" in r.stdout
    meta = stats_metadata(out)
    assert meta["kind"] == "fisher" and set(meta["counts"].values()) == {1}
    f = load_file(str(out))
    assert len(f) == 5 * 7

    r = run(find_generate(), "--tokenizer", shared_data / "tok512.bin", "--tokenize", text)
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    assert 20 < len(ids) < 511
    inputs, targets = [1] + ids[:-1], np.array(ids)
    w, cfg = read_llama2c(shared_data / "stories260K.bin")
    rng = np.random.default_rng(0)
    h = 1e-5
    for layer in (0, 4):
        for name, kind in KINDS.items():
            value = f[f"layers.{layer}.{name}.weight"].astype(np.float64)
            assert value.shape == w["layers"][layer][kind].shape
            assert np.all(np.isfinite(value)) and np.all(value >= 0)
            picks = [np.unravel_index(np.argmax(value), value.shape)]
            picks += [tuple(rng.integers(0, s) for s in value.shape) for _ in range(3)]
            scale = np.sqrt(value.max())
            for idx in picks:
                m = w["layers"][layer][kind]
                orig = m[idx]
                m[idx] = orig + h
                up = nll(w, cfg, inputs, targets)
                m[idx] = orig - h
                down = nll(w, cfg, inputs, targets)
                m[idx] = orig
                g = (up - down) / (2 * h)
                assert np.sqrt(value[idx]) == pytest.approx(abs(g), abs=2e-3 * scale), (layer, kind, idx)


def find_generate():
    from conftest import find_binary
    return find_binary("examples/nuq_generate")


def test_merged_halves_equal_one_run_and_feed_quantize_and_plan(nuq_cli, shared_data, hf, tmp_path):
    whole, a, b, merged = (tmp_path / f"{n}.safetensors" for n in ("whole", "a", "b", "merged"))
    r = fisher(nuq_cli, shared_data, hf, whole, "--max-tokens", 1022)
    assert r.returncode == 0, r.stderr
    assert "window 2/2" in r.stderr
    assert fisher(nuq_cli, shared_data, hf, a, "--max-tokens", 511).returncode == 0
    assert fisher(nuq_cli, shared_data, hf, b, "--skip-tokens", 511, "--max-tokens", 511).returncode == 0
    r = run(nuq_cli, "stats", "merge", merged, a, b)
    assert r.returncode == 0, r.stderr
    fw, fa, fb, fm = (load_file(str(p)) for p in (whole, a, b, merged))
    assert stats_metadata(whole)["counts"] == stats_metadata(merged)["counts"]
    assert set(stats_metadata(whole)["counts"].values()) == {2}
    assert sorted(fw) == sorted(fm) and len(fw) == 5 * 7
    for name in fw:
        assert name.startswith("model.layers.") and name.endswith(".weight")
        # Mean of two windows; only the F32 rounding of the stored means separates the two routes.
        np.testing.assert_allclose(fm[name], fw[name], rtol=1e-6, atol=0)
        np.testing.assert_allclose(fw[name], (fa[name].astype(np.float64) + fb[name]) / 2, rtol=1e-6)
        assert not np.array_equal(fa[name], fb[name])  # the halves are different text

    q = tmp_path / "q3"
    r = run(nuq_cli, "quantize", hf, "--out", q, "--bits", 3, "--sparse", "0.45%", "--fisher", whole, "--quiet")
    assert r.returncode == 0, r.stderr
    plan = tmp_path / "plan.json"
    r = run(nuq_cli, "plan", "--model", hf, "--stats", whole, "--budget", "4.5bpw", "--out", plan, "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(plan.read_text())["nuq_plan"]["stats"]


def test_bad_input_gives_clear_errors_and_leaves_output_alone(nuq_cli, shared_data, hf, tmp_path):
    out = tmp_path / "f.safetensors"
    out.write_bytes(b"previous result")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    tok = shared_data / "tok512.bin"
    r = run(nuq_cli, "fisher", "--model", hf, "--tokenizer", tok, "--text", empty, "--out", out)
    assert_error(r, str(empty), "the text has no tokens")
    r = run(nuq_cli, "fisher", "--model", empty, "--tokenizer", tok, "--text", shared_data / "tinystories_valid.txt",
            "--out", out)
    assert r.returncode == 1 and r.stderr.startswith("nuq: error: "), r.stderr
    r = fisher(nuq_cli, shared_data, hf, out, "--skip-tokens", 10 ** 9)
    assert_error(r, "cannot skip 1000000000")
    r = fisher(nuq_cli, shared_data, hf, tmp_path / "missing" / "f.safetensors")
    assert_error(r, "does not exist")
    assert out.read_bytes() == b"previous result"
    # A checkpoint whose weights are NaN: the backward pass gives NaN gradients, which are refused.
    bad = tmp_path / "bad"
    bad.mkdir()
    t = load_file(str(hf / "model.safetensors"))
    t["model.layers.2.mlp.up_proj.weight"][3, 5] = np.nan
    from safetensors.numpy import save_file
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((hf / "config.json").read_text())
    r = fisher(nuq_cli, shared_data, bad, out, "--max-tokens", 100)
    assert_error(r, "window 0", "is nan")
    assert out.read_bytes() == b"previous result"
    assert not [p.name for p in tmp_path.iterdir() if ".tmp." in p.name]  # no temporary file left behind
