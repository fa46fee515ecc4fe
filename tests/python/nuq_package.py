"""Imports the nuq Python package that CMake assembled in $NUQ_BUILD_DIR/python (tests skip, with the
reason, when the build has no Python extension; NUQ_TEST_INSTALLED=1 takes the installed one instead),
and an independent NumPy decoder of the packed format."""
import os
import sys

import numpy as np
import pytest

from conftest import build_dir


def installed():
    """NUQ_TEST_INSTALLED=1: test the nuq that `pip install .` put into this Python, not the build tree's
    (e.g. `NUQ_TEST_INSTALLED=1 venv/bin/python -m pytest tests/python/test_quickstart.py`)."""
    return os.environ.get("NUQ_TEST_INSTALLED") == "1"


def import_nuq():
    if installed():
        import nuq

        return nuq
    path = build_dir() / "python"
    if not (path / "nuq").is_dir() or not any((path / "nuq").glob("_nuq*.so")):
        pytest.skip(f"the Python extension was not built in {build_dir()} (NUQ_BUILD_PYTHON=OFF)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import nuq

    return nuq


def decode_indices(qweight, cols, bits):
    """docs/format.md, written out in NumPy: each row holds bit planes over the columns padded to a
    multiple of 64; 2- and 4-bit indices are one plane, a 3-bit index is a 2-bit plane (low bits)
    followed by a 1-bit plane (high bit); fields are packed from the least significant bit of each byte."""
    padded = -(-cols // 64) * 64
    widths = {2: [2], 3: [2, 1], 4: [4]}[bits]
    rows = qweight.shape[0]
    out = np.zeros((rows, padded), dtype=np.int64)
    offset, shift = 0, 0
    for w in widths:
        nbytes = padded * w // 8
        plane = qweight[:, offset:offset + nbytes]
        bitstream = np.unpackbits(plane, axis=1, bitorder="little").reshape(rows, padded, w)
        field = (bitstream * (1 << np.arange(w))).sum(axis=2)
        out |= field << shift
        offset += nbytes
        shift += w
    return out[:, :cols]


def dense_weight(layer):
    """W[r, c] = float32(lut[r, c // group_size, index]) + float32(sparse(r, c)), from the layer's arrays."""
    rows, cols = layer.rows, layer.cols
    idx = decode_indices(np.asarray(layer.qweight), cols, layer.bits)
    lut = np.asarray(layer.lut).astype(np.float32)
    group = np.arange(cols) // layer.group_size
    w = lut[np.arange(rows)[:, None], group[None, :], idx]
    row_ptr = np.asarray(layer.sparse_row_ptr)
    col = np.asarray(layer.sparse_col_idx).astype(np.int64)
    val = np.asarray(layer.sparse_values).astype(np.float32)
    for r in range(rows):
        for k in range(row_ptr[r], row_ptr[r + 1]):
            w[r, col[k]] += val[k]
    return w
