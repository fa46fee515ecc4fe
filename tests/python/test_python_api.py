"""The Python API (nuq._nuq through the nuq package): every result is checked against an independent
NumPy computation (the packed format decoded in NumPy, products, brute-force optima), plus the
zero-copy guarantees and the errors bad arguments give."""
import itertools
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import build_dir
from nuq_package import decode_indices, dense_weight, import_nuq


@pytest.fixture(scope="module")
def nuq():
    return import_nuq()


def weights(rows, cols, seed):
    # Heavy tails, as in LLM weights, so that outliers matter.
    return np.random.default_rng(seed).standard_t(4, size=(rows, cols)).astype(np.float32) * 0.02


def stored_bits_per_weight(layer):
    # docs/format.md, "Storage and bits per weight".
    nbytes = np.asarray(layer.qweight).nbytes + np.asarray(layer.lut).nbytes
    if layer.nnz:
        nbytes += 4 * (layer.rows + 1) + layer.nnz * (np.asarray(layer.sparse_col_idx).itemsize + 2)
    return 8 * nbytes / (layer.rows * layer.cols)


# ---- quantize / dequantize ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["nuq", "kmeans", "rtn"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_matches_numpy_decoding_and_stats(nuq, method, bits):
    w = weights(24, 192, bits)
    layer = nuq.quantize(w, bits, method=method, outlier_fraction=0.005)
    assert (layer.rows, layer.cols, layer.bits, layer.method) == (24, 192, bits, method)
    dense = nuq.dequantize(layer)
    assert dense.dtype == np.float32 and dense.shape == (24, 192)
    np.testing.assert_array_equal(dense, dense_weight(layer))
    stats = layer.stats
    err = (w.astype(np.float64) - dense) ** 2
    assert stats["mse"] == pytest.approx(err.mean(), rel=1e-6)
    assert stats["weighted_mse"] == pytest.approx(err.mean(), rel=1e-6)
    assert stats["max_abs_error"] == pytest.approx(np.abs(w - dense).max(), rel=1e-6)
    assert stats["nnz"] == layer.nnz
    assert stats["bits_per_weight"] == pytest.approx(stored_bits_per_weight(layer))
    assert layer.bits_per_weight == pytest.approx(stored_bits_per_weight(layer))
    measured = nuq.measure(layer, w)
    for key in ("mse", "weighted_mse", "max_abs_error", "bits_per_weight", "nnz"):
        assert measured[key] == pytest.approx(stats[key]), key


def test_rows_with_few_distinct_values_are_reproduced_exactly(nuq):
    # A row holding at most 2^bits distinct (fp16-representable) values is clustered without error.
    rng = np.random.default_rng(1)
    levels = rng.choice(np.arange(-64, 64, dtype=np.float32) / 64, size=(8, 8), replace=True)
    w = np.stack([rng.choice(levels[r], size=100) for r in range(8)]).astype(np.float32)
    for method in ("nuq", "kmeans"):
        layer = nuq.quantize(w, 3, method=method, kmeans_init="exact_dp")
        np.testing.assert_array_equal(nuq.dequantize(layer), w)
        assert layer.stats["mse"] == 0


def test_rtn_codebooks_are_uniform_grids(nuq):
    w = weights(4, 256, 3)
    layer = nuq.quantize(w, 4, method="rtn", group_size=64)
    lut = np.asarray(layer.lut).astype(np.float64)
    assert lut.shape == (4, 4, 16)
    steps = np.diff(lut, axis=2)
    # Equal steps up to the fp16 rounding of each entry.
    assert np.allclose(steps, steps[..., :1], atol=2 * np.abs(lut).max() * 2**-11)
    for r, g in itertools.product(range(4), range(4)):
        # The grid spans the block up to half a step at each end (the zero point is rounded).
        block = w[r, g * 64:(g + 1) * 64]
        half = steps[r, g].max() / 2 + 1e-4
        assert lut[r, g, 0] <= block.min() + half and lut[r, g, -1] >= block.max() - half


def test_sensitivity_weights_the_error(nuq):
    w = weights(16, 256, 4)
    rng = np.random.default_rng(5)
    s = np.ones_like(w)
    important = rng.random(w.shape) < 0.05
    s[important] = 1000.0
    weighted = nuq.quantize(w, 3, sensitivity=s)
    plain = nuq.quantize(w, 3, method="kmeans")
    def werr(layer):
        d = nuq.dequantize(layer)
        return float((s * (w - d) ** 2).sum() / s.sum())
    assert weighted.stats["weighted_mse"] == pytest.approx(werr(weighted), rel=1e-6)
    assert werr(weighted) < 0.7 * werr(plain)


def test_outliers_are_the_largest_magnitudes(nuq):
    w = weights(32, 128, 6)
    layer = nuq.quantize(w, 3, outlier_fraction=0.01)
    k = round(0.01 * w.size)
    assert layer.stats["outliers"] == k
    top = set(np.argsort(-np.abs(w), axis=None, kind="stable")[:k].tolist())
    row_ptr, cols = np.asarray(layer.sparse_row_ptr), np.asarray(layer.sparse_col_idx)
    kept = {r * 128 + int(cols[i]) for r in range(32) for i in range(row_ptr[r], row_ptr[r + 1])}
    # Residuals that happen to be exactly zero are not stored, so kept ⊆ top and covers nearly all.
    assert kept <= top and len(kept) >= k - 2
    dense = nuq.dequantize(layer)
    for flat in top:
        r, c = divmod(flat, 128)
        assert abs(dense[r, c] - w[r, c]) <= abs(w[r, c]) * 2**-10


def test_group_size_gives_one_codebook_per_group(nuq):
    w = weights(4, 256, 7)
    layer = nuq.quantize(w, 2, group_size=64)
    assert layer.group_size == 64 and np.asarray(layer.lut).shape == (4, 4, 4)
    idx = decode_indices(np.asarray(layer.qweight), 256, 2)
    np.testing.assert_array_equal(idx, layer.indices())


def test_results_do_not_depend_on_threads(nuq):
    w = weights(64, 320, 8)
    a = nuq.quantize(w, 3, threads=1, outlier_fraction=0.002)
    b = nuq.quantize(w, 3, threads=2, outlier_fraction=0.002)
    np.testing.assert_array_equal(a.qweight, b.qweight)
    np.testing.assert_array_equal(a.lut, b.lut)


# ---- linear --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [None, 1, 3, 16, 17, 40])
def test_linear_matches_dense_product(nuq, batch):
    w = weights(48, 320, 9)
    layer = nuq.quantize(w, 3, outlier_fraction=0.005)
    dense = dense_weight(layer).astype(np.float64)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((320,) if batch is None else (batch, 320)).astype(np.float32)
    y = nuq.linear(layer, x)
    expected = x.astype(np.float64) @ dense.T
    assert y.shape == expected.shape and y.dtype == np.float32
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(dense).T) + 1e-30
    assert np.all(np.abs(y - expected) <= bound)


def test_linear_isa_choices_agree(nuq):
    w = weights(40, 256, 11)
    layer = nuq.quantize(w, 4)
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    ref = nuq.linear(layer, x, isa="scalar")
    np.testing.assert_allclose(nuq.linear(layer, x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="isa must be"):
        nuq.linear(layer, x, isa="sse2")


def test_outputs_are_written_in_place(nuq):
    w = weights(16, 128, 12)
    layer = nuq.quantize(w, 4)
    x = np.ones((2, 128), np.float32)
    out = np.full((2, 16), np.nan, np.float32)
    assert nuq.linear(layer, x, out=out) is out
    assert not np.isnan(out).any()
    dense = np.empty((16, 128), np.float32)
    assert nuq.dequantize(layer, out=dense) is dense
    np.testing.assert_array_equal(dense, dense_weight(layer))


def test_empty_batch(nuq):
    layer = nuq.quantize(weights(8, 64, 13), 2)
    assert nuq.linear(layer, np.zeros((0, 64), np.float32)).shape == (0, 8)


# ---- zero copy -----------------------------------------------------------------------------------------

def test_layer_arrays_view_nuq_memory(nuq):
    layer = nuq.quantize(weights(8, 64, 14), 3, outlier_fraction=0.02)
    for name in ("qweight", "lut", "sparse_col_idx", "sparse_values", "sparse_row_ptr"):
        a, b = getattr(layer, name), getattr(layer, name)
        assert not a.flags.owndata and not a.flags.writeable
        assert np.shares_memory(a, b), name  # two reads, one buffer: no copy per access
    assert layer.qweight.base is not None


def test_layer_from_arrays_references_them(nuq):
    src = nuq.quantize(weights(8, 64, 15), 4, outlier_fraction=0.02)
    parts = [np.array(getattr(src, n)) for n in ("qweight", "lut", "sparse_row_ptr", "sparse_col_idx", "sparse_values")]
    layer = nuq.PackedLayer(parts[0], parts[1], 64, *parts[2:])
    assert np.shares_memory(layer.qweight, parts[0]) and np.shares_memory(layer.lut, parts[1])
    assert np.shares_memory(layer.sparse_values, parts[4])
    np.testing.assert_array_equal(nuq.dequantize(layer), nuq.dequantize(src))
    # The layer keeps the arrays alive after the caller drops them.
    expected = nuq.dequantize(layer)
    del parts
    np.testing.assert_array_equal(nuq.dequantize(layer), expected)
    # Raw fp16 bits (uint16) and a buffer-protocol object (memoryview) are accepted as well.
    raw = nuq.PackedLayer(memoryview(np.array(src.qweight)), np.array(src.lut).view(np.uint16), 64,
                          np.array(src.sparse_row_ptr), np.array(src.sparse_col_idx), np.array(src.sparse_values))
    np.testing.assert_array_equal(nuq.dequantize(raw), expected)


class FakeDevice:
    """A DLPack producer on another device, as a CUDA tensor would present itself."""

    def __init__(self, device_type, device_id=0):
        self.device = (device_type, device_id)

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None):
        raise AssertionError("nuq must not try to read device memory")


def test_device_memory_is_refused_with_a_clear_error(nuq):
    layer = nuq.quantize(weights(8, 64, 16), 2)
    with pytest.raises(ValueError, match=r"linear: x is on cuda:1, but this function reads host \(CPU\) memory"):
        nuq.linear(layer, FakeDevice(2, 1))
    with pytest.raises(ValueError, match=r"quantize: weight is on rocm:0"):
        nuq.quantize(FakeDevice(10), 3)
    if not nuq.HAS_CUDA:
        with pytest.raises(ValueError, match="no CUDA support"):
            nuq.linear(layer, FakeDevice(2))


# ---- errors --------------------------------------------------------------------------------------------

def test_argument_errors_name_the_argument(nuq):
    w = weights(8, 64, 17)
    layer = nuq.quantize(w, 2)
    x = np.ones((3, 64), np.float32)
    with pytest.raises(TypeError, match=r"linear: x must have dtype float32, got float64"):
        nuq.linear(layer, x.astype(np.float64))
    with pytest.raises(ValueError, match=r"linear: x must be C-contiguous"):
        nuq.linear(layer, np.ones((64, 3), np.float32).T)
    with pytest.raises(ValueError, match=r"linear: x: dimension 1 must be 64"):
        nuq.linear(layer, np.ones((3, 65), np.float32))
    with pytest.raises(ValueError, match=r"linear: x must be 1-D to 2-D, got shape \(1, 3, 64\)"):
        nuq.linear(layer, np.ones((1, 3, 64), np.float32))
    with pytest.raises(TypeError, match=r"linear: x must be a NumPy array .* got builtins.list"):
        nuq.linear(layer, [1.0] * 64)
    with pytest.raises(TypeError, match=r"linear: x is required, got None"):
        nuq.linear(layer, None)
    with pytest.raises(ValueError, match=r"linear: out must be writeable"):
        ro = np.zeros((3, 8), np.float32)
        ro.flags.writeable = False
        nuq.linear(layer, x, out=ro)
    with pytest.raises(ValueError, match=r"linear: out: dimension 1 must be 8"):
        nuq.linear(layer, x, out=np.zeros((3, 9), np.float32))
    with pytest.raises(TypeError, match=r"quantize: weight must have dtype float32, got float16"):
        nuq.quantize(w.astype(np.float16), 3)
    with pytest.raises(ValueError, match=r"quantize: sensitivity: dimension 1 must be 64"):
        nuq.quantize(w, 3, sensitivity=np.ones((8, 63), np.float32))
    with pytest.raises(ValueError, match="method"):
        nuq.quantize(w, 3, method="gptq")
    with pytest.raises(ValueError, match="kmeans_init"):
        nuq.quantize(w, 3, kmeans_init="random")
    with pytest.raises(ValueError, match="5"):
        nuq.quantize(w, 5)
    bad = w.copy()
    bad[3, 7] = np.nan
    with pytest.raises(ValueError, match="my_layer"):
        nuq.quantize(bad, 3, name="my_layer")


def test_invalid_packed_layers_are_rejected(nuq):
    src = nuq.quantize(weights(4, 64, 18), 2)
    qweight, lut = np.array(src.qweight), np.array(src.lut)
    with pytest.raises(ValueError, match=r"lut: dimension 2 must be 4, 8 or 16"):
        nuq.PackedLayer(qweight, np.zeros((4, 1, 5), np.float16), 64)
    with pytest.raises(ValueError, match=r"qweight: dimension 1 must be 16"):
        nuq.PackedLayer(qweight[:, :8].copy(), lut, 64)
    with pytest.raises(ValueError, match="give all of"):
        nuq.PackedLayer(qweight, lut, 64, sparse_values=np.zeros(1, np.float16))
    nan_lut = lut.copy()
    nan_lut[1, 0, 2] = np.nan
    with pytest.raises(ValueError, match="PackedLayer"):
        nuq.PackedLayer(qweight, nan_lut, 64)
    # Columns 60..63 of a 60-column layer are padding and must hold index 0.
    padded = nuq.pack_indices(np.full((4, 64), 3, np.uint8), 2)
    with pytest.raises(ValueError, match="PackedLayer"):
        nuq.PackedLayer(padded, lut, 60)
    # validate=False skips only the content check; shapes and dtypes are still checked.
    assert nuq.PackedLayer(padded, lut, 60, validate=False).cols == 60
    with pytest.raises(TypeError, match="lut must have dtype"):
        nuq.PackedLayer(padded, lut.astype(np.float32), 60, validate=False)
    with pytest.raises(ValueError, match="PackedLayer"):  # column out of range
        nuq.PackedLayer(qweight, lut, 64, np.array([0, 1, 1, 1, 1], np.int32), np.array([64], np.uint16),
                        np.array([1.0], np.float16))


# ---- k-means -------------------------------------------------------------------------------------------

def brute_force_kmeans(x, w, k):
    order = np.argsort(x, kind="stable")
    xs, ws = x[order].astype(np.float64), w[order].astype(np.float64)
    best = np.inf
    for cuts in itertools.combinations(range(1, len(xs)), k - 1):
        cost = 0.0
        for seg in np.split(np.arange(len(xs)), cuts):
            m = (ws[seg] * xs[seg]).sum() / ws[seg].sum()
            cost += (ws[seg] * (xs[seg] - m) ** 2).sum()
        best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_exact_dp_is_optimal(nuq, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(11).astype(np.float32)
    w = rng.uniform(0.1, 2, 11).astype(np.float32)
    centers, cost = nuq.kmeans_1d(x, 4, weights=w, init="exact_dp")
    assert centers.shape == (4,) and np.all(np.diff(centers) >= 0)
    assert cost == pytest.approx(brute_force_kmeans(x, w, 4), rel=1e-6, abs=1e-9)
    nearest = np.abs(x[:, None].astype(np.float64) - centers[None, :]).min(axis=1)
    assert cost == pytest.approx((w * nearest**2).sum(), rel=1e-5)


# ---- statistics ----------------------------------------------------------------------------------------

def test_fisher_accumulator(nuq, tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(3)
    grads = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(4)]
    a, b = nuq.FisherAccumulator(), nuq.FisherAccumulator()
    for g in grads[:3]:
        a.add("l.weight", g)
    b.add("l.weight", grads[3])
    b.add("other.weight", grads[0][0])
    a.merge(b)
    assert a.names() == ["l.weight", "other.weight"] and a.count("l.weight") == 4
    assert a.shape("l.weight") == (6, 5)
    squares = np.square(np.array(grads, dtype=np.float64))
    np.testing.assert_allclose(a.sum("l.weight"), squares.sum(0), rtol=1e-12)
    np.testing.assert_allclose(a.mean("l.weight"), squares.mean(0), rtol=1e-6)
    path = tmp_path / "fisher.safetensors"
    a.save(str(path))
    np.testing.assert_allclose(load_file(str(path))["l.weight"], squares.mean(0), rtol=1e-6)
    loaded = nuq.FisherAccumulator.load(str(path))
    assert loaded.count("l.weight") == 4
    np.testing.assert_allclose(loaded.mean("l.weight"), squares.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="l.weight"):
        a.add("l.weight", np.zeros((5, 6), np.float32))
    bad = grads[0].copy()
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="l.weight"):
        a.add("l.weight", bad)
    assert a.count("l.weight") == 4
    with pytest.raises(OSError):
        nuq.FisherAccumulator.load(str(tmp_path / "missing.safetensors"))


def test_hessian_accumulator(nuq, tmp_path):
    rng = np.random.default_rng(4)
    x1 = rng.standard_normal((2, 7, 9)).astype(np.float32)  # [batch, seq, cols]: 14 tokens
    x2 = rng.standard_normal((5, 9)).astype(np.float32)
    h = nuq.HessianAccumulator()
    h.add("blk.0.q", x1)
    h.add("blk.0.q", x2)
    h.alias("blk.0.k", "blk.0.q")
    x = np.concatenate([x1.reshape(-1, 9), x2]).astype(np.float64)
    expected = x.T @ x / len(x)
    assert h.count("blk.0.k") == 19 and h.cols("blk.0.q") == 9
    np.testing.assert_allclose(h.matrix("blk.0.k"), expected, rtol=1e-12)
    np.testing.assert_allclose(h.diagonal("blk.0.q"), np.diag(expected), rtol=1e-12)
    assert h.trace("blk.0.q") == pytest.approx(np.trace(expected), rel=1e-12)
    path = tmp_path / "h.safetensors"
    h.save(str(path), dtype="F64")
    back = nuq.HessianAccumulator.load(str(path))
    np.testing.assert_allclose(back.matrix("blk.0.k"), expected, rtol=1e-12)
    assert back.aliases() == {"blk.0.k": "blk.0.q"}
    d = nuq.HessianAccumulator(diagonal_only=True)
    d.add("blk.0.q", x2)
    np.testing.assert_allclose(d.diagonal("blk.0.q"), (x2.astype(np.float64) ** 2).mean(0), rtol=1e-12)
    with pytest.raises(ValueError):
        d.matrix("blk.0.q")
    with pytest.raises(ValueError, match="blk.0.q"):
        h.add("blk.0.q", np.ones((3, 8), np.float32))
    with pytest.raises(ValueError, match="'F32' or 'F64'"):
        h.save(str(path), dtype="F16")


def test_hutchinson_trace(nuq):
    rng = np.random.default_rng(6)
    diag = rng.uniform(0, 3, 50)
    est = nuq.hutchinson_trace(lambda v: diag * v, 50)
    # A diagonal operator is estimated exactly by every Rademacher probe.
    assert est["trace"] == pytest.approx(diag.sum(), rel=1e-6) and est["standard_error"] == pytest.approx(0, abs=1e-4)
    assert est["converged"] and est["probes"] == 8
    a = rng.standard_normal((40, 40))
    h = a @ a.T / 40 + np.eye(40)
    seen = []

    def hvp(v):
        assert v.dtype == np.float32 and v.shape == (40,) and set(np.unique(v)) <= {-1.0, 1.0}
        seen.append(v)
        return h @ v

    est = nuq.hutchinson_trace(hvp, 40, seed=3, max_probes=400, rel_tolerance=1e-3)
    assert est["probes"] == len(seen)
    assert abs(est["trace"] - np.trace(h)) <= 5 * est["standard_error"]
    again = nuq.hutchinson_trace(lambda v: h @ v, 40, seed=3, max_probes=400, rel_tolerance=1e-3)
    assert again == est  # deterministic given the seed


def test_hutchinson_callback_errors(nuq):
    class Boom(Exception):
        pass

    def hvp(v):
        raise Boom("from the callback")

    with pytest.raises(Boom, match="from the callback"):
        nuq.hutchinson_trace(hvp, 10)
    with pytest.raises(ValueError, match="hvp.*dimension 0 must be 10"):
        nuq.hutchinson_trace(lambda v: np.ones(9), 10)
    with pytest.raises(TypeError, match="hvp"):
        nuq.hutchinson_trace(lambda v: "nope", 10)


def brute_force_allocation(layers, budget):
    best = None
    for choice in itertools.product(*[range(len(l)) for l in layers]):
        size = sum(layers[i][c][0] for i, c in enumerate(choice))
        omega = sum(layers[i][c][1] for i, c in enumerate(choice))
        if size <= budget and (best is None or omega < best[0] - 1e-12):
            best = (omega, size)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_allocate_bits_is_optimal(nuq, seed):
    rng = np.random.default_rng(seed)
    layers = [[(int(rng.integers(10, 200)), float(rng.uniform(0, 10))) for _ in range(rng.integers(1, 4))]
              for _ in range(5)]
    lo = nuq.minimum_bytes(layers)
    assert lo == sum(min(b for b, _ in l) for l in layers)
    for budget in (lo, lo + 50, lo + 400):
        a = nuq.allocate_bits(layers, budget)
        omega, _ = brute_force_allocation(layers, budget)
        assert a["omega"] == pytest.approx(omega)
        assert a["bytes"] == sum(layers[i][c][0] for i, c in enumerate(a["choice"])) <= budget
        assert a["exact"]
    frontier = nuq.pareto_frontier(layers)
    assert all(p["omega"] == pytest.approx(brute_force_allocation(layers, p["bytes"])[0]) for p in frontier)
    assert all(q["bytes"] > p["bytes"] and q["omega"] < p["omega"] for p, q in zip(frontier, frontier[1:]))
    with pytest.raises(ValueError, match=str(lo)):
        nuq.allocate_bits(layers, lo - 1)


# ---- checkpoints ---------------------------------------------------------------------------------------

def small_model(path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((32, 64)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": weights(96, 64, 20),
        "model.layers.0.mlp.down_proj.weight": weights(64, 96, 21),
        "model.norm.weight": np.ones(64, np.float32),
    }
    save_file(tensors, str(path))
    return tensors


def test_quantize_checkpoint_with_progress(nuq, tmp_path):
    tensors = small_model(tmp_path / "in.safetensors")
    events = []
    caller = threading.get_ident()

    def progress(p):
        assert threading.get_ident() == caller
        events.append(p)

    result = nuq.quantize_checkpoint(str(tmp_path / "in.safetensors"), str(tmp_path / "out"), 3,
                                     outlier_fraction=0.01, progress=progress)
    stages = [e["stage"] for e in events]
    assert stages == ["disk", "start", "quantized", "start", "quantized", "assemble", "done"]
    # The disk check's estimate covers what the run wrote at its peak: the layer files, then the checkpoint
    # beside them (within the few KiB per layer it allows for headers and metadata).
    report = json.loads((tmp_path / "out" / "quant_report.json").read_text())
    peak = report["quantized_bytes"] + result["output_bytes"]
    assert peak <= events[0]["bytes_needed"] <= peak + 2 * 2 * 4096, (events[0]["bytes_needed"], peak)
    assert events[0]["bytes_free"] > events[0]["bytes_needed"] and events[0]["name"] == str(tmp_path / "out")
    assert [e["name"] for e in events if e["stage"] == "quantized"] == [r["name"] for r in result["layers"]]
    assert events[-2]["weights_done"] == events[-2]["weights_total"] == 2 * 96 * 64
    assert result["tensors_copied"] == 2 and "model.safetensors" in result["files"]
    ck = nuq.Checkpoint(str(tmp_path / "out"))
    assert ck.is_quantized
    assert ck.layers == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    for record in result["layers"]:
        layer = ck.layer(record["base"])
        assert layer.method == "nuq" and layer.bits == 3
        # The checkpoint holds exactly what quantizing the tensor by itself gives.
        alone = nuq.quantize(tensors[record["name"]], 3, outlier_fraction=0.01)
        np.testing.assert_array_equal(nuq.dequantize(layer), nuq.dequantize(alone))
        dense = dense_weight(layer)
        assert record["mse"] == pytest.approx(((tensors[record["name"]] - dense) ** 2).mean(), rel=1e-6)
        assert not layer.qweight.flags.owndata  # a view of the memory-mapped file
    emb = ck.tensor("model.embed_tokens.weight")
    np.testing.assert_array_equal(emb, tensors["model.embed_tokens.weight"])
    assert not emb.flags.writeable and not emb.flags.owndata
    with pytest.raises(KeyError, match="no packed layer"):
        ck.layer("model.norm")


def test_progress_exceptions_propagate_and_the_run_resumes(nuq, tmp_path):
    small_model(tmp_path / "in.safetensors")

    class Stop(Exception):
        pass

    def stop_after_first(p):
        if p["stage"] == "quantized":
            raise Stop(p["name"])

    with pytest.raises(Stop) as info:
        nuq.quantize_checkpoint(str(tmp_path / "in.safetensors"), str(tmp_path / "out"), 2, progress=stop_after_first)
    first = str(info.value)
    stages = []
    result = nuq.quantize_checkpoint(str(tmp_path / "in.safetensors"), str(tmp_path / "out"), 2,
                                     progress=lambda p: stages.append((p["stage"], p["name"])))
    assert ("resumed", first) in stages
    assert [r["resumed"] for r in result["layers"]] == [r["name"] == first for r in result["layers"]]
    with pytest.raises(TypeError, match="progress must be callable"):
        nuq.quantize_checkpoint(str(tmp_path / "in.safetensors"), str(tmp_path / "o2"), progress=3)
    with pytest.raises(OSError):
        nuq.quantize_checkpoint(str(tmp_path / "missing.safetensors"), str(tmp_path / "o3"))


def test_other_threads_run_while_nuq_works(nuq, tmp_path):
    small_model(tmp_path / "in.safetensors")
    ticks = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(1)
            done.wait(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        w = weights(512, 1024, 30)
        before = len(ticks)
        nuq.quantize(w, 4, kmeans_init="exact_dp", threads=1)
        during = len(ticks) - before
    finally:
        done.set()
        t.join()
    assert during > 0, "the GIL was held during quantize"


def test_write_checkpoint_round_trip(nuq, tmp_path):
    w = weights(16, 128, 22)
    layer = nuq.quantize(w, 4, outlier_fraction=0.01, method="kmeans")
    norm = np.linspace(0, 1, 128, dtype=np.float32)
    path = tmp_path / "q.safetensors"
    nuq.write_checkpoint(str(path), {"blk.0.ffn": layer}, {"blk.0.norm.weight": norm}, {"note": "test"})
    ck = nuq.Checkpoint(str(path))
    assert ck.layers == ["blk.0.ffn"] and ck.metadata["note"] == "test"
    assert ck.layer_config["blk.0.ffn"]["method"] == "kmeans"
    np.testing.assert_array_equal(nuq.dequantize(ck.layer("blk.0.ffn")), nuq.dequantize(layer))
    np.testing.assert_array_equal(ck.tensor("blk.0.norm.weight"), norm)
    # The C++ tool accepts the file, decoding and validating every packed layer.
    run = subprocess.run([sys.executable, "-m", "nuq", "inspect", "--check", str(path)], capture_output=True,
                         text=True, env=python_env())
    assert run.returncode == 0, run.stderr
    assert "blk.0.ffn.qweight" in run.stdout


def python_env():
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(build_dir() / "python") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_python_dash_m_runs_the_cli(nuq):
    from conftest import find_binary

    for args in (["--version"], ["--help"], ["inspect"]):
        py = subprocess.run([sys.executable, "-m", "nuq", *args], capture_output=True, text=True, env=python_env())
        cpp = subprocess.run([str(find_binary("nuq")), *args], capture_output=True, text=True)
        assert (py.returncode, py.stdout, py.stderr) == (cpp.returncode, cpp.stdout, cpp.stderr)
    assert nuq.cli_path().samefile(find_binary("nuq"))


def test_cuda_launcher_arguments_are_checked(nuq):
    args = dict(rows=4, cols=64, bits=3, group_size=64, nnz=0, qweight=0, lut=0, sparse_row_ptr=0,
                sparse_col_idx=0, sparse_values=0, x=0, ldx=64, y=0, ldy=4, batch=1, dtype="float16")
    if not nuq.HAS_CUDA:
        with pytest.raises(ValueError, match="no CUDA support"):
            nuq.cuda_linear(**args)
        return
    with pytest.raises(ValueError, match="null"):  # refused before anything reaches the device
        nuq.cuda_linear(**args)
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        nuq.cuda_linear(**{**args, "bits": 5})
    with pytest.raises(TypeError, match="dtype must be"):
        nuq.cuda_linear(**{**args, "dtype": "float32"})
    assert nuq.cuda_linear_workspace_bytes(4, 64, 3, 64, 0, 1) == 0
