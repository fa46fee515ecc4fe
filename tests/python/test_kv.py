"""KV-cache calibration from Python (nuq._nuq.calibrate_kv_layer and the safetensors round trip),
checked against NumPy: the per-channel key ranges are the calibration quantiles, and a saved file reads
back identical, also through the `safetensors` package when it is installed."""
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
