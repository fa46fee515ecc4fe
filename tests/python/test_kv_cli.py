"""`nuq kv-calibrate` and `nuq eval --kv-calibration / --kv-method uniform` on SmolLM2 (skipped without the
model or ../shared/data): the quantized cache changes perplexity the way the bit widths say it should, and
bad --kv-* arguments are refused with a message naming the problem."""
import json
import pathlib
import subprocess

import pytest


def run(cli, *args):
    return subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True)


def ppl(cli, model, text, *extra):
    r = run(cli, "eval", "--model", model, "--text", text, "--ctx", 128, "--max-tokens", 381, "-j", 2, "--json",
            "-q", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_kv_cache_perplexity_ordering(nuq_cli, smollm2, shared_data, tmp_path):
    text = shared_data / "wikitext2_test.txt"
    cal = {}
    for bits in (4, 2):
        cal[bits] = tmp_path / f"kv{bits}.safetensors"
        r = run(nuq_cli, "kv-calibrate", "--model", smollm2, "--text", text, "--skip-tokens", 100000,
                "--max-tokens", 508, "--ctx", 128, "--bits", bits, "--outliers", "1%", "--out", cal[bits], "-j", 2)
        assert r.returncode == 0, r.stderr
    fp32 = ppl(nuq_cli, smollm2, text)
    nuq4 = ppl(nuq_cli, smollm2, text, "--kv-calibration", cal[4], "--kv-bits", 4, "--kv-outliers", "1%")
    nuq2 = ppl(nuq_cli, smollm2, text, "--kv-calibration", cal[2])
    uni2 = ppl(nuq_cli, smollm2, text, "--kv-method", "uniform", "--kv-bits", 2)
    assert fp32["kv_cache"] == "fp32" and "nuq 4-bit keys" in nuq4["kv_cache"]
    assert fp32["tokens_scored"] == nuq4["tokens_scored"] == 381
    # 4-bit + 1% stays close to the unquantized cache; 2 bits cost more; uniform 2-bit per token much more.
    assert fp32["perplexity"] < nuq4["perplexity"] < fp32["perplexity"] * 1.1
    assert nuq4["perplexity"] < nuq2["perplexity"] < uni2["perplexity"]


def test_kv_arguments_are_checked(nuq_cli, smollm2, shared_data, tmp_path):
    text = shared_data / "wikitext2_test.txt"
    r = run(nuq_cli, "eval", "--model", smollm2, "--text", text, "--max-tokens", 10, "--kv-bits", 3)
    assert r.returncode != 0 and "need --kv-calibration" in r.stderr
    cal = tmp_path / "kv3.safetensors"
    r = run(nuq_cli, "kv-calibrate", "--model", smollm2, "--text", text, "--max-tokens", 100, "--ctx", 64, "--bits", 3,
            "--out", cal)
    assert r.returncode == 0, r.stderr
    r = run(nuq_cli, "eval", "--model", smollm2, "--text", text, "--max-tokens", 10, "--kv-calibration", cal,
            "--kv-bits", 4)
    assert r.returncode != 0 and "--kv-bits 4 differs from the calibration's 3-bit" in r.stderr
    r = run(nuq_cli, "eval", "--model", smollm2, "--text", text, "--max-tokens", 10, "--kv-calibration", text)
    assert r.returncode != 0 and "wikitext2_test.txt" in r.stderr
