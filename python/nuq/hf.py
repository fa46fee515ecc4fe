"""Hugging Face transformers integration: `import nuq.hf` registers the quantization method "nuq".

After that, `AutoModelForCausalLM.from_pretrained(quantized_dir)` loads a checkpoint written by
`nuq quantize` / `nuq.quantize_checkpoint` / `nuq.quantize_pretrained` / `nuq tune` from a Hugging Face
model directory: transformers builds the model on the meta device, this quantizer swaps every nn.Linear
that config.json's `quantization_config.layers` names for an empty `nuq.torch.QuantLinear` of that
geometry, and transformers then fills the packed buffers (qweight, lut, sparse_*) from the safetensors
file. No full-precision copy of a quantized weight exists at any point. `generate()` works as for any
model; `save_pretrained()` writes the packed tensors and the same quantization_config (also into the
safetensors metadata, so `nuq eval` and the C++ decoder read the result too).

The checkpoint is checked against its config before anything is loaded: a missing packed tensor or one of
the wrong shape or dtype raises ValueError naming it; after loading every layer's content is validated
(codebooks finite, sparse rows well formed), and errors name the module.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import transformers
from torch import nn

# The quantizer hooks used here (checkpoint_files before loading, the loader's converters) are transformers 5's.
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"nuq.hf needs transformers 5 or later, found {transformers.__version__} "
                      "(pip install 'transformers>=5')")

from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                         register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

import nuq as _nuq
from nuq.torch import QuantLinear

__all__ = ["NuqConfig", "NuqHfQuantizer"]

QUANT_METHOD = "nuq"
_LAYER_INTEGERS = ("bits", "rows", "cols", "group_size", "nnz")


class NuqConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` of a nuq checkpoint (docs/format.md, "Checkpoint metadata").

    layers: {module name: {bits, rows, cols, group_size, nnz, method, source_dtype}}, the packed layers.
    bits: the bits of every layer, or None for a mixed-precision plan. group_size: weights per codebook
    (0: one per row), None when layers differ. sparse_fraction: stored sparse values over quantized
    weights. extra: free-form strings (tool, options, codebook tuning). format_version: of the packed
    format; this nuq reads nuq.FORMAT_VERSION only.

    Every value is checked when the config is built; a bad one raises ValueError naming
    `quantization_config.<key>`.
    """

    def __init__(self, layers: Optional[Dict[str, Dict[str, Any]]] = None, format_version: int = _nuq.FORMAT_VERSION,
                 bits: Optional[int] = None, group_size: Optional[int] = None, sparse_fraction: float = 0.0,
                 extra: Optional[Dict[str, str]] = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # registered methods are plain strings
        self.format_version = format_version
        self.bits = bits
        self.group_size = group_size
        self.sparse_fraction = sparse_fraction
        self.layers = dict(layers or {})
        self.extra = dict(extra or {})
        unknown = sorted(k for k in kwargs if k != "quant_method")
        if unknown:
            raise ValueError(f"quantization_config: unknown key(s) {unknown} for quant_method 'nuq'")
        if kwargs.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise ValueError(f"quantization_config.quant_method is {kwargs['quant_method']!r}, not 'nuq'")
        self.post_init()

    def post_init(self) -> None:
        if self.format_version != _nuq.FORMAT_VERSION:
            raise ValueError(f"quantization_config.format_version is {self.format_version!r}; this nuq "
                             f"{_nuq.__version__} reads packed format version {_nuq.FORMAT_VERSION} only")
        if self.bits is not None and self.bits not in (2, 3, 4):
            raise ValueError(f"quantization_config.bits is {self.bits!r}; nuq packs 2, 3 or 4 bits (null: mixed)")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 0):
            raise ValueError(f"quantization_config.group_size is {self.group_size!r}, not a count of weights")
        if not isinstance(self.sparse_fraction, (int, float)) or not 0 <= self.sparse_fraction < 1:
            raise ValueError(f"quantization_config.sparse_fraction is {self.sparse_fraction!r}, not in [0, 1)")
        if not self.layers:
            raise ValueError("quantization_config.layers is empty: the checkpoint names no packed layer")
        for name, meta in self.layers.items():
            _check_layer(name, meta)


def _check_layer(name: str, meta: Any) -> None:
    key = f"quantization_config.layers[{name!r}]"
    if not isinstance(meta, dict):
        raise ValueError(f"{key} is not an object")
    for field in _LAYER_INTEGERS:
        if not isinstance(meta.get(field), int) or isinstance(meta.get(field), bool):
            raise ValueError(f"{key}.{field} is missing or not an integer (got {meta.get(field)!r})")
    if meta["bits"] not in (2, 3, 4):
        raise ValueError(f"{key}.bits is {meta['bits']}; nuq packs 2, 3 or 4 bits")
    rows, cols, group, nnz = meta["rows"], meta["cols"], meta["group_size"], meta["nnz"]
    if rows <= 0 or cols <= 0 or group <= 0 or cols % group != 0 or not 0 <= nnz <= rows * cols:
        raise ValueError(f"{key} has inconsistent geometry: rows {rows}, cols {cols}, group_size {group}, nnz {nnz}")


def _expected_tensors(name: str, meta: Dict[str, Any]) -> Dict[str, Tuple[str, List[int]]]:
    """The packed tensors of one layer as (dtype, shape), as docs/format.md specifies them."""
    rows, cols, bits, nnz = meta["rows"], meta["cols"], meta["bits"], meta["nnz"]
    dense = {
        f"{name}.qweight": ("U8", [rows, _nuq.row_bytes(cols, bits)]),
        f"{name}.lut": ("F16", [rows, cols // meta["group_size"], 2**bits]),
    }
    if nnz == 0:  # a layer without sparse values stores no sparse tensors
        return dense
    return {**dense, f"{name}.sparse_row_ptr": ("I32", [rows + 1]),
            f"{name}.sparse_col_idx": ("U16" if cols <= 65536 else "I32", [nnz]),
            f"{name}.sparse_values": ("F16", [nnz])}


def _safetensors_headers(files: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    """{tensor name: {"dtype", "shape"}} of the checkpoint files, from their headers alone."""
    headers: Dict[str, Dict[str, Any]] = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            continue
        with open(path, "rb") as f:
            prefix = f.read(8)
            size = int.from_bytes(prefix, "little")
            text = f.read(size) if len(prefix) == 8 and size <= os.path.getsize(path) - 8 else b""
        try:
            header = json.loads(text)
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: not a safetensors file (truncated, or its header is not a JSON object)")
        header.pop("__metadata__", None)
        headers.update(header)
    return headers


def check_checkpoint_files(config: NuqConfig, files: Iterable[str]) -> None:
    """Raises ValueError naming the first packed tensor that is missing from the checkpoint files or has
    another dtype or shape than config.layers implies."""
    files = list(files)
    headers = _safetensors_headers(files)
    where = os.path.dirname(str(files[0])) if files else "the checkpoint"
    for name, meta in config.layers.items():
        for tensor, (dtype, shape) in _expected_tensors(name, meta).items():
            found = headers.get(tensor)
            if found is None:
                raise ValueError(f"{where}: packed tensor '{tensor}' is missing (quantization_config.layers names "
                                 f"'{name}')")
            if found["dtype"] != dtype or list(found["shape"]) != shape:
                raise ValueError(f"{where}: packed tensor '{tensor}' is {found['dtype']} {found['shape']}, but "
                                 f"quantization_config.layers['{name}'] implies {dtype} {shape}")


def _linear_for(model: nn.Module, name: str, meta: Dict[str, Any]) -> nn.Linear:
    """The model's nn.Linear that packed layer `name` replaces, checked against the layer's shape."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"quantization_config.layers names '{name}', which is not an nn.Linear of "
                         f"{type(model).__name__} (found {type(module).__name__ if module is not None else 'nothing'})")
    if (module.out_features, module.in_features) != (meta["rows"], meta["cols"]):
        raise ValueError(f"quantization_config.layers['{name}'] is [{meta['rows']}, {meta['cols']}] but the "
                         f"model's nn.Linear is [{module.out_features}, {module.in_features}]")
    return module


class NuqHfQuantizer(HfQuantizer):
    """Loads nuq checkpoints into transformers models (pre-quantized only: quantize with nuq first)."""

    requires_calibration = True
    quantization_config: NuqConfig

    def __init__(self, quantization_config: NuqConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: List[str] = []

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        devices = set(device_map.values()) if isinstance(device_map, dict) else set()
        if devices & {"disk"}:
            raise ValueError("nuq: offloading packed layers to disk is not supported")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: Optional[List[str]] = None,
                                             **kwargs: Any) -> None:
        # Everything is checked before the first module is swapped: the model's shape, then the files.
        linears = {name: _linear_for(model, name, meta) for name, meta in self.quantization_config.layers.items()}
        if checkpoint_files:
            check_checkpoint_files(self.quantization_config, checkpoint_files)
        for name, meta in self.quantization_config.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            group = 0 if meta["group_size"] == meta["cols"] else meta["group_size"]
            with torch.device("meta"):
                setattr(parent, child, QuantLinear.empty(meta["cols"], meta["rows"], meta["bits"], group, meta["nnz"],
                                                         bias=linears[name].bias is not None,
                                                         method=str(meta.get("method", "nuq"))))

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, module in model.named_modules():
            if not isinstance(module, QuantLinear):
                continue
            if any(t.is_meta for t in module.buffers()):
                raise ValueError(f"nuq: '{name}' was not loaded from the checkpoint (a packed tensor is missing)")
            try:
                module.packed_layer()
            except ValueError as e:
                raise ValueError(f"nuq: packed layer '{name}' is invalid: {e}") from e
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> Tuple[None, Dict[str, str]]:
        # The C++ readers (nuq eval, the decoder, nuq.Checkpoint) find the packed layers in the safetensors
        # metadata, so save_pretrained's files carry it as nuq quantize's do.
        # Every shard gets the whole model's layers (this hook cannot tell shards apart); nuq's readers look
        # each layer's tensors up across the shards, so that reads back the same.
        config = self.quantization_config
        metadata = {"quantization_config": json.dumps({
            "quant_method": QUANT_METHOD, "format_version": config.format_version, "layers": config.layers,
            "extra": config.extra})}
        return None, metadata

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _register() -> None:
    # Registration is global to transformers; importing this module twice (reloads, notebooks) must not fail.
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(NuqConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(NuqHfQuantizer)


_register()
