"""nuq: post-training quantization of large language models.

The heavy lifting happens in the C++ library; this package re-exports its bindings.
"""
from ._nuq import FORMAT_VERSION, __version__, inspect, pack_indices, row_bytes, unpack_indices

__all__ = ["FORMAT_VERSION", "__version__", "inspect", "pack_indices", "row_bytes", "unpack_indices"]
