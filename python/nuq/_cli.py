"""Where the `nuq` command-line executable is, for `python -m nuq`."""
import os
import pathlib

_HERE = pathlib.Path(__file__).resolve().parent


def cli_path() -> pathlib.Path:
    """Path of the `nuq` executable this package runs for `python -m nuq`.

    Looked up in order: $NUQ_CLI; nuq/_bin/nuq inside the installed package (wheels ship it there);
    <build>/nuq when the package is the copy CMake assembles in <build>/python/nuq.
    Raises FileNotFoundError naming every place tried.
    """
    candidates = []
    if os.environ.get("NUQ_CLI"):
        candidates.append(pathlib.Path(os.environ["NUQ_CLI"]))
    candidates.append(_HERE / "_bin" / "nuq")
    candidates.append(_HERE.parent.parent / "nuq")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(
        "the nuq executable was not found (tried " + ", ".join(str(c) for c in candidates) +
        "); install nuq with `pip install .` or build the CLI (NUQ_BUILD_CLI=ON), or set NUQ_CLI")
