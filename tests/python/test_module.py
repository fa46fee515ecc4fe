"""The Python extension module built from python/ (nuq._nuq): packing, inspection and errors."""
import os
import sys

import numpy as np
import pytest

from conftest import build_dir


@pytest.fixture(scope="module")
def nuq():
    path = build_dir() / "python"
    if not (path / "nuq").is_dir() or not any((path / "nuq").glob("_nuq*.so")):
        pytest.skip(f"the Python extension was not built in {build_dir()} (NUQ_BUILD_PYTHON=OFF)")
    sys.path.insert(0, str(path))
    import nuq as module

    return module


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("cols", [1, 19, 64, 111, 4097])
def test_pack_unpack_round_trip(nuq, bits, cols):
    rng = np.random.default_rng(bits * 1000 + cols)
    idx = rng.integers(0, 2**bits, size=(3, cols), dtype=np.uint8)
    packed = nuq.pack_indices(idx, bits)
    assert packed.shape == (3, nuq.row_bytes(cols, bits))
    assert packed.shape[1] * 8 == -(-cols // 64) * 64 * bits
    np.testing.assert_array_equal(nuq.unpack_indices(packed, cols, bits), idx)


def test_four_bit_layout_is_low_nibble_first(nuq):
    packed = nuq.pack_indices(np.array([[1, 2, 3, 15]], dtype=np.uint8), 4)
    assert list(packed[0, :2]) == [0x21, 0xF3]


def test_errors_are_python_exceptions(nuq, tmp_path):
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        nuq.pack_indices(np.array([[4]], dtype=np.uint8), 2)
    with pytest.raises(ValueError, match="unsupported index width 5"):
        nuq.pack_indices(np.zeros((1, 1), dtype=np.uint8), 5)
    with pytest.raises(ValueError, match="2-D"):
        nuq.pack_indices(np.zeros(3, dtype=np.uint8), 2)
    with pytest.raises(OSError, match="nope"):
        nuq.inspect(str(tmp_path / "nope.safetensors"))


def test_inspect_returns_tensors(nuq, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "m.safetensors"
    save_file({"w": np.zeros((2, 3), dtype=np.float32)}, str(path), metadata={"k": "v"})
    info = nuq.inspect(str(path))
    assert info["kind"] == "safetensors"
    assert info["metadata"] == {"k": "v"}
    assert info["tensors"] == [{"name": "w", "dtype": "F32", "shape": (2, 3), "bytes": 24}]
    assert nuq.__version__.count(".") == 2
    assert nuq.FORMAT_VERSION == 1
