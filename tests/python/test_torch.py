"""nuq.torch and the PyTorch side of the bindings (DLPack inputs). Skipped, with the reason, where PyTorch
is not installed; expected values come from plain torch/NumPy computations on the dequantized weights."""
import numpy as np
import pytest

from nuq_package import dense_weight, import_nuq

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")
nn = torch.nn


@pytest.fixture(scope="module")
def nuq():
    return import_nuq()


@pytest.fixture(scope="module")
def nt(nuq):
    import nuq.torch as module

    return module


def test_torch_tensors_are_read_in_place(nuq):
    src = nuq.quantize(np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32), 3,
                       outlier_fraction=0.01)
    qweight = torch.from_numpy(np.array(src.qweight))
    lut = torch.from_numpy(np.array(src.lut))
    layer = nuq.PackedLayer(qweight, lut, 128, torch.from_numpy(np.array(src.sparse_row_ptr)),
                            torch.from_numpy(np.array(src.sparse_col_idx)), torch.from_numpy(np.array(src.sparse_values)))
    assert np.shares_memory(layer.qweight, qweight.numpy()) and np.shares_memory(layer.lut, lut.numpy())
    x = torch.randn(5, 128)
    y = nuq.linear(layer, x)
    dense = dense_weight(src).astype(np.float64)
    np.testing.assert_allclose(y, x.double().numpy() @ dense.T, rtol=1e-5, atol=1e-5)
    out = torch.empty(5, 16)
    nuq.linear(layer, x, out=out)  # written through DLPack into the tensor's own memory
    np.testing.assert_array_equal(out.numpy(), y)


def test_torch_argument_errors(nuq):
    layer = nuq.quantize(np.ones((8, 64), np.float32), 2)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        nuq.linear(layer, torch.randn(64, 3).t())
    with pytest.raises(TypeError, match=r"x must have dtype float32, got float16"):
        nuq.linear(layer, torch.randn(3, 64).half())
    with pytest.raises(TypeError, match="require gradient"):
        nuq.linear(layer, torch.randn(3, 64, requires_grad=True))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"x is on cuda:0, but this function reads host \(CPU\) memory"):
            nuq.linear(layer, torch.randn(3, 64, device="cuda"))


def reference_linear(q, x):
    w = torch.from_numpy(dense_weight(q.packed_layer())).double()
    y = x.double() @ w.T
    return y if q.bias is None else y + q.bias.double()


@pytest.mark.parametrize("shape", [(128,), (1, 128), (7, 128), (2, 20, 128)])
def test_quant_linear_forward(nt, shape):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    q = nt.QuantLinear.from_linear(lin, 3, outlier_fraction=0.01)
    assert (q.in_features, q.out_features, q.bits) == (128, 48, 3)
    x = torch.randn(*shape)
    y = q(x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference_linear(q, x), rtol=1e-5, atol=1e-5)
    # Half-precision inputs are computed in float32 and returned in their own dtype.
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_quant_linear_gradient_reaches_the_input(nt):
    torch.manual_seed(1)
    q = nt.QuantLinear.from_linear(nn.Linear(64, 32, bias=False), 4)
    x = torch.randn(3, 64, requires_grad=True)
    g = torch.randn(3, 32)
    (q(x) * g).sum().backward()
    w = torch.from_numpy(dense_weight(q.packed_layer()))
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)


def test_custom_ops_pass_opcheck(nt):
    torch.manual_seed(2)
    q = nt.QuantLinear.from_linear(nn.Linear(96, 40), 3, outlier_fraction=0.02)
    packed = (q.qweight, q.lut, q.sparse_row_ptr, q.sparse_col_idx, q.sparse_values, 96)
    for x in (torch.randn(4, 96), torch.randn(2, 3, 96, requires_grad=True)):
        torch.library.opcheck(torch.ops.nuq.linear.default, (x, *packed))
    torch.library.opcheck(torch.ops.nuq.dequantize.default, packed)


def test_state_dict_round_trip(nt):
    q = nt.QuantLinear.from_linear(nn.Linear(64, 16), 2)
    state = q.state_dict()
    assert set(state) == {"qweight", "lut", "sparse_row_ptr", "sparse_col_idx", "sparse_values", "bias"}
    assert state["lut"].dtype == torch.float16 and state["qweight"].dtype == torch.uint8
    x = torch.randn(2, 64)
    torch.testing.assert_close(q(x), reference_linear(q, x).float(), rtol=1e-5, atol=1e-5)
    other = nt.QuantLinear.from_linear(nn.Linear(64, 16), 2)
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), q(x))
    # The ops trust packed content, so a corrupt state is refused when it is loaded.
    bad = {k: v.clone() for k, v in state.items()}
    bad["lut"][3, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="PackedLayer"):
        other.load_state_dict(bad)


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 64)
        self.up_proj = nn.Linear(64, 96)
        self.down_proj = nn.Linear(96, 64, bias=False)
        self.norm = nn.LayerNorm(64)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.norm(h + self.down_proj(torch.relu(self.up_proj(h))))


def test_load_quantized_swaps_linear_layers(nuq, nt, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = TinyModel()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    nuq.quantize_checkpoint(str(tmp_path / "model.safetensors"), str(tmp_path / "q"), 4,
                            include=[r"_proj\.weight$"])
    fresh = TinyModel()  # different random weights: everything must come from the checkpoint
    replaced = nt.load_quantized(fresh, str(tmp_path / "q"))
    assert sorted(replaced) == ["down_proj", "up_proj"]
    assert isinstance(fresh.up_proj, nt.QuantLinear) and isinstance(fresh.down_proj, nt.QuantLinear)
    torch.testing.assert_close(fresh.embed.weight, model.embed.weight)
    torch.testing.assert_close(fresh.up_proj.bias, model.up_proj.bias)
    # Reference: the original model with its linear weights replaced by the dequantized ones.
    ck = nuq.Checkpoint(str(tmp_path / "q"))
    with torch.no_grad():
        for base in ("up_proj", "down_proj"):
            getattr(model, base).weight.copy_(torch.from_numpy(dense_weight(ck.layer(base))))
    tokens = torch.tensor([[1, 5, 7, 19]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), model(tokens), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not a nuq checkpoint"):
        nt.load_quantized(TinyModel(), str(tmp_path / "model.safetensors"))

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = nn.Linear(64, 95)
            self.down_proj = nn.Linear(96, 64)

    other = Other()
    with pytest.raises(ValueError, match=r"'up_proj' is \[96, 64\] in the checkpoint but the model's nn.Linear is \[95, 64\]"):
        nt.load_quantized(other, str(tmp_path / "q"))
    assert isinstance(other.down_proj, nn.Linear)  # nothing was swapped
    with pytest.raises(ValueError, match="packed layer 'down_proj' has no nn.Linear"):
        nt.load_quantized(nn.Module(), str(tmp_path / "q"))


def test_collect_fisher_matches_squared_gradients(nuq, nt, tmp_path):
    from safetensors.numpy import load_file

    torch.manual_seed(4)
    model = TinyModel()
    batches = [torch.randint(0, 20, (1, 6)) for _ in range(3)]

    def loss_fn(m, tokens):
        return (m(tokens) ** 2).mean()

    expected = {}
    for tokens in batches:
        model.zero_grad()
        loss_fn(model, tokens).backward()
        for name in ("up_proj", "down_proj"):
            g = getattr(model, name).weight.grad.double() ** 2
            expected[name] = expected.get(name, 0) + g / len(batches)
    model.zero_grad()
    path = tmp_path / "fisher.safetensors"
    acc = nt.collect_fisher(model, batches, str(path), loss_fn=loss_fn)
    assert acc.names() == ["down_proj.weight", "up_proj.weight"] and acc.count("up_proj.weight") == 3
    saved = load_file(str(path))
    for name in ("up_proj", "down_proj"):
        np.testing.assert_allclose(saved[name + ".weight"], expected[name].numpy(), rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())
    # The file feeds the quantizer as per-weight sensitivities.
    w = model.up_proj.weight.detach().contiguous()
    layer = nuq.quantize(w, 3, sensitivity=torch.from_numpy(saved["up_proj.weight"]))
    assert layer.stats["weighted_mse"] > 0
    with pytest.raises(ValueError, match="no nn.Linear named"):
        nt.collect_fisher(model, batches, str(path), loss_fn=loss_fn, modules=["nope"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to PyTorch")
@pytest.mark.parametrize("batch", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quant_linear_on_cuda(nuq, nt, batch, dtype):
    if not nuq.HAS_CUDA:
        pytest.skip("this nuq build has no CUDA support")
    torch.manual_seed(5)
    q = nt.QuantLinear.from_linear(nn.Linear(256, 96), 3, outlier_fraction=0.01)
    x = torch.randn(batch, 256)
    expected = reference_linear(q, x.to(dtype).double())
    y = q.cuda()(x.to(dtype).cuda())
    assert y.dtype == dtype and y.device.type == "cuda"
    # fp16/bf16 activations and outputs, fp32 accumulation.
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(y.double().cpu(), expected, rtol=tol, atol=tol)
