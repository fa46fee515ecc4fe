#!/usr/bin/env bash
# Packs the build dependencies the GPU machine lacks into .devdeps/ (see ../shared/device/README.md):
# the shared pack-deps.sh, plus CLI11 (the CLI's argument parser), which that script does not copy, and
# the test data of ../shared/data that the CUDA tests read (scripts/gpu-check.sh points them at it).
# Then checks that CMake finds every package from .devdeps alone, with the system prefixes hidden
# (headers in /usr/include stay visible to the compiler here, so this checks the package files, not
# the headers). Run in the project root after scripts/install-deps.sh; send `.devdeps` with `carry`.
# On the GPU machine:
#   export LD_LIBRARY_PATH=$PWD/.devdeps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
#   cmake -S . -B build-gpu -G Ninja -DCMAKE_PREFIX_PATH=$PWD/.devdeps/usr -DCMAKE_CUDA_ARCHITECTURES=90a ...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
shared=${NUQ_SHARED_DIR:-$root/../shared}
rm -rf .devdeps
bash "$shared/device/pack-deps.sh" .devdeps
for p in /usr/include/CLI /usr/share/cmake/CLI11; do
  mkdir -p ".devdeps$(dirname "$p")" && cp -a "$p" ".devdeps$(dirname "$p")/"
done
# The test data the CUDA decoder test reads (../shared does not travel to the GPU machine; ~3 MB).
if [ -d "$shared/data" ]; then
  mkdir -p .devdeps/data && cp "$shared"/data/{stories260K.bin,tok512.bin,tinystories_valid.txt} .devdeps/data/
fi
check=$(mktemp -d)
cmake -S . -B "$check" -G Ninja -DNUQ_CUDA=OFF -DNUQ_BUILD_TESTS=ON -DNUQ_BUILD_BENCH=ON -DNUQ_BUILD_PYTHON=OFF \
  -DCMAKE_PREFIX_PATH="$root/.devdeps/usr" -DCMAKE_SYSTEM_PREFIX_PATH=/nonexistent \
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_FIND_USE_SYSTEM_ENVIRONMENT_PATH=OFF \
  -DCMAKE_MAKE_PROGRAM="$(command -v ninja)" -DCMAKE_C_COMPILER="$(command -v gcc)" \
  -DCMAKE_CXX_COMPILER="$(command -v g++)" >"$check/configure.log" 2>&1 || {
  tail -n 20 "$check/configure.log"
  echo "error: CMake does not find every dependency in .devdeps" >&2
  exit 1
}
grep -h "_DIR:PATH=." "$check/CMakeCache.txt" | grep -v "$root/.devdeps" | grep -v NOTFOUND | grep -iv "cuda\|python" && {
  echo "error: these packages were found outside .devdeps" >&2
  exit 1
}
rm -rf "$check"
echo ".devdeps: every CMake package resolves inside it ($(du -sh .devdeps | cut -f1))"
