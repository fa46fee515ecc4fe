"""nuq.calibrate, nuq.fisher, nuq.evaluate, nuq.generate and nuq.convert against the command-line tools
they share their C++ code with (same files, same JSON, same text), on the real stories260K model; their
progress events, bars and cancellation; and errors that name the argument in Python spelling."""
import json
import os
import signal
import subprocess
import threading

import numpy as np
import pytest
from safetensors.numpy import load_file

from nuq_package import import_nuq

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def nuq():
    return import_nuq()


@pytest.fixture(scope="module")
def s260(nuq, nuq_cli, shared_data, tmp_path_factory):
    """stories260K as a Hugging Face checkpoint (from nuq.convert), its tokenizer and text."""
    work = tmp_path_factory.mktemp("model_api")
    hf = work / "s260-hf"
    info = nuq.convert(shared_data / "stories260K.bin", hf)
    assert info["layers"] == 5 and (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()
    cli_hf = work / "s260-hf-cli"
    r = run(nuq_cli, "convert", shared_data / "stories260K.bin", "--out", cli_hf)
    assert r.returncode == 0, r.stderr
    assert (hf / "model.safetensors").read_bytes() == (cli_hf / "model.safetensors").read_bytes()
    return {"hf": hf, "tok": shared_data / "tok512.bin", "text": shared_data / "tinystories_valid.txt",
            "work": work, "bin": shared_data / "stories260K.bin"}


def assert_same_tensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)


# ---- the same results as the command line -------------------------------------------------------------

def test_calibrate_writes_what_nuq_calibrate_writes(nuq, nuq_cli, s260, tmp_path):
    events = []
    r = nuq.calibrate(s260["hf"], s260["text"], tmp_path / "act.safetensors", hessian=tmp_path / "xtx.safetensors",
                      tokenizer=s260["tok"], max_tokens=3000, skip_tokens=100, threads=2, progress=events.append)
    assert r["tokens"] == 3000 and r["windows"] == 6 and r["layers"] == 36  # 35 linear layers + the classifier
    assert (r["hessian_inputs"], r["hessian_layers"]) == (21, 36)  # q/k/v and gate/up share their input
    assert [e["stage"] for e in events] == ["loaded", "disk"] + ["window"] * 6
    # The disk check before the first window counts the XᵀX file it will write (safetensors header aside).
    xtx_bytes = (tmp_path / "xtx.safetensors").stat().st_size
    assert xtx_bytes - 64 * 1024 <= events[1]["bytes_needed"] <= xtx_bytes, (events[1]["bytes_needed"], xtx_bytes)
    assert events[1]["where"] == str(tmp_path) and events[1]["bytes_free"] > events[1]["bytes_needed"]
    assert [e["window"] for e in events[2:]] == list(range(6)) and events[-1]["tokens_done"] == 3000
    assert all(e["windows"] == 6 and e["tokens"] == 3000 for e in events)
    c = run(nuq_cli, "calibrate", "--model", s260["hf"], "--tokenizer", s260["tok"], "--text", s260["text"],
            "--max-tokens", 3000, "--skip-tokens", 100, "-j", 2, "--out", tmp_path / "cli-act.safetensors",
            "--hessian", tmp_path / "cli-xtx.safetensors")
    assert c.returncode == 0, c.stderr
    assert_same_tensors(tmp_path / "act.safetensors", tmp_path / "cli-act.safetensors")
    assert_same_tensors(tmp_path / "xtx.safetensors", tmp_path / "cli-xtx.safetensors")


def test_calibrate_by_block_in_sequential_order_writes_what_the_cli_writes(nuq, nuq_cli, s260, tmp_path):
    events = []
    r = nuq.calibrate(s260["hf"], s260["text"], tmp_path / "act.safetensors", hessian=tmp_path / "xtx",
                      tokenizer=s260["tok"], max_tokens=1500, skip_tokens=100, threads=2, by_block=True, sequential=3,
                      sequential_sparse="0.45%", progress=events.append)
    assert r["tokens"] == 1500 and r["layers"] == 36 and (r["hessian_inputs"], r["hessian_layers"]) == (21, 36)
    stages = [e["stage"] for e in events]
    assert stages[0] == "loaded" and stages.count("disk") == 1 and stages.count("window") == 0
    blocks = [e for e in events if e["stage"] == "block"]
    assert [e["block"] for e in blocks] == list(range(5)) and all(e["blocks"] == 5 for e in blocks)
    disk = next(e for e in events if e["stage"] == "disk")
    assert disk["bytes_needed"] > 0 and disk["bytes_free"] >= disk["bytes_needed"]
    c = run(nuq_cli, "calibrate", "--model", s260["hf"], "--tokenizer", s260["tok"], "--text", s260["text"],
            "--max-tokens", 1500, "--skip-tokens", 100, "-j", 2, "--by-block", "--sequential", 3,
            "--sequential-sparse", "0.45%", "--out", tmp_path / "cli-act.safetensors", "--hessian", tmp_path / "cli-xtx")
    assert c.returncode == 0, c.stderr
    assert_same_tensors(tmp_path / "act.safetensors", tmp_path / "cli-act.safetensors")
    shards = sorted(f.name for f in (tmp_path / "xtx").iterdir())
    assert shards == sorted(f.name for f in (tmp_path / "cli-xtx").iterdir()) and len(shards) > 1
    for name in shards:
        a, b = tmp_path / "xtx" / name, tmp_path / "cli-xtx" / name
        if name.endswith(".safetensors"):
            assert_same_tensors(a, b)
        else:
            assert a.read_bytes() == b.read_bytes(), name
    # The sequential order changes the statistics of later blocks (they see the quantized blocks' outputs).
    nuq.calibrate(s260["hf"], s260["text"], tmp_path / "plain.safetensors", tokenizer=s260["tok"], max_tokens=1500,
                  skip_tokens=100, threads=2, by_block=True, progress=False)
    plain, seq = load_file(str(tmp_path / "plain.safetensors")), load_file(str(tmp_path / "act.safetensors"))
    first = next(n for n in plain if ".layers.0." in n)
    last = next(n for n in plain if ".layers.4." in n)
    np.testing.assert_array_equal(plain[first], seq[first])
    assert not np.array_equal(plain[last], seq[last])
    with pytest.raises(ValueError, match=r"sequential order \(sequential\) needs by_block=True and hessian"):
        nuq.calibrate(s260["hf"], s260["text"], tmp_path / "x.safetensors", hessian=tmp_path / "x-xtx",
                      tokenizer=s260["tok"], max_tokens=300, sequential=3, progress=False)
    with pytest.raises(ValueError, match="sequential must be 2, 3 or 4, got 5"):
        nuq.calibrate(s260["hf"], s260["text"], tmp_path / "x.safetensors", by_block=True, sequential=5)
    with pytest.raises(ValueError, match="sequential_sparse is used only with sequential=BITS"):
        nuq.calibrate(s260["hf"], s260["text"], tmp_path / "x.safetensors", sequential_sparse=0.01)


def test_calibrate_and_fisher_refuse_outputs_the_disk_cannot_hold(nuq, nuq_cli, s260, small_disk):
    # stories260K's XᵀX statistics and Fisher diagonal are each a few hundred KiB; the disk holds 64.
    events = []
    with pytest.raises(OSError, match=r"the XᵀX statistics \(written after the last window\) needs [\d.]+ MiB, only "
                                      r"0\.\d MiB are free; nothing was run"):
        nuq.calibrate(s260["hf"], s260["text"], small_disk / "act.safetensors", hessian=small_disk / "xtx.safetensors",
                      tokenizer=s260["tok"], max_tokens=300, progress=events.append)
    assert [e["stage"] for e in events] == ["loaded", "disk"] and not os.listdir(small_disk)
    c = run(nuq_cli, "fisher", "--model", s260["hf"], "--tokenizer", s260["tok"], "--text", s260["text"],
            "--max-tokens", 300, "--out", small_disk / "f.safetensors")
    assert c.returncode != 0 and "the Fisher diagonal (written after the last window) needs" in c.stderr, c.stderr
    assert "window 1/" not in c.stderr and not os.listdir(small_disk)


def test_fisher_writes_what_nuq_fisher_writes(nuq, nuq_cli, s260, tmp_path):
    events = []
    r = nuq.fisher(s260["hf"], s260["text"], tmp_path / "f.safetensors", tokenizer=s260["tok"], ctx=256,
                   max_tokens=600, threads=2, progress=events.append)
    assert r["windows"] == 3 and r["tokens"] == 600 and r["weights"] == 35
    windows = [e for e in events if e["stage"] == "window"]
    assert [e["tokens_done"] for e in windows] == [255, 510, 600]
    disk = [e for e in events if e["stage"] == "disk"]
    fisher_bytes = (tmp_path / "f.safetensors").stat().st_size
    assert len(disk) == 1 and fisher_bytes - 64 * 1024 <= disk[0]["bytes_needed"] <= fisher_bytes, (disk, fisher_bytes)
    # The mean loss is over tokens: each window's mean loss weighted by its tokens.
    weights = np.diff([0] + [e["tokens_done"] for e in windows])
    assert np.dot(weights, [e["value"] for e in windows]) / 600 == pytest.approx(r["mean_loss"], rel=1e-9)
    c = run(nuq_cli, "fisher", "--model", s260["hf"], "--tokenizer", s260["tok"], "--text", s260["text"],
            "--ctx", 256, "--max-tokens", 600, "-j", 2, "--out", tmp_path / "cli.safetensors")
    assert c.returncode == 0, c.stderr
    assert f'mean loss {r["mean_loss"]:.4f}' in c.stdout
    assert_same_tensors(tmp_path / "f.safetensors", tmp_path / "cli.safetensors")


def test_evaluate_returns_what_nuq_eval_json_prints(nuq, nuq_cli, s260, tmp_path):
    q = tmp_path / "q3"
    nuq.quantize_checkpoint(s260["hf"], q, 3, outlier_fraction="0.45%", progress=False)
    for extra, kwargs in [([], {}), (["--step", 16], {"step": 16}), (["--decode-packed"], {"decode_packed": True})]:
        got = nuq.evaluate(q, s260["text"], tokenizer=s260["tok"], max_tokens=1500, threads=2, progress=False,
                           **kwargs)
        c = run(nuq_cli, "eval", "--json", "--model", q, "--tokenizer", s260["tok"], "--text", s260["text"],
                "--max-tokens", 1500, "-j", 2, *extra)
        assert c.returncode == 0, c.stderr
        want = json.loads(c.stdout)
        assert sorted(got) == sorted(want)
        timing = {"tokens_per_second", "load_seconds"}
        assert {k: v for k, v in got.items() if k not in timing} == {
            k: v for k, v in want.items() if k not in timing}, extra


def test_evaluate_with_a_quantized_kv_cache(nuq, nuq_cli, smollm2, shared_data, tmp_path):
    # stories260K's heads (8 channels) are narrower than the KV kernels take, so SmolLM2 (30 layers, 3 kv
    # heads of 64). A calibration from random data of the right shape is enough to check the plumbing.
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((256, 3, 64)).astype(np.float32)
    cal = [nuq.calibrate_kv_layer(kv, kv * 0.5, bits_k=4, bits_v=4) for _ in range(30)]
    path = tmp_path / "kv.safetensors"
    nuq.save_kv_calibration(cal, str(path))
    text = shared_data / "wikitext2_test.txt"
    args = dict(max_tokens=40, progress=False)
    for kv_path in ("kernel", "roundtrip"):
        got = nuq.evaluate(smollm2, text, kv_calibration=path, kv_path=kv_path, kv_bits=4, kv_outliers="1%", **args)
        c = run(nuq_cli, "eval", "--json", "--model", smollm2, "--text", text, "--max-tokens", 40,
                "--kv-calibration", path, "--kv-path", kv_path, "--kv-bits", 4, "--kv-outliers", "1%")
        assert c.returncode == 0, c.stderr
        want = json.loads(c.stdout)
        assert got["kv_cache"] == want["kv_cache"] and got["kv_cache"].startswith("nuq 4-bit keys")
        assert got["perplexity"] == want["perplexity"]
    uniform = nuq.evaluate(smollm2, text, kv_method="uniform", kv_bits=8, **args)
    assert uniform["kv_cache"].startswith("uniform int8")
    with pytest.raises(ValueError, match=r"kv_bits 3 differs from the calibration's 4-bit keys"):
        nuq.evaluate(smollm2, text, kv_calibration=path, kv_bits=3, **args)
    with pytest.raises(ValueError, match=r"kv_outliers '2%' differs from the calibration's 1%"):
        nuq.evaluate(smollm2, text, kv_calibration=path, kv_outliers="2%", **args)
    with pytest.raises(ValueError, match=r"kv_bits/kv_outliers/kv_path need kv_calibration"):
        nuq.evaluate(smollm2, text, kv_path="kernel", **args)
    with pytest.raises(ValueError, match=r"kv_method='uniform' needs kv_bits"):
        nuq.evaluate(smollm2, text, kv_method="uniform", **args)


def test_generate_matches_nuq_generate(nuq, generate_bin, s260):
    tokens = []
    r = nuq.generate(s260["bin"], "Once upon a time", tokenizer=s260["tok"], max_new_tokens=24,
                     progress=lambda e: tokens.append(e["token"]) if e["stage"] == "token" else None)
    c = run(generate_bin, "--model", s260["bin"], "--tokenizer", s260["tok"], "--prompt", "Once upon a time",
            "--steps", 24)
    assert c.returncode == 0, c.stderr
    assert c.stdout == "Once upon a time" + r["text"] + "\n"
    assert tokens == r["tokens"] and 0 < len(tokens) <= 24
    assert r["prompt_tokens"][0] == 1 and r["kv_cache"] == "fp32"
    sampled = [nuq.generate(s260["bin"], "Once", tokenizer=s260["tok"], max_new_tokens=16, temperature=1.0, seed=s,
                            progress=False)["text"] for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


@pytest.fixture(scope="module")
def generate_bin():
    from conftest import find_binary

    return find_binary("examples/nuq_generate")


# ---- progress bars and cancellation --------------------------------------------------------------------

def test_progress_false_is_silent_and_true_draws_a_bar(nuq, s260, tmp_path, capfd, monkeypatch):
    args = (s260["hf"], s260["text"])
    nuq.evaluate(*args, tokenizer=s260["tok"], max_tokens=600, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    nuq.evaluate(*args, tokenizer=s260["tok"], max_tokens=600)
    _, err = capfd.readouterr()
    assert "evaluate" in err and "2/2" in err and "perplexity" in err
    # Without tqdm: one plain line per 10% on a non-terminal stderr.
    import nuq._progress as progress_module

    real_import = progress_module.importlib.import_module

    def no_tqdm(name, *a):
        if name.startswith("tqdm"):
            raise ImportError("no tqdm here")
        return real_import(name, *a)

    monkeypatch.setattr(progress_module.importlib, "import_module", no_tqdm)
    nuq.calibrate(*args, tmp_path / "a.safetensors", tokenizer=s260["tok"], max_tokens=2044)
    _, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert lines[-1].startswith("calibrate: 100.0% 4/4 window"), err
    assert len(lines) == 4 and "\r" not in err


def test_an_exception_from_progress_stops_the_task_and_writes_nothing(nuq, s260, tmp_path):
    class Stop(Exception):
        pass

    def stop_at_second_window(e):
        if e["stage"] == "window" and e["window"] == 1:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        nuq.calibrate(s260["hf"], s260["text"], tmp_path / "a.safetensors", hessian=tmp_path / "h.safetensors",
                      tokenizer=s260["tok"], max_tokens=3000, progress=stop_at_second_window)
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "h.safetensors").exists()
    with pytest.raises(Stop):
        nuq.fisher(s260["hf"], s260["text"], tmp_path / "f.safetensors", tokenizer=s260["tok"], ctx=128,
                   max_tokens=600, progress=stop_at_second_window)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Stop):
        nuq.generate(s260["hf"], "Once", tokenizer=s260["tok"],
                     progress=lambda e: (_ for _ in ()).throw(Stop()) if e["stage"] == "token" else None)
    with pytest.raises(TypeError, match="progress must be callable"):
        nuq.evaluate(s260["hf"], s260["text"], progress=3)


def test_ctrl_c_stops_evaluate_and_quantize_checkpoint_resumes(nuq, s260, tmp_path):
    """A real SIGINT while the C++ code runs without the GIL arrives as KeyboardInterrupt at the next
    window (or tensor); an interrupted quantize_checkpoint resumes where it stopped."""
    import time

    # The signal comes from another thread 0.2 s after the first window, i.e. while the C++ code is inside
    # a later window (a fixed delay from the start raced with loading on a busy machine: no window yet).
    windows = []
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))

    def record(e):
        if e["stage"] == "window":
            if not windows:
                timer.start()
            windows.append(e["window"])

    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            nuq.evaluate(s260["hf"], s260["text"], tokenizer=s260["tok"], max_tokens=60000, threads=1,
                         progress=record)
    finally:
        timer.cancel()
    assert 0 < len(windows) < 100 and time.monotonic() - t0 < 30  # 118 windows in all

    fired = []

    def interrupt_after_first_layer(e):
        if e["stage"] == "quantized" and not fired:
            fired.append(e["name"])
            os.kill(os.getpid(), signal.SIGINT)  # as from the terminal

    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        nuq.quantize_checkpoint(s260["hf"], out, 3, progress=interrupt_after_first_layer)
    stages = []
    result = nuq.quantize_checkpoint(s260["hf"], out, 3, progress=stages.append)
    assert [r["name"] for r in result["layers"] if r["resumed"]] == fired
    assert stages[-1]["stage"] == "done" and stages[-1]["name"] == str(out)


def test_other_threads_run_while_evaluate_works(nuq, s260):
    ticks = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(1)
            done.wait(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        nuq.evaluate(s260["hf"], s260["text"], tokenizer=s260["tok"], max_tokens=1500, threads=1, progress=False)
    finally:
        done.set()
        t.join()
    assert len(ticks) > 10, "the GIL was held while the model ran"


# ---- errors name the argument --------------------------------------------------------------------------

def test_errors_name_the_python_argument(nuq, s260, tmp_path):
    w = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^quantize: bits must be 2, 3 or 4, got 5$"):
        nuq.quantize(w, bits=5)
    with pytest.raises(ValueError, match=r"^quantize: outlier_fraction must be a fraction in \[0, 1\).*got -1$"):
        nuq.quantize(w, 3, outlier_fraction=-1)
    with pytest.raises(ValueError, match=r"quantize: outlier_fraction=0.45 would keep 45% of the weights.*'45%'"):
        nuq.quantize(w, 3, outlier_fraction=0.45)
    with pytest.raises(ValueError, match=r"quantize: sensitive_fraction takes a number .* got '0.45'"):
        nuq.quantize(w, 3, sensitive_fraction="0.45")
    with pytest.raises(TypeError, match=r"quantize: bits must be an int"):
        nuq.quantize(w, bits=3.0)
    with pytest.raises(ValueError, match=r"calibrate_kv_layer: bits_k must be 2, 3 or 4, got 5"):
        nuq.calibrate_kv_layer(np.zeros((4, 1, 8), np.float32), np.zeros((4, 1, 8), np.float32), bits_k=5)
    # A percent string states the intent: 25% of the weights really are kept.
    layer = nuq.quantize(w, 3, outlier_fraction="25%")
    assert layer.nnz == 128 and nuq.quantize(w, 3, outlier_fraction=0.2).nnz > 0
    assert nuq.quantize(w, 3, outlier_fraction="0.45%").nnz == nuq.quantize(w, 3, outlier_fraction=0.0045).nnz

    src = tmp_path / "in.safetensors"
    from safetensors.numpy import save_file

    save_file({"model.layers.0.mlp.up_proj.weight": w}, str(src))
    nuq.quantize_checkpoint(src, tmp_path / "q", 3, progress=False)
    with pytest.raises(ValueError, match=r"already holds a quantized checkpoint; pass force=True to replace it"):
        nuq.quantize_checkpoint(src, tmp_path / "q", 3, progress=False)
    nuq.quantize_checkpoint(src, tmp_path / "q", 3, force=True, progress=False)
    with pytest.raises(ValueError, match=r"include pattern '\(' is not a valid regular expression"):
        nuq.quantize_checkpoint(src, tmp_path / "q2", 3, include=["("], progress=False)
    with pytest.raises(TypeError, match=r"quantize_checkpoint: output_dir must be a path"):
        nuq.quantize_checkpoint(src, None, 3)

    with pytest.raises(ValueError, match=r"pass tokenizer=\.\.\."):
        nuq.evaluate(s260["hf"], s260["text"], progress=False)
    # int8=True is the shorthand of arithmetic='int8'; errors name the arithmetic either way.
    for int8 in [{"int8": True}, {"arithmetic": "int8"}]:
        with pytest.raises(ValueError, match=r"^arithmetic='int8' applies to the packed kernels; it cannot be "
                                             r"combined with decode_packed=True$"):
            nuq.evaluate(s260["hf"], s260["text"], decode_packed=True, **int8)
        with pytest.raises(ValueError, match=r"arithmetic='int8' needs step <= 16"):
            nuq.evaluate(s260["hf"], s260["text"], step=32, **int8)
    with pytest.raises(ValueError, match=r"^evaluate: int8=True conflicts with arithmetic='exact'$"):
        nuq.evaluate(s260["hf"], s260["text"], int8=True, arithmetic="exact")
    with pytest.raises(ValueError, match=r"generate: arithmetic must be one of 'fastest', 'exact', 'int8', got 'fp8'"):
        nuq.generate(s260["hf"], "x", arithmetic="fp8")
    with pytest.raises(ValueError, match=r"evaluate: device must be one of 'cpu', 'cuda', 'cuda-bf16', got 'tpu'"):
        nuq.evaluate(s260["hf"], s260["text"], device="tpu")
    if not nuq.HAS_CUDA:
        with pytest.raises(ValueError, match=r"device='cuda': this nuq was built without CUDA"):
            nuq.evaluate(s260["hf"], s260["text"], device="cuda")
    with pytest.raises(ValueError, match=r"hessian and out name the same file"):
        nuq.calibrate(s260["hf"], s260["text"], tmp_path / "x", hessian=tmp_path / "x")
    with pytest.raises(ValueError, match=r"skip_tokens and max_tokens must not be negative|max_tokens must be >= 0"):
        nuq.fisher(s260["hf"], s260["text"], tmp_path / "f", max_tokens=-1)
    with pytest.raises(ValueError, match=r"is a directory; out names a file"):
        nuq.fisher(s260["hf"], s260["text"], tmp_path, tokenizer=s260["tok"])
    with pytest.raises(ValueError, match=r"generate: temperature must be a number >= 0"):
        nuq.generate(s260["hf"], "x", temperature=-1)
