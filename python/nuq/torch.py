"""PyTorch integration, pure Python over the nuq bindings (needs PyTorch; import it as `nuq.torch`).

- Custom ops `torch.ops.nuq.linear` and `torch.ops.nuq.dequantize` (torch.library.custom_op, with fake
  implementations for torch.compile / meta tensors and an autograd formula for the input gradient).
- `QuantLinear`: an nn.Module holding one packed layer as buffers, computing x @ W.T (+ bias) with
  nuq's CPU kernels.
- `load_quantized(model, path)`: swaps the nn.Linear layers a nuq checkpoint quantized for QuantLinear.
- `collect_fisher(model, batches, out_path)`: the diagonal empirical Fisher of every linear weight,
  accumulated from backward hooks and saved as the safetensors file `nuq quantize --fisher` reads.

On CUDA tensors (a QuantLinear moved with .cuda()), torch.ops.nuq.linear runs nuq::cuda::linear in
float16/bfloat16 with float32 accumulation; builds without CUDA raise a ValueError saying so.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

import nuq as _nuq

__all__ = ["QuantLinear", "collect_fisher", "load_quantized"]


def _layer(qweight, lut, sparse_row_ptr, sparse_col_idx, sparse_values, cols, validate=True) -> "_nuq.PackedLayer":
    # PackedLayer reads the tensors through DLPack, without copies; shapes and dtypes are always checked.
    sparse = (sparse_row_ptr, sparse_col_idx, sparse_values) if sparse_values.numel() > 0 else (None, None, None)
    return _nuq.PackedLayer(qweight.detach(), lut.detach(), int(cols), *(t if t is None else t.detach() for t in sparse),
                            validate=validate)


@torch.library.custom_op("nuq::linear", mutates_args=())
def _linear_op(x: torch.Tensor, qweight: torch.Tensor, lut: torch.Tensor, sparse_row_ptr: torch.Tensor,
               sparse_col_idx: torch.Tensor, sparse_values: torch.Tensor, cols: int) -> torch.Tensor:
    """y = x @ W.T for a packed W (docs/format.md); x: float [..., cols] -> y: x.dtype [..., rows].

    Shapes and dtypes are checked; the packed content is trusted, as nuq::cpu::linear trusts it (checking
    it would cost as much as the product): QuantLinear validates it when it receives it.
    """
    layer = _layer(qweight, lut, sparse_row_ptr, sparse_col_idx, sparse_values, cols, validate=False)
    x2 = x.detach().reshape(-1, cols).to(torch.float32).contiguous()
    y = torch.from_numpy(_nuq.linear(layer, x2))  # nuq's output array, not copied
    return y.reshape(*x.shape[:-1], layer.rows).to(x.dtype)


@_linear_op.register_fake
def _(x, qweight, lut, sparse_row_ptr, sparse_col_idx, sparse_values, cols):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@_linear_op.register_kernel("cuda")
def _linear_cuda(x, qweight, lut, sparse_row_ptr, sparse_col_idx, sparse_values, cols):
    # nuq::cuda::linear computes in float16/bfloat16 with float32 accumulation; float32 inputs are
    # rounded to float16 (bfloat16 if they do not fit) and the result is returned in x's dtype.
    if not _nuq.HAS_CUDA:
        raise ValueError("nuq::linear: x is on " + str(x.device) + " but this nuq build has no CUDA support")
    tensors = {"qweight": qweight, "lut": lut, "sparse_row_ptr": sparse_row_ptr, "sparse_col_idx": sparse_col_idx,
               "sparse_values": sparse_values}
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"nuq::linear: {name} is on {t.device} but x is on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"nuq::linear: {name} must be contiguous")
    if x.dtype in (torch.float16, torch.bfloat16):
        act = x.dtype
    elif x.dtype == torch.float32:
        act = torch.float16 if x.abs().max() < 60000 else torch.bfloat16
    else:
        raise TypeError(f"nuq::linear: x must be a floating-point tensor, got {x.dtype}")
    rows, groups, entries = lut.shape
    bits = {4: 2, 8: 3, 16: 4}.get(entries)
    if bits is None or cols % groups != 0:
        raise ValueError(f"nuq::linear: lut of shape {tuple(lut.shape)} does not describe a packed layer of {cols} columns")
    x2 = x.detach().reshape(-1, cols).to(act).contiguous()
    batch = x2.shape[0]
    y = torch.empty(batch, rows, dtype=act, device=x.device)
    if batch > 0:
        nnz = sparse_values.numel()
        ws_bytes = _nuq.cuda_linear_workspace_bytes(rows, cols, bits, cols // groups, nnz, batch)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream().cuda_stream
            blas = torch.cuda.current_blas_handle() if batch > 16 else 0
            _nuq.cuda_linear(rows, cols, bits, cols // groups, nnz, qweight.data_ptr(), lut.data_ptr(),
                             sparse_row_ptr.data_ptr(), sparse_col_idx.data_ptr(), sparse_values.data_ptr(),
                             x2.data_ptr(), cols, y.data_ptr(), rows, batch,
                             "float16" if act == torch.float16 else "bfloat16", stream, blas,
                             0 if ws is None else ws.data_ptr(), ws_bytes)
    return y.reshape(*x.shape[:-1], rows).to(x.dtype)


@torch.library.custom_op("nuq::dequantize", mutates_args=())
def _dequantize_op(qweight: torch.Tensor, lut: torch.Tensor, sparse_row_ptr: torch.Tensor,
                   sparse_col_idx: torch.Tensor, sparse_values: torch.Tensor, cols: int) -> torch.Tensor:
    """The dense float32 weight [rows, cols] of a packed layer (content trusted, as in nuq::linear)."""
    layer = _layer(qweight, lut, sparse_row_ptr, sparse_col_idx, sparse_values, cols, validate=False)
    return torch.from_numpy(_nuq.dequantize(layer))


@_dequantize_op.register_kernel("cuda")
def _dequantize_cuda(qweight, lut, sparse_row_ptr, sparse_col_idx, sparse_values, cols):
    # The exact float32 decode runs on the CPU; this path only serves the backward pass on CUDA.
    cpu = [t.cpu() for t in (qweight, lut, sparse_row_ptr, sparse_col_idx, sparse_values)]
    return _dequantize_op(*cpu, cols).to(qweight.device)


@_dequantize_op.register_fake
def _(qweight, lut, sparse_row_ptr, sparse_col_idx, sparse_values, cols):
    return qweight.new_empty((qweight.shape[0], cols), dtype=torch.float32)


def _linear_setup_context(ctx, inputs, output):
    ctx.packed = inputs[1:]


def _linear_backward(ctx, grad):
    # The packed weights are constants: only x gets a gradient, dL/dx = dL/dy @ W.
    w = torch.ops.nuq.dequantize(*ctx.packed)
    grad_x = (grad.to(torch.float32) @ w).to(grad.dtype)
    return grad_x, None, None, None, None, None, None


torch.library.register_autograd("nuq::linear", _linear_backward, setup_context=_linear_setup_context)


def _validate_after_load(module, incompatible_keys):
    module.packed_layer()  # raises ValueError naming the problem


class QuantLinear(nn.Module):
    """A linear layer y = x @ W.T + b whose W is stored in nuq's packed format and applied by nuq's
    kernels (torch.ops.nuq.linear). Buffers (saved in state_dict):

    qweight uint8 [out, row_bytes(in, bits)]; lut float16 [out, groups, 2**bits];
    sparse_row_ptr int32 [out + 1]; sparse_col_idx uint16 (int32 when in > 65536) [nnz];
    sparse_values float16 [nnz]; bias (a parameter) float32 [out] or None.

    Inputs are float tensors [..., in]. On the CPU float32 is computed directly and other float dtypes
    are converted to float32 and back; on CUDA (module.cuda()) the kernels compute in float16/bfloat16.
    Gradients flow to the input, not to the packed weights.
    """

    def __init__(self, layer: "_nuq.PackedLayer", bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features = layer.cols
        self.out_features = layer.rows
        self.bits = layer.bits
        self.group_size = layer.group_size
        self.method = layer.method
        # Copies: the module owns its buffers (a checkpoint's arrays are read-only views of its file).
        self.register_buffer("qweight", torch.from_numpy(np.array(layer.qweight)))
        self.register_buffer("lut", torch.from_numpy(np.array(layer.lut)))
        self.register_buffer("sparse_row_ptr", torch.from_numpy(np.array(layer.sparse_row_ptr)))
        self.register_buffer("sparse_col_idx", torch.from_numpy(np.array(layer.sparse_col_idx)))
        self.register_buffer("sparse_values", torch.from_numpy(np.array(layer.sparse_values)))
        if bias is not None:
            if tuple(bias.shape) != (layer.rows,):
                raise ValueError(f"QuantLinear: bias must have shape ({layer.rows},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().to(torch.float32).clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        # The ops trust the packed content, so it is checked here and whenever load_state_dict replaces it.
        self.packed_layer()
        self.register_load_state_dict_post_hook(_validate_after_load)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bits: int, group_size: int, nnz: int, bias: bool = False,
              method: str = "nuq") -> "QuantLinear":
        """A QuantLinear with the buffers of that geometry and undefined content, for loaders that fill them
        (transformers' from_pretrained builds these on the meta device and then loads the checkpoint into
        them, see nuq.hf). group_size 0 means one codebook per row. Call packed_layer() once filled: it
        validates the content."""
        if bits not in (2, 3, 4):
            raise ValueError(f"QuantLinear.empty: bits must be 2, 3 or 4, got {bits}")
        group_size = group_size or in_features
        if in_features <= 0 or out_features <= 0 or nnz < 0 or in_features % group_size != 0:
            raise ValueError(f"QuantLinear.empty: inconsistent geometry in_features {in_features} out_features "
                             f"{out_features} group_size {group_size} nnz {nnz}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.bits, self.group_size, self.method = (
            in_features, out_features, bits, group_size, method)
        # docs/format.md: column indices are 16-bit while they fit, 32-bit beyond 65536 columns.
        col_idx_dtype = torch.uint16 if in_features <= 65536 else torch.int32
        self.register_buffer("qweight", torch.empty(out_features, _nuq.row_bytes(in_features, bits), dtype=torch.uint8))
        self.register_buffer("lut", torch.empty(out_features, in_features // group_size, 2**bits, dtype=torch.float16))
        # A checkpoint stores no sparse tensors for a layer without sparse values (docs/format.md), so
        # then they are not part of the state (nothing to load or save) and are made here, empty and real.
        sparse_device = None if nnz else "cpu"
        self.register_buffer("sparse_row_ptr", torch.zeros(out_features + 1, dtype=torch.int32, device=sparse_device),
                             persistent=nnz > 0)
        self.register_buffer("sparse_col_idx", torch.empty(nnz, dtype=col_idx_dtype, device=sparse_device),
                             persistent=nnz > 0)
        self.register_buffer("sparse_values", torch.empty(nnz, dtype=torch.float16, device=sparse_device),
                             persistent=nnz > 0)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_load_state_dict_post_hook(_validate_after_load)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, **quantize_options) -> "QuantLinear":
        """Quantizes linear.weight with nuq.quantize(weight, bits, **quantize_options) and keeps the bias."""
        w = linear.weight.detach().to(torch.float32).cpu().contiguous()
        if "sensitivity" in quantize_options and isinstance(quantize_options["sensitivity"], torch.Tensor):
            quantize_options["sensitivity"] = quantize_options["sensitivity"].detach().to(torch.float32).cpu().contiguous()
        return cls(_nuq.quantize(w, bits, **quantize_options), linear.bias)

    def packed_layer(self) -> "_nuq.PackedLayer":
        """A PackedLayer viewing this module's buffers (no copy), validated (ValueError if inconsistent)."""
        return _layer(self.qweight, self.lut, self.sparse_row_ptr, self.sparse_col_idx, self.sparse_values,
                      self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight [out_features, in_features]."""
        return torch.ops.nuq.dequantize(self.qweight, self.lut, self.sparse_row_ptr, self.sparse_col_idx,
                                        self.sparse_values, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.nuq.linear(x, self.qweight, self.lut, self.sparse_row_ptr, self.sparse_col_idx,
                                 self.sparse_values, self.in_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, nnz={self.sparse_values.numel()}, bias={self.bias is not None}")


def load_quantized(model: nn.Module, path: str, strict: bool = True) -> list:
    """Swaps every nn.Linear that the nuq checkpoint at `path` (file, directory or index) holds as a
    packed layer for a QuantLinear, and copies the checkpoint's unquantized tensors (embeddings, norms,
    biases) into the model's matching parameters and buffers.

    Packed layers are matched by base name: layer "model.layers.0.mlp.up_proj" replaces the submodule
    of that name, which must be an nn.Linear of shape [rows, cols]. With strict, a packed layer without
    such a submodule, or an unquantized tensor the model lacks, raises ValueError; otherwise they are
    skipped. Returns the names of the replaced modules.
    """
    ck = _nuq.Checkpoint(str(path))
    if not ck.is_quantized:
        raise ValueError(f"load_quantized: {path} is not a nuq checkpoint (no quantization_config metadata)")
    # Every layer is checked before the model is changed, so that an error leaves it as it was.
    swaps = []
    packed_tensors = set()
    for base in ck.layers:
        for suffix in (".qweight", ".lut", ".sparse_row_ptr", ".sparse_col_idx", ".sparse_values"):
            packed_tensors.add(base + suffix)
        try:
            module = model.get_submodule(base)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            if strict:
                raise ValueError(f"load_quantized: {path}: packed layer '{base}' has no nn.Linear of that name in the "
                                 f"model (found {type(module).__name__ if module is not None else 'nothing'})")
            continue
        layer = ck.layer(base)
        if (module.out_features, module.in_features) != (layer.rows, layer.cols):
            raise ValueError(f"load_quantized: {path}: '{base}' is [{layer.rows}, {layer.cols}] in the checkpoint but "
                             f"the model's nn.Linear is [{module.out_features}, {module.in_features}]")
        bias = module.bias
        if base + ".bias" in ck:
            bias = torch.from_numpy(np.array(ck.tensor(base + ".bias"), dtype=np.float32))
            packed_tensors.add(base + ".bias")
        swaps.append((base, layer, bias))
    replaced = []
    for base, layer, bias in swaps:
        parent_name, _, child = base.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(layer, bias))
        replaced.append(base)
    state = model.state_dict()
    with torch.no_grad():
        for name in ck.tensor_names:
            if name in packed_tensors:
                continue
            if name not in state:
                if strict:
                    raise ValueError(f"load_quantized: {path}: tensor '{name}' matches nothing in the model")
                continue
            value = torch.from_numpy(np.array(ck.tensor(name)))
            if tuple(value.shape) != tuple(state[name].shape):
                raise ValueError(f"load_quantized: {path}: tensor '{name}' is {tuple(value.shape)} in the checkpoint "
                                 f"but {tuple(state[name].shape)} in the model")
            state[name].copy_(value.to(state[name].dtype))
    return replaced


def _default_loss(model: nn.Module, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = getattr(out, "loss", out)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("collect_fisher: the model's output is not a scalar loss (nor has a .loss); pass loss_fn")
    return loss


def collect_fisher(model: nn.Module, batches: Iterable, out_path: str,
                   loss_fn: Optional[Callable[[nn.Module, object], torch.Tensor]] = None,
                   modules: Optional[Iterable[str]] = None) -> "_nuq.FisherAccumulator":
    """Accumulates the diagonal empirical Fisher E[g**2] of the weights of the model's nn.Linear layers
    and writes it to `out_path` (safetensors, tensor "<module>.weight", what `nuq quantize --fisher` reads).

    batches: iterable of model inputs (a tensor, or a dict passed as keyword arguments).
    loss_fn(model, batch) -> scalar loss; default: model(batch), or its .loss (Hugging Face models).
    modules: names of the nn.Linear modules to cover; default: all of them.
    Each batch's gradient is one sample, so use batches of one sequence for the per-sample Fisher.
    A backward hook on each weight hands its gradient to a FisherAccumulator (float64 sums in C++),
    layer by layer as backward reaches it; .grad is cleared after every batch.
    Returns the accumulator.
    """
    loss_fn = loss_fn or _default_loss
    wanted = None if modules is None else set(modules)
    acc = _nuq.FisherAccumulator()
    hooks = []

    def hook_for(name):
        def hook(grad):
            acc.add(name, grad.detach().to(torch.float32).cpu().contiguous())
            return grad
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (wanted is None or name in wanted):
            if not module.weight.requires_grad:
                module.weight.requires_grad_(True)
            hooks.append(module.weight.register_hook(hook_for(name + ".weight")))
    if wanted is not None:
        missing = wanted - {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        if missing:
            for h in hooks:
                h.remove()
            raise ValueError(f"collect_fisher: no nn.Linear named {sorted(missing)}")
    if not hooks:
        raise ValueError("collect_fisher: the model has no nn.Linear layers to collect statistics for")
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
        model.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    if not acc.names():
        raise ValueError("collect_fisher: no gradient reached the linear layers (no batches, or the loss does not "
                         "depend on them)")
    acc.save(str(out_path))
    return acc
