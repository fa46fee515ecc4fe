"""`python -m nuq ARGS...` runs the nuq command-line tool with ARGS, exactly as the C++ binary would."""
import os
import subprocess
import sys

from ._cli import cli_path


def main() -> int:
    try:
        exe = str(cli_path())
    except FileNotFoundError as e:
        print(f"nuq: error: {e}", file=sys.stderr)
        return 1
    argv = [exe] + sys.argv[1:]
    if hasattr(os, "execv"):
        # Replacing this process keeps the tool's exit status, signals and terminal handling exactly
        # as if it had been started directly.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(exe, argv)
    return subprocess.call(argv)


if __name__ == "__main__":
    sys.exit(main())
