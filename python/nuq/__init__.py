"""nuq: post-training quantization of large language models.

The heavy lifting happens in the C++ library; this package re-exports its bindings (nuq._nuq). Arrays
go in and come out without copies: NumPy arrays, and any object exposing DLPack or the buffer protocol
(PyTorch CPU tensors, for instance), are read in place; results are NumPy arrays, and the arrays of a
PackedLayer or Checkpoint view nuq's own memory. docs/python.md is the quickstart.

`nuq.torch` (imported on demand: it needs PyTorch) adds QuantLinear, load_quantized and collect_fisher.
"""
from ._nuq import (
    FORMAT_VERSION,
    HAS_CUDA,
    Checkpoint,
    FisherAccumulator,
    HessianAccumulator,
    PackedLayer,
    __version__,
    allocate_bits,
    cuda_device_count,
    cuda_linear,
    cuda_linear_workspace_bytes,
    dequantize,
    hutchinson_trace,
    inspect,
    kmeans_1d,
    linear,
    measure,
    minimum_bytes,
    pack_indices,
    pareto_frontier,
    quantize,
    quantize_checkpoint,
    row_bytes,
    unpack_indices,
    write_checkpoint,
)
from ._cli import cli_path

__all__ = [
    "FORMAT_VERSION",
    "HAS_CUDA",
    "Checkpoint",
    "FisherAccumulator",
    "HessianAccumulator",
    "PackedLayer",
    "__version__",
    "allocate_bits",
    "cli_path",
    "cuda_device_count",
    "cuda_linear",
    "cuda_linear_workspace_bytes",
    "dequantize",
    "hutchinson_trace",
    "inspect",
    "kmeans_1d",
    "linear",
    "measure",
    "minimum_bytes",
    "pack_indices",
    "pareto_frontier",
    "quantize",
    "quantize_checkpoint",
    "row_bytes",
    "unpack_indices",
    "write_checkpoint",
]
