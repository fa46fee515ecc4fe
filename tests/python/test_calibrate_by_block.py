"""`nuq calibrate --by-block` (models larger than memory, issue 24): the model run one decoder block at a time
over all tokens must give the one-pass run's statistics exactly, its sharded XᵀX must drive `nuq quantize
--hessian` to the same checkpoint, and a run killed between blocks must resume to the same bytes."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args, timeout=900):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def sharded(directory):
    out = {}
    index = json.load(open(directory / "model.safetensors.index.json"))
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(directory / shard)))
    assert set(out) == set(index["weight_map"])
    return out


def calibrate_both_ways(nuq_cli, model, tok, text, tmp_path, max_tokens):
    args = ["calibrate", "--model", model, "--tokenizer", tok, "--text", text, "--max-tokens", max_tokens]
    r = run(nuq_cli, *args, "--out", tmp_path / "one.safetensors", "--hessian", tmp_path / "one-xtx.safetensors")
    assert r.returncode == 0, r.stderr
    r = run(nuq_cli, *args, "--out", tmp_path / "blk.safetensors", "--hessian", tmp_path / "blk-xtx", "--by-block")
    assert r.returncode == 0, r.stderr
    assert "GiB free" in r.stderr and "block 1/" in r.stderr, r.stderr
    assert not (tmp_path / "blk.safetensors.blocks").exists(), "the work directory outlived a finished run"
    # The per-column means are the same file, byte for byte; the XᵀX the same tensors, sharded per block.
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "blk.safetensors").read_bytes()
    one, blk = load_file(str(tmp_path / "one-xtx.safetensors")), sharded(tmp_path / "blk-xtx")
    assert set(one) == set(blk) and len(one) > 0
    for k in one:
        assert np.array_equal(one[k], blk[k]), k


def test_stories260k_by_block_equals_one_pass_and_quantizes_alike(nuq_cli, shared_data, tmp_path):
    hf = tmp_path / "hf"
    assert run(nuq_cli, "convert", shared_data / "stories260K.bin", "--out", hf).returncode == 0
    calibrate_both_ways(nuq_cli, hf, shared_data / "tok512.bin", shared_data / "tinystories_valid.txt", tmp_path, 3000)
    q = {}
    for name, xtx in [("one", "one-xtx.safetensors"), ("blk", "blk-xtx")]:
        r = run(nuq_cli, "quantize", hf, "--out", tmp_path / f"q-{name}", "--bits", 3, "--hessian", tmp_path / xtx, "-q")
        assert r.returncode == 0, r.stderr
        q[name] = load_file(str(tmp_path / f"q-{name}" / "model.safetensors"))
    assert set(q["one"]) == set(q["blk"])
    for k in q["one"]:
        assert np.array_equal(q["one"][k], q["blk"][k]), k


def test_synthetic_bf16_model_by_block_equals_one_pass(nuq_cli, shared_data, tmp_path):
    model = tmp_path / "tiny"
    r = run(sys.executable, os.path.join(ROOT, "scripts", "synthetic_llama.py"), "--shape", "tiny", "--dtype", "bf16",
            "--out", model)
    assert r.returncode == 0, r.stderr
    calibrate_both_ways(nuq_cli, model, shared_data / "tok512.bin", shared_data / "tinystories_valid.txt", tmp_path,
                        2000)


def test_by_block_refuses_a_hessian_file(nuq_cli, shared_data, tmp_path):
    existing = tmp_path / "xtx.safetensors"
    existing.write_bytes(b"keep me")
    r = run(nuq_cli, "calibrate", "--model", shared_data / "stories260K.bin", "--tokenizer", shared_data / "tok512.bin",
            "--text", shared_data / "tinystories_valid.txt", "--max-tokens", 500, "--out", tmp_path / "a.safetensors",
            "--hessian", existing, "--by-block")
    assert r.returncode != 0 and "directory of per-block shards" in r.stderr, r.stderr
    assert existing.read_bytes() == b"keep me"


@pytest.mark.whole_model
def test_smollm2_by_block_killed_between_blocks_resumes_to_the_same_bytes(nuq_cli, smollm2, shared_data, tmp_path):
    args = [nuq_cli, "calibrate", "--model", smollm2, "--text", shared_data / "wikitext2_test.txt", "--max-tokens",
            3000, "--by-block", "-j", 2]
    ref = run(*args, "--out", tmp_path / "ref.safetensors", "--hessian", tmp_path / "ref-xtx")
    assert ref.returncode == 0, ref.stderr
    out, xtx = tmp_path / "out.safetensors", tmp_path / "out-xtx"
    state = tmp_path / "out.safetensors.blocks" / "state.json"
    p = subprocess.Popen([str(a) for a in args + ["--out", out, "--hessian", xtx]], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:
        try:
            done = json.loads(state.read_text())["next_block"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 3:
            p.send_signal(signal.SIGKILL)
            killed_at = done
            break
        time.sleep(0.02)
    p.wait()
    if killed_at is None:
        pytest.skip("the run finished before it could be killed between blocks")
    assert not out.exists() and not xtx.exists(), "a killed run left outputs behind"
    r = run(*args, "--out", out, "--hessian", xtx)
    assert r.returncode == 0, r.stderr
    assert "resumed after block" in r.stderr, r.stderr
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    a, b = sharded(tmp_path / "ref-xtx"), sharded(xtx)
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_sequential_order_feeds_quantized_blocks_that_quantize_reproduces(nuq_cli, shared_data, tmp_path):
    """GPTQ's order: block b's statistics are collected on the outputs of blocks < b already quantized. Block 0
    sees the same inputs as the one-pass run, later blocks other inputs; and `nuq quantize --hessian` with the
    same options must rebuild exactly the weights the run quantized in memory. The check: calibrating the
    final checkpoint gives every block's first input (the XᵀX q/k/v share) bit for bit as the sequential run
    recorded it, which only holds if every earlier block's quantized weights are the same."""
    hf = tmp_path / "hf"
    assert run(nuq_cli, "convert", shared_data / "stories260K.bin", "--out", hf).returncode == 0
    args = ["calibrate", "--tokenizer", shared_data / "tok512.bin", "--text", shared_data / "tinystories_valid.txt",
            "--max-tokens", 3000, "--by-block"]
    r = run(nuq_cli, *args, "--model", hf, "--out", tmp_path / "one.safetensors", "--hessian", tmp_path / "one")
    assert r.returncode == 0, r.stderr
    r = run(nuq_cli, *args, "--model", hf, "--out", tmp_path / "seq.safetensors", "--hessian", tmp_path / "seq",
            "--sequential", 3, "--sequential-sparse", "0.5%")
    assert r.returncode == 0, r.stderr
    seq_meta = json.load(open(tmp_path / "seq" / "model.safetensors.index.json"))["metadata"]
    assert json.loads(seq_meta["nuq_sequential"])["bits"] == 3
    q = tmp_path / "q"
    r = run(nuq_cli, "quantize", hf, "--out", q, "--bits", 3, "--sparse", "0.5%", "--hessian", tmp_path / "seq", "-q")
    assert r.returncode == 0, r.stderr
    r = run(nuq_cli, *args, "--model", q, "--out", tmp_path / "qc.safetensors", "--hessian", tmp_path / "qc")
    assert r.returncode == 0, r.stderr
    one, seq, qc = sharded(tmp_path / "one"), sharded(tmp_path / "seq"), sharded(tmp_path / "qc")
    first_inputs = sorted(k for k in seq if k.endswith("self_attn.q_proj.xtx"))
    assert len(first_inputs) == 5
    for k in first_inputs:
        assert np.array_equal(seq[k], qc[k]), k
        assert np.array_equal(seq[k], one[k]) == k.startswith("model.layers.0."), k


def test_sequential_needs_the_by_block_run(nuq_cli, shared_data, tmp_path):
    r = run(nuq_cli, "calibrate", "--model", shared_data / "stories260K.bin", "--tokenizer", shared_data / "tok512.bin",
            "--text", shared_data / "tinystories_valid.txt", "--out", tmp_path / "a.safetensors", "--sequential", 3)
    assert r.returncode != 0 and "--sequential needs --by-block and --hessian" in r.stderr, r.stderr
