"""`pip install .` end to end: build the wheel with scikit-build-core, install it into a fresh virtual
environment, import it from there and run `python -m nuq`.

The first build compiles the whole library (about 4-7 minutes on 2 busy cores); the CMake build tree and
the build tools are kept in $NUQ_WHEEL_CACHE (default build-wheel/ in the project root), so later runs
(the sanitizer pass of scripts/test.sh, local reruns) only repackage. CUDA is left out of this build
(-DNUQ_CUDA=OFF) to keep it short: the CUDA build is exercised by the CMake build the other tests use.
Set NUQ_SKIP_WHEEL_TEST=1 to skip it in quick local iterations."""
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.wheel

CACHE = pathlib.Path(os.environ.get("NUQ_WHEEL_CACHE", ROOT / "build-wheel")).resolve()


def run(cmd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NUQ_CLI")}
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, **kwargs)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited with {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def venv_python(path):
    return path / "bin" / "python"


def test_pip_wheel_installs_and_runs(tmp_path):
    if os.environ.get("NUQ_SKIP_WHEEL_TEST") == "1":
        pytest.skip("NUQ_SKIP_WHEEL_TEST=1")
    # A build environment at a fixed path, so that CMake sees the same tools every time and rebuilds
    # incrementally (pip's isolated build environments live in a new temporary directory each time).
    tools = CACHE / "venv"
    if not venv_python(tools).exists():
        run([sys.executable, "-m", "venv", "--system-site-packages", tools])
    run([venv_python(tools), "-m", "pip", "install", "-q", "scikit-build-core>=0.8", "pybind11>=2.10"], timeout=600)
    dist = tmp_path / "dist"
    run([venv_python(tools), "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-w", dist,
         "-C", f"build-dir={CACHE / 'cmake'}", "-C", "cmake.define.NUQ_CUDA=OFF"], timeout=1800)
    wheels = list(dist.glob("nuq-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        files = set(z.namelist())
        # Typed (PEP 561): the marker and the stubs of the compiled module travel with the package.
        assert {"nuq/py.typed", "nuq/_nuq.pyi", "nuq/_tasks.py"} <= files, sorted(files)
        metadata = z.read(next(f for f in files if f.endswith(".dist-info/METADATA"))).decode()
    requires = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)(.*)$", metadata, flags=re.M)
    required = {name.lower() for name, rest in requires if "extra ==" not in rest}
    assert {"numpy", "safetensors"} <= required, requires

    target = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", target])  # NumPy from the host
    run([venv_python(target), "-m", "pip", "install", "--no-deps", "--no-index", wheels[0]])
    check = (
        "import numpy as np, nuq, pathlib\n"
        "print(pathlib.Path(nuq.__file__).parent)\n"
        "w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)\n"
        "layer = nuq.quantize(w, 4)\n"
        "x = np.ones(64, np.float32)\n"
        "assert np.allclose(nuq.linear(layer, x), nuq.dequantize(layer) @ x, rtol=1e-4, atol=1e-4)\n"
        "print(nuq.__version__)\n"
    )
    r = run([venv_python(target), "-c", check], cwd=tmp_path)  # not the source tree: the installed package
    package_dir, version = r.stdout.split()
    assert pathlib.Path(package_dir).is_relative_to(target)
    helped = run([venv_python(target), "-m", "nuq", "--help"], cwd=tmp_path)
    assert "quantize" in helped.stdout and "inspect" in helped.stdout
    assert run([venv_python(target), "-m", "nuq", "--version"], cwd=tmp_path).stdout.startswith(f"nuq {version} ")
    failed = subprocess.run([venv_python(target), "-m", "nuq", "inspect", tmp_path / "missing.safetensors"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert failed.returncode == 1 and failed.stderr.startswith("nuq: error:")
