"""The KV cache from Python, checked against NumPy.

Calibration (calibrate_kv_layer and the safetensors round trip): the per-channel key ranges are the
calibration quantiles, and a saved file reads back identical, also through the `safetensors` package.

Cache and decode attention (KVCache, kv_decode_attention, dense_decode_attention): the attention output
is compared with attention written here in NumPy (RoPE, GQA, softmax in float64) over what the cache
holds, and, for the quantization error, over the original fp32 keys and values; the stored values are
checked against the format's rules (codebook values plus at most `outlier_slots` exact residuals per
vector, fp16 sink tokens)."""
import math

import numpy as np
import pytest

from nuq_package import import_nuq


@pytest.fixture(scope="module")
def nq():
    return import_nuq()._nuq


def samples(tokens, heads, hd, seed):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((tokens, heads, hd)).astype(np.float32)
    k[:, :, 5] = k[:, :, 5] * 8 + 3  # an outlier channel with its own offset
    v = rng.standard_t(5, size=(tokens, heads, hd)).astype(np.float32)
    return k, v


def test_key_ranges_are_calibration_quantiles(nq):
    k, v = samples(401, 2, 64, 1)
    cal = nq.calibrate_kv_layer(k, v, bits_k=3, bits_v=2, outlier_fraction=0.01)
    # Quantiles 0.5% and 99.5% of 401 samples sit exactly at sorted positions 2 and 398.
    s = np.sort(k, axis=0)
    lo, hi = s[2], s[398]
    np.testing.assert_allclose(cal["k_offset"], (lo + hi) / 2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cal["k_scale"], (hi - lo) / 2, rtol=1e-6)
    assert cal["k_codebook"].shape == (8,) and cal["v_codebook"].shape == (4,)
    assert np.all(np.diff(cal["k_codebook"]) >= 0) and np.all(np.diff(cal["v_codebook"]) >= 0)
    # Values are normalized to [-1, 1] per token, so their codebook lies there.
    assert cal["v_codebook"].min() >= -1 and cal["v_codebook"].max() <= 1


def test_save_load_round_trip(nq, tmp_path):
    k, v = samples(200, 1, 128, 2)
    layers = [nq.calibrate_kv_layer(k, v, bits_k=b, bits_v=b) for b in (2, 4)]
    path = tmp_path / "kv.safetensors"
    nq.save_kv_calibration(layers, str(path), outlier_fraction=0.02, sink_tokens=3, q_norm=True)
    back = nq.load_kv_calibration(str(path))
    assert back["outlier_fraction"] == 0.02 and back["sink_tokens"] == 3 and back["q_norm"]
    for a, b in zip(layers, back["layers"]):
        for key in ("k_scale", "k_offset", "k_codebook", "v_codebook"):
            np.testing.assert_array_equal(a[key], b[key])
        assert (a["bits_k"], a["bits_v"]) == (b["bits_k"], b["bits_v"])
    st = pytest.importorskip("safetensors.numpy")
    tensors = st.load_file(str(path))
    np.testing.assert_array_equal(tensors["layers.1.k_scale"], layers[1]["k_scale"])


def test_bad_input_is_named(nq):
    k, v = samples(10, 1, 64, 3)
    k[4, 0, 7] = np.nan
    with pytest.raises(ValueError, match="key sample 263 is nan"):
        nq.calibrate_kv_layer(k, v)
    with pytest.raises(ValueError, match="5 bits"):
        nq.calibrate_kv_layer(v, v, bits_k=5)
    with pytest.raises(ValueError, match="tokens, n_kv_heads, head_dim"):
        nq.calibrate_kv_layer(k[0], v[0])
    # Wrong dtypes and layouts are refused by name, never silently converted.
    with pytest.raises(TypeError, match="calibrate_kv_layer: k .*float32"):
        nq.calibrate_kv_layer(k.astype(np.float64), v)
    with pytest.raises(ValueError, match="calibrate_kv_layer: v .*contiguous"):
        nq.calibrate_kv_layer(k, np.asfortranarray(v))
    cal = nq.calibrate_kv_layer(*samples(50, 1, 64, 4))
    cal["k_scale"] = cal["k_scale"].astype(np.float64)
    with pytest.raises(TypeError, match=r"save_kv_calibration: calibration\['k_scale'\] must have dtype float32"):
        nq.save_kv_calibration([cal], "unused.safetensors")


# ---------------------------------------------------------------------------------------------------
# The cache and decode attention
# ---------------------------------------------------------------------------------------------------

def rope(x, positions, layout, theta):
    """RoPE written out in float64: x [T, heads, head_dim] at positions [T]; pair i is channels (2i, 2i+1)
    when interleaved, (i, i + head_dim/2) when half-split, rotated by position * theta**(-2i/head_dim)."""
    x = np.asarray(x, np.float64)
    hd = x.shape[-1]
    i = np.arange(hd // 2)
    a, b = (2 * i, 2 * i + 1) if layout == "interleaved" else (i, i + hd // 2)
    ang = np.asarray(positions, np.float64)[:, None, None] * theta ** (-2.0 * i / hd)
    c, s = np.cos(ang), np.sin(ang)
    out = x.copy()
    out[..., a] = x[..., a] * c - x[..., b] * s
    out[..., b] = x[..., a] * s + x[..., b] * c
    return out


def attention(q, k, v, layout="half_split", theta=10000.0, position_scale=1.0, scale=None, q_rotated=False):
    """One decode step in float64: q [n_heads, head_dim] at position T - 1 attends to pre-RoPE keys and
    values [T, n_kv_heads, head_dim]; query head h reads kv head h // (n_heads / n_kv_heads)."""
    T, n_kv, hd = k.shape
    group = q.shape[0] // n_kv
    qr = q.astype(np.float64) if q_rotated else rope(q[None], [(T - 1) * position_scale], layout, theta)[0]
    kr = rope(k, np.arange(T) * position_scale, layout, theta)
    scale = 1 / math.sqrt(hd) if scale is None else scale
    out = np.empty(q.shape)
    for h in range(q.shape[0]):
        s = kr[:, h // group] @ qr[h] * scale
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[:, h // group].astype(np.float64)
    return out


def make_cache(nq, n_kv=2, hd=64, bits=3, **options):
    k, v = samples(512, n_kv, hd, 10)
    cal = nq.calibrate_kv_layer(k, v, bits_k=bits, bits_v=bits, outlier_fraction=0.01)
    return nq.KVCache(cal, outlier_fraction=0.01, **options), cal


def fill(cache, lengths, seed):
    """One sequence per length, prefilled with fresh samples of the calibration's distribution."""
    ids, originals = [], []
    for i, n in enumerate(lengths):
        k, v = samples(n, cache.n_kv_heads, cache.head_dim, seed + i)
        s = cache.add_sequence()
        cache.append(s, k, v)
        ids.append(s)
        originals.append((k, v))
    return ids, originals


# (layout, theta, scaling, factor, how the scaling changes positions and theta for the NumPy RoPE)
ROPES = [
    ("half_split", 10000.0, "none", 1.0, 1.0, 10000.0),
    ("interleaved", 500000.0, "linear", 4.0, 0.25, 500000.0),
    ("half_split", 10000.0, "ntk", 8.0, 1.0, 10000.0 * 8.0 ** (64 / 62)),
]


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("layout,theta,scaling,factor,pos_scale,theta_eff", ROPES)
def test_attention_matches_numpy_over_the_cached_values(nq, group, layout, theta, scaling, factor, pos_scale,
                                                        theta_eff):
    cache, _ = make_cache(nq, rope_layout=layout, rope_theta=theta, rope_scaling=scaling, rope_factor=factor)
    # One token (only the fp16 sink), part of a page, three pages; one batch.
    ids, _ = fill(cache, [1, 17, 70], 20)
    assert [cache.length(s) for s in ids] == [1, 17, 70]
    n_heads = group * cache.n_kv_heads
    q = np.random.default_rng(1).standard_normal((len(ids), n_heads, cache.head_dim)).astype(np.float32)
    held = [cache.dequantize(s) for s in ids]
    expect = np.stack([attention(q[b], k, v, layout, theta_eff, pos_scale) for b, (k, v) in enumerate(held)])
    vmax = max(np.abs(v).max() for _, v in held)
    for isa in (None, "scalar"):
        got = nq.kv_decode_attention(cache, ids, q, isa=isa)
        assert got.shape == q.shape and got.dtype == np.float32
        # docs/kv-cache.md: the kernels are within 2e-5 of max|V| of the double-precision reference.
        np.testing.assert_allclose(got, expect, rtol=0, atol=2e-5 * vmax, err_msg=f"isa={isa}")
    # The length-1 sequence attends to its sink token alone: the output is that token's fp16 value.
    np.testing.assert_allclose(got[0], np.repeat(held[0][1][0], group, axis=0), atol=1e-6)
    one_thread = nq.kv_decode_attention(cache, ids, q, threads=1)
    assert np.array_equal(one_thread, nq.kv_decode_attention(cache, ids, q, threads=2))
    reordered = nq.kv_decode_attention(cache, ids[::-1], np.ascontiguousarray(q[::-1]))
    assert np.array_equal(reordered[::-1], one_thread)


def test_lengths_cut_rows_to_prefixes_of_shared_sequences(nq):
    # One call for every query of a causal prefill: rows repeat one sequence with growing lengths, and each
    # equals the NumPy attention over that prefix (query at its own position).
    cache, _ = make_cache(nq, rope_layout="half_split")
    ids, _ = fill(cache, [70], 40)
    k, v = cache.dequantize(ids[0])
    lengths = [1, 2, 17, 33, 70]
    q = np.random.default_rng(4).standard_normal((len(lengths), 4, cache.head_dim)).astype(np.float32)
    got = nq.kv_decode_attention(cache, [ids[0]] * len(lengths), q, lengths=lengths)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b], attention(q[b], k[:n], v[:n], "half_split"), rtol=0,
                                   atol=2e-5 * np.abs(v).max(), err_msg=f"length {n}")
    # The full length is the same as no lengths at all.
    assert np.array_equal(got[-1], nq.kv_decode_attention(cache, ids, q[-1:])[0])
    with pytest.raises(ValueError, match="lengths has 1 entries for 2 sequences"):
        nq.kv_decode_attention(cache, [ids[0]] * 2, q[:2], lengths=[3])
    with pytest.raises(ValueError, match="71"):
        nq.kv_decode_attention(cache, ids, q[:1], lengths=[71])


def test_scale_query_rope_and_out(nq):
    cache, _ = make_cache(nq, rope_layout="interleaved")
    ids, _ = fill(cache, [5, 33], 30)
    q = np.random.default_rng(2).standard_normal((2, 4, 64)).astype(np.float32)
    k1, v1 = cache.dequantize(ids[1])
    q_rot = rope(q[1][None], [32], "interleaved", 10000.0)[0].astype(np.float32)
    out = np.full((2, 4, 64), np.nan, np.float32)
    got = nq.kv_decode_attention(cache, ids, np.stack([q[0], q_rot]), out=out, scale=0.3, query_has_rope=True)
    assert got is out  # written in place
    np.testing.assert_allclose(out[1], attention(q_rot, k1, v1, "interleaved", scale=0.3, q_rotated=True),
                               atol=2e-5 * np.abs(v1).max())
    # Without query_has_rope the rotated query would be rotated twice: a different result.
    twice = nq.kv_decode_attention(cache, ids, np.stack([q[0], q_rot]), scale=0.3)
    assert np.abs(twice[1] - out[1]).max() > 1e-3


# Relative RMS error of the optimal (Lloyd-Max) b-bit quantizer of a Gaussian: sqrt(MSE) with MSE =
# 0.1175, 0.03454, 0.009497 at 2, 3, 4 bits.
LLOYD_MAX = {2: 0.3428, 3: 0.1858, 4: 0.0975}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantization_error_against_fp32_attention(nq, bits):
    """The cache against the original fp32 keys and values, with the tolerance set by the bit width.
    Each cached key (relative to its channel's spread) and value (relative to its size) is no further
    off than a Gaussian's optimal b-bit quantizer would be (non-uniform codebooks plus 1% fp16 outliers
    should do at least that well). The attention output inherits the value error about one to one (a
    softmax average of independent errors, relative to the same average of the values) and the key
    error through the scores, about as large again with the queries used here (random, so the scores
    are dominated by the keys' wide channel 5); together they measure about 1.5x the per-element error
    at every width (0.51, 0.28, 0.14), and the bound is 1.75x."""
    cache, _ = make_cache(nq, n_kv=2, hd=128, bits=bits)
    ids, originals = fill(cache, [17, 64, 300], 40)
    k, v = originals[2]
    kd, vd = cache.dequantize(ids[2])
    key_err = np.linalg.norm(kd - k) / np.linalg.norm(k - k.mean(0))
    value_err = np.linalg.norm(vd - v) / np.linalg.norm(v)
    q = np.random.default_rng(3).standard_normal((3, 8, 128)).astype(np.float32)
    got = nq.kv_decode_attention(cache, ids, q)
    fp32 = np.stack([attention(q[b], k, v) for b, (k, v) in enumerate(originals)])
    err = np.linalg.norm(got - fp32) / np.linalg.norm(fp32)
    print(f"{bits}-bit: per element K {key_err:.3f} V {value_err:.3f}, attention output {err:.3f}")
    assert key_err < LLOYD_MAX[bits] and value_err < LLOYD_MAX[bits]
    assert err < 1.75 * LLOYD_MAX[bits]
    # The kernel's own error (against attention over the cached values) is negligible next to that: the
    # comparison measures the quantization, not the kernel.
    held = np.stack([attention(q[b], *cache.dequantize(s)) for b, s in enumerate(ids)])
    assert np.linalg.norm(got - held) / np.linalg.norm(fp32) < err / 50


def test_quantization_error_falls_with_bits(nq):
    q = np.random.default_rng(4).standard_normal((2, 2, 64)).astype(np.float32)
    errors = []
    for bits in (2, 3, 4):
        cache, _ = make_cache(nq, bits=bits)
        ids, originals = fill(cache, [40, 200], 50)
        fp32 = np.stack([attention(q[b], k, v) for b, (k, v) in enumerate(originals)])
        errors.append(np.linalg.norm(nq.kv_decode_attention(cache, ids, q) - fp32) / np.linalg.norm(fp32))
    assert errors[0] > errors[1] > errors[2], errors


def test_dense_attention_is_fp32_attention(nq):
    rng = np.random.default_rng(5)
    lengths = [1, 17, 40]
    k = rng.standard_normal((3, 2, 40, 128)).astype(np.float32)
    v = rng.standard_normal((3, 2, 40, 128)).astype(np.float32)
    for b, n in enumerate(lengths):  # past each length: never read, or the output would be NaN
        k[b, :, n:] = np.nan
        v[b, :, n:] = np.nan
    q = rng.standard_normal((3, 8, 128)).astype(np.float32)
    # Keys and queries are given already rotated: plain softmax attention.
    expect = np.empty(q.shape)
    for b, n in enumerate(lengths):
        for h in range(8):
            s = k[b, h // 4, :n].astype(np.float64) @ q[b, h] / math.sqrt(128)
            p = np.exp(s - s.max())
            expect[b, h] = (p / p.sum()) @ v[b, h // 4, :n]
    for isa in (None, "scalar"):
        got = nq.dense_decode_attention(k, v, lengths, q, isa=isa)
        np.testing.assert_allclose(got, expect, rtol=0, atol=1e-5, err_msg=f"isa={isa}")
    out = np.empty_like(q)
    assert nq.dense_decode_attention(k, v, lengths, q, out=out) is not None
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="dense_decode_attention: out must not overlap q"):
        nq.dense_decode_attention(k, v, lengths, q, out=q)


def test_rope_angles(nq):
    for layout in ("half_split", "interleaved"):
        cos, sin = nq.kv_rope_cos_sin(128, 10**6, 5, rope_layout=layout, rope_theta=500000.0)
        ang = (10**6 + np.arange(5.0))[:, None] * 500000.0 ** (-np.arange(64) / 64)
        assert cos.shape == (5, 64) and cos.dtype == np.float32
        np.testing.assert_allclose(cos, np.cos(ang), atol=1e-6)
        np.testing.assert_allclose(sin, np.sin(ang), atol=1e-6)
    cos, _ = nq.kv_rope_cos_sin(64, 8, 1, rope_scaling="linear", rope_factor=4.0)
    np.testing.assert_allclose(cos[0], np.cos(2.0 * 10000.0 ** (-np.arange(32) / 32)), atol=1e-6)


def test_stored_values_follow_the_format(nq):
    """Sink tokens are fp16; every other key is a codebook value on its channel's scale/offset except in
    `outlier_slots` channels per vector (those of largest |normalized key|), where an fp16 residual
    restores it; a value vector holds at most 2**bits + slots distinct numbers and is restored at the
    slots entries farthest from its mean (docs/kv-cache.md, "Method")."""
    cache, cal = make_cache(nq, n_kv=2, hd=128, bits=3, sink_tokens=2)
    S = cache.outlier_slots
    assert S == 2 and cache.sink_tokens == 2  # ceil(0.01 * 128)
    k, v = samples(40, 2, 128, 6)
    s = cache.add_sequence()
    cache.append(s, k, v)
    kd, vd = cache.dequantize(s)
    for a, b in ((kd, k), (vd, v)):
        assert np.array_equal(a[:2], b[:2].astype(np.float16).astype(np.float32))
    kd, vd, k, v = kd[2:], vd[2:], k[2:], v[2:]

    norm = (k - cal["k_offset"]) / cal["k_scale"]
    top = np.zeros(k.shape, bool)
    np.put_along_axis(top, np.argsort(-np.abs(norm), axis=-1)[..., :S], True, axis=-1)
    on_codebook = np.abs((kd - cal["k_offset"]) / cal["k_scale"] - cal["k_codebook"][:, None, None, None]).min(0) < 1e-4
    assert np.all(on_codebook | top)
    np.testing.assert_allclose(kd[top], k[top], rtol=2e-3, atol=1e-3)

    for t in range(v.shape[0]):
        for h in range(2):
            assert len(np.unique(vd[t, h])) <= 8 + S
            far = np.argsort(-np.abs(v[t, h] - v[t, h].mean()), kind="stable")[:S]
            np.testing.assert_allclose(vd[t, h, far], v[t, h, far], rtol=2e-3, atol=1e-3)


def test_bytes_per_token_and_allocation(nq):
    for bits, per_head in ((2, 80), (3, 112), (4, 144)):  # docs/kv-cache.md at head_dim 128, 1% outliers
        cache, _ = make_cache(nq, n_kv=2, hd=128, bits=bits)
        assert cache.bytes_per_token == 2 * per_head
    layout = cache.token_layout
    assert (layout["k_bytes"], layout["v_bytes"], layout["slots"]) == (64 + 6, 4 + 64 + 6, 2)
    cache, _ = make_cache(nq, n_kv=2, hd=128, bits=3, block_tokens=16)
    assert cache.bytes_per_token / (2 * 128 * 2 * 2) == pytest.approx(0.219, abs=1e-3)  # of fp16 K+V
    assert cache.allocated_bytes == 0
    s = cache.add_sequence()
    cache.append(s, *samples(17, 2, 128, 7))
    page = 16 * cache.bytes_per_token + 8  # 8 bytes of padding per page
    sink = 2 * 128 * 2 * 2  # one token of fp16 K and V for both kv heads
    assert cache.allocated_bytes == 2 * page + sink
    cache.free_sequence(s)
    assert cache.allocated_bytes == 0
    assert "bytes_per_token=224" in repr(cache)


def test_prefill_decode_steps_and_roundtrip_agree(nq):
    cache, _ = make_cache(nq)
    k, v = samples(45, 2, 64, 8)
    a = cache.add_sequence()
    cache.append(a, k, v, threads=2)  # bulk prefill
    b, c = cache.add_sequence(), cache.add_sequence()
    for t in range(45):  # decode steps of a batch of two
        cache.append_batch([c, b], np.stack([k[t], k[t]]), np.stack([v[t], v[t]]))
    ka, va = cache.dequantize(a)
    for s in (b, c):
        kb, vb = cache.dequantize(s)
        assert np.array_equal(ka, kb) and np.array_equal(va, vb)
    kr, vr = cache.roundtrip(k, v)
    assert np.array_equal(kr, ka) and np.array_equal(vr, va)
    assert not np.array_equal(kr[5:], k[5:])  # quantized, and the input is left alone
    cache.free_sequence(b)
    assert cache.add_sequence() == b and cache.length(b) == 0


def test_torch_tensors_are_accepted(nq):
    torch = pytest.importorskip("torch")
    cache, _ = make_cache(nq)
    k, v = samples(9, 2, 64, 9)
    s = cache.add_sequence()
    cache.append(s, torch.from_numpy(k), torch.from_numpy(v))
    q = np.random.default_rng(6).standard_normal((1, 2, 64)).astype(np.float32)
    from_torch = nq.kv_decode_attention(cache, [s], torch.from_numpy(q))
    assert np.array_equal(from_torch, nq.kv_decode_attention(cache, [s], q))


def test_bad_cache_input_is_refused_by_name(nq):
    cache, cal = make_cache(nq)
    s = cache.add_sequence()
    k, v = samples(3, 2, 64, 11)
    q = np.zeros((1, 2, 64), np.float32)
    with pytest.raises(ValueError, match="sequence 0 .*is empty"):
        nq.kv_decode_attention(cache, [s], q)
    with pytest.raises(TypeError, match="KVCache.append: k must have dtype float32, got float64"):
        cache.append(s, k.astype(np.float64), v)
    with pytest.raises(ValueError, match="KVCache.append: v must be C-contiguous"):
        cache.append(s, k, np.asfortranarray(v))
    with pytest.raises(ValueError, match=r"KVCache.append: k: dimension 2 must be 64 \(the cache's head_dim\)"):
        cache.append(s, k[..., :32].copy(), v)
    with pytest.raises(ValueError, match="KVCache.append: k must be 3-D"):
        cache.append(s, k[0], v[0])
    with pytest.raises(ValueError, match="sequence 7 does not exist"):
        cache.append(7, k, v)
    bad = k.copy()
    bad[1, 1, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite key at token 1, kv head 1, channel 3"):
        cache.append(s, bad, v)
    assert cache.length(s) == 0
    cache.append(s, k, v)
    t = cache.add_sequence()
    with pytest.raises(ValueError, match="non-finite value at batch row 1, kv head 0, channel 2"):
        bad = v[:2].copy()
        bad[1, 0, 2] = np.nan
        cache.append_batch([s, t], k[:2], bad)
    assert (cache.length(s), cache.length(t)) == (3, 0)  # nothing appended
    with pytest.raises(ValueError, match="names a sequence twice"):
        cache.append_batch([s, s], k[:2], v[:2])
    with pytest.raises(ValueError, match=r"dimension 0 must be 2 \(one token per sequence in seqs\)"):
        cache.append_batch([s, t], k, v)

    with pytest.raises(TypeError, match="kv_decode_attention: q must have dtype float32"):
        nq.kv_decode_attention(cache, [s], q.astype(np.float16))
    with pytest.raises(ValueError, match=r"n_heads = 3\) must be a positive multiple of the cache's 2 kv heads"):
        nq.kv_decode_attention(cache, [s], np.zeros((1, 3, 64), np.float32))
    with pytest.raises(ValueError, match=r"kv_decode_attention: q: dimension 0 must be 1"):
        nq.kv_decode_attention(cache, [s], np.zeros((2, 2, 64), np.float32))
    with pytest.raises(ValueError, match="kv_decode_attention: out must be writeable"):
        out = np.zeros((1, 2, 64), np.float32)
        out.flags.writeable = False
        nq.kv_decode_attention(cache, [s], q, out=out)
    with pytest.raises(ValueError, match="out must not overlap q"):
        nq.kv_decode_attention(cache, [s], q, out=q)
    with pytest.raises(ValueError, match="scale must be positive"):
        nq.kv_decode_attention(cache, [s], q, scale=0.0)
    with pytest.raises(ValueError, match="isa must be scalar, avx2 or avx512"):
        nq.kv_decode_attention(cache, [s], q, isa="neon")
    with pytest.raises(ValueError, match="seqs is empty"):
        nq.kv_decode_attention(cache, [], q[:0])
    with pytest.raises(ValueError, match="split_tokens 100 must be a positive multiple of the page size 32"):
        nq.kv_decode_attention(cache, [s], q, split_tokens=100)

    with pytest.raises(ValueError, match="head_dim 32"):
        nq.KVCache(nq.calibrate_kv_layer(*samples(64, 1, 32, 12)))
    with pytest.raises(ValueError, match="calibration has no 'k_codebook'"):
        nq.KVCache({key: val for key, val in cal.items() if key != "k_codebook"})
    with pytest.raises(TypeError, match=r"KVCache: calibration\['k_offset'\] must have dtype float32"):
        nq.KVCache(dict(cal, k_offset=cal["k_offset"].astype(np.float64)))
    with pytest.raises(ValueError, match="rope_layout must be 'half_split'"):
        nq.KVCache(cal, rope_layout="neox")
    with pytest.raises(ValueError, match="block_tokens 12 must be a multiple of 8"):
        nq.KVCache(cal, block_tokens=12)
    whole = {"layers": [cal], "outlier_fraction": 0.01, "sink_tokens": 1, "q_norm": False}
    with pytest.raises(ValueError, match="holds 1 layers; say which one with layer="):
        nq.KVCache(whole)
    with pytest.raises(ValueError, match="layer 1 is out of range"):
        nq.KVCache(whole, 1)
    with pytest.raises(ValueError, match="sink_tokens 4 differs from the calibration's 1"):
        nq.KVCache(whole, 0, sink_tokens=4)
    assert nq.KVCache(whole, 0).sink_tokens == 1

    with pytest.raises(ValueError, match=r"dense_decode_attention: lengths\[1\] = 9 is outside \[1, 8\]"):
        z = np.zeros((2, 1, 8, 64), np.float32)
        nq.dense_decode_attention(z, z, [8, 9], np.zeros((2, 1, 64), np.float32))


def test_calibration_file_builds_a_cache(nq, tmp_path):
    k, v = samples(300, 2, 64, 13)
    layers = [nq.calibrate_kv_layer(k, v, bits_k=b, bits_v=b, outlier_fraction=0.02) for b in (2, 4)]
    path = tmp_path / "kv.safetensors"
    nq.save_kv_calibration(layers, str(path), outlier_fraction=0.02, sink_tokens=3)
    cache = nq.KVCache(nq.load_kv_calibration(str(path)), 1, block_tokens=16)
    assert (cache.bits_k, cache.outlier_slots, cache.sink_tokens, cache.block_tokens) == (4, 2, 3, 16)


def test_export_pages_and_the_cuda_launcher(nq):
    cache, cal = make_cache(nq, rope_theta=20000.0)
    ids, originals = fill(cache, [40, 3], 60)
    e = cache.export_pages(ids)
    assert e["lengths"].tolist() == [40, 3] and e["block_tables"].shape == (2, 2) == (2, e["max_blocks"])
    assert e["pages"].shape == (3, e["page_stride"]) and e["page_stride"] == (32 * cache.bytes_per_token + 8 + 15) // 16 * 16
    assert np.array_equal(e["k_codebook"][:8], cal["k_codebook"]) and e["k_codebook"].shape == (16,)
    storage = e["storage"]
    assert sorted(storage.tolist()) == list(range(64))
    np.testing.assert_allclose(e["rope_freq"], 20000.0 ** (-np.arange(32) / 32), rtol=1e-12)
    # fp32 rotations: page bases (pages of 32 tokens up to the longest sequence, 40) times in-page steps.
    assert e["rope_pages"] == 2 and e["rope_page_cos"].shape == (2, 32) and e["rope_step_sin"].shape == (32, 32)
    pos = 32 + 5
    c = e["rope_page_cos"][1] * e["rope_step_cos"][5] - e["rope_page_sin"][1] * e["rope_step_sin"][5]
    np.testing.assert_allclose(c, np.cos(pos * e["rope_freq"]), atol=1e-6)
    k0 = originals[1][0][0]  # first token of the second sequence: the sink, keys in storage order
    assert np.array_equal(e["sink_k"][1, 0], k0[:, storage].astype(np.float16))
    assert np.array_equal(e["k_scale"], cal["k_scale"][:, storage])

    args = dict(batch=2, n_heads=4, q=0, out=0, max_length=40)
    if not nq.HAS_CUDA:
        with pytest.raises(ValueError, match="cuda_kv_decode_attention: this nuq build has no CUDA support"):
            nq.cuda_kv_decode_attention(e, **args)
        with pytest.raises(ValueError, match="no CUDA support"):
            nq.cuda_kv_decode_workspace_bytes(2, 4, 64, 40)
        return
    # A CUDA build: the arguments are checked on the host before anything reaches a device, so these
    # run without a GPU (the pointers below are never dereferenced).
    with pytest.raises(TypeError, match=r"cache\['pages'\] must be a device pointer .*upload the host array"):
        nq.cuda_kv_decode_attention(e, **args)
    fake = {key: (1 if isinstance(val, np.ndarray) else val) for key, val in e.items()}
    with pytest.raises(ValueError, match="cache has no 'rope_page_cos'"):
        nq.cuda_kv_decode_attention({key: val for key, val in fake.items() if key != "rope_page_cos"}, **args)
    need = nq.cuda_kv_decode_workspace_bytes(2, 4, 64, 40)
    assert need > 0
    with pytest.raises(ValueError, match=f"workspace of 0 bytes is too small \\(need {need}\\)"):
        nq.cuda_kv_decode_attention(fake, **args)
    with pytest.raises(ValueError, match="more than 8 query heads per kv head"):
        nq.cuda_kv_decode_attention(fake, **dict(args, n_heads=18), workspace=1, workspace_bytes=1 << 30)
