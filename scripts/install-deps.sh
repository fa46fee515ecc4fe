#!/usr/bin/env bash
# Installs what building and testing nuq needs on a Debian 12 machine: compilers and libraries from
# Debian's packages, test-time Python packages from PyPI. Safe to run again; it skips what is present.
set -euo pipefail

debian_packages=(
  build-essential cmake ninja-build git unzip
  libeigen3-dev libfmt-dev nlohmann-json3-dev libcli11-dev
  libgtest-dev libgmock-dev libbenchmark-dev pybind11-dev
  clang-14 libclang-rt-14-dev
  libtbb-dev  # the HIP CPU Runtime runs the emulated CUDA kernels' blocks on TBB
)
missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# mypy runs the typing test (tests/python/test_typing.py); tqdm draws nuq's progress bars; pytest-xdist
# runs the Python tests on every core (scripts/test.sh).
python_packages=(numpy safetensors pytest pytest-xdist gguf tokenizers mypy tqdm)
if ! python3 -c "import numpy, safetensors, pytest, xdist, gguf, tokenizers, mypy, tqdm" 2>/dev/null; then
  echo "installing Python packages: ${python_packages[*]}"
  python3 -m pip install -q "${python_packages[@]}" 2>/dev/null ||
    python3 -m pip install -q --break-system-packages "${python_packages[@]}"
fi
