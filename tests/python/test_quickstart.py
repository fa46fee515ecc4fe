"""docs/python.md is executed exactly as written: its ```python blocks run in order in one namespace,
in a temporary directory. The blocks that use PyTorch run in a second test that skips without it."""
import contextlib
import io
import os
import re

import pytest

from conftest import ROOT
from nuq_package import import_nuq

DOC = ROOT / "docs" / "python.md"


def python_blocks():
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def run_blocks(blocks, tmp_path):
    namespace = {"__name__": "__quickstart__"}
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out):
            for i, block in enumerate(blocks):
                exec(compile(block, f"{DOC}:python block {i + 1}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace, out.getvalue()


def split_blocks():
    blocks = python_blocks()
    torch_at = next((i for i, b in enumerate(blocks) if re.search(r"^import torch", b, re.M)), len(blocks))
    return blocks[:torch_at], blocks[torch_at:]


def test_doc_has_blocks():
    numpy_blocks, torch_blocks = split_blocks()
    assert len(numpy_blocks) >= 4 and len(torch_blocks) >= 1


def test_quickstart_numpy(tmp_path):
    import_nuq()
    numpy_blocks, _ = split_blocks()
    ns, out = run_blocks(numpy_blocks, tmp_path)
    assert "PackedLayer(rows=256, cols=512, bits=3" in out
    assert "[1, 1]" in out  # the allocation the doc announces
    assert (tmp_path / "model-q3" / "model.safetensors").is_file() and (tmp_path / "mine.safetensors").is_file()


def test_quickstart_torch(tmp_path):
    pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")
    import_nuq()
    numpy_blocks, torch_blocks = split_blocks()
    ns, out = run_blocks(numpy_blocks + torch_blocks, tmp_path)
    assert "['up_proj']" in out
    assert type(ns["model"].up_proj).__name__ == "QuantLinear"
