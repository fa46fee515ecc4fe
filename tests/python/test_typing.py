"""Type information: the package is marked typed (py.typed), its stubs of the compiled module
(_nuq.pyi) match what the module really has, `mypy --strict` accepts a script using the API
(typing/sample_api.py) and reports every misuse in typing/sample_errors.py, and inspect.signature works
on the public functions."""
import ast
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import ROOT, build_dir
from nuq_package import import_nuq, installed

TYPING = ROOT / "tests" / "python" / "typing"


@pytest.fixture(scope="module")
def nuq():
    return import_nuq()


def mypy(*files):
    pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy)")
    env = dict(os.environ)
    if not installed():  # an installed nuq is found as a PEP 561 package, through its py.typed
        env["MYPYPATH"] = str(build_dir() / "python")
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--no-error-summary",
                           "--cache-dir", os.devnull, *map(str, files)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_package_is_marked_typed(nuq):
    package = pathlib.Path(nuq.__file__).parent
    assert (package / "py.typed").is_file() and (package / "_nuq.pyi").is_file()


def test_mypy_strict_accepts_the_sample_script(nuq):
    r = mypy(TYPING / "sample_api.py")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_reports_every_misuse(nuq):
    r = mypy(TYPING / "sample_errors.py")
    source = (TYPING / "sample_errors.py").read_text().splitlines()
    expected = {i + 1 for i, line in enumerate(source) if re.search(r"#\s*error:", line)}
    assert len(expected) >= 5
    reported = {int(m.group(1)) for m in re.finditer(r"sample_errors\.py:(\d+): error", r.stdout)}
    assert reported == expected, r.stdout


def stub_functions():
    """name -> parameter names, for the module-level functions and the methods (Class.method) of _nuq.pyi."""
    tree = ast.parse((ROOT / "python" / "nuq" / "_nuq.pyi").read_text())  # the source of the installed copy
    out, names = {}, set()

    def params(fn):
        a = fn.args
        return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = params(node)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out[f"{node.name}.{item.name}"] = params(item)
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    return out, names | {n.split(".")[0] for n in out}


def runtime_params(obj):
    """Parameter names from pybind11's signature line, e.g. 'quantize(weight: handle, bits: int = 4, *, ...)'."""
    doc = (obj.__doc__ or "").strip()
    name = obj.__name__
    line = next((l for l in doc.splitlines() if l.startswith(name + "(")), None)
    assert line is not None, f"no signature in the docstring of {name}"
    inside = line[len(name) + 1:line.rindex(") ->")]
    names, depth, current = [], 0, ""
    for ch in inside + ",":
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            part = current.strip()
            if part and part != "*":
                names.append(part.split(":")[0].split("=")[0].strip())
            current = ""
        else:
            current += ch
    return names


def test_stubs_match_the_compiled_module(nuq):
    from nuq import _nuq

    stubs, stub_names = stub_functions()
    public = {n for n in dir(_nuq) if not n.startswith("__")} | {"__version__"}
    assert public - stub_names == set(), "names of nuq._nuq without a stub"
    assert stub_names - public - {"ArrayIn", "F32", "F64", "U8"} == set(), "stubs of names nuq._nuq lacks"
    checked = 0
    for name in sorted(public):
        obj = getattr(_nuq, name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                key = f"{name}.{attr}"
                if isinstance(member, property):
                    assert key in stubs, f"property {key} has no stub"
                    continue
                # Private members are pybind11's own (e.g. _pybind11_conduit_v1_ in pybind11 >= 2.13).
                if attr.startswith("_") and attr not in ("__init__", "__contains__"):
                    continue
                func = getattr(obj, attr)
                if not callable(func) or key not in stubs and attr == "__repr__":
                    continue
                assert key in stubs, f"method {key} has no stub"
                want = runtime_params(func)
                got = stubs[key]
                if want and want[0] == "self":
                    want = want[1:]
                if got and got[0] == "self":
                    got = got[1:]
                assert got == want, key
                checked += 1
        elif callable(obj):
            assert stubs[name] == runtime_params(obj), name
            checked += 1
    assert checked > 60


def test_public_functions_have_signatures(nuq):
    for name in ("quantize_checkpoint", "quantize", "calibrate", "fisher", "evaluate", "generate", "convert",
                 "tune_codebooks", "calibrate_kv_layer"):
        sig = inspect.signature(getattr(nuq, name))
        assert "progress" in sig.parameters or name in ("quantize", "convert", "calibrate_kv_layer"), name
    sig = inspect.signature(nuq.quantize_checkpoint)
    assert list(sig.parameters)[:3] == ["input", "output_dir", "bits"]
    assert sig.parameters["force"].kind is inspect.Parameter.KEYWORD_ONLY and sig.parameters["force"].default is False
    assert inspect.signature(nuq.calibrate).parameters["hessian"].default is None
