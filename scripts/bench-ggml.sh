#!/usr/bin/env bash
# llama.cpp's own CPU matrix-vector kernels (ggml, `test-backend-ops perf`) on the shapes of
# nuq_bench_linear_cpu, for the side-by-side table in docs/benchmarks.md. ggml is built outside the
# project (default ~/.cache/nuq/ggml) from the llama.cpp sources vendored in the llama-cpp-python sdist on
# PyPI, and never enters the repository.
#   NUQ_GGML_DIR     where to unpack and build (default ~/.cache/nuq/ggml)
#   NUQ_GGML_TYPES   regex of ggml weight types (default q3_K|q4_K|f32|bf16)
# test-backend-ops runs the CPU backend on half the hardware threads (1 on a 2-core machine); its
# MUL_MAT case m=4096, k=14336, n=batch is nuq's rows:4096/cols:14336.
set -euo pipefail
dir=${NUQ_GGML_DIR:-$HOME/.cache/nuq/ggml}
types=${NUQ_GGML_TYPES:-q3_K|q4_K|f32|bf16}
mkdir -p "$dir"
src=$(ls -d "$dir"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -n 1 || true)
if [ -z "$src" ]; then
  (cd "$dir" && python3 -m pip download --no-deps --no-binary :all: llama-cpp-python -d . >/dev/null)
  tar -xzf "$(ls "$dir"/llama_cpp_python-*.tar.gz | head -n 1)" -C "$dir"
  src=$(ls -d "$dir"/llama_cpp_python-*/vendor/llama.cpp | head -n 1)
fi
if [ ! -x "$src/build/bin/test-backend-ops" ]; then
  cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DGGML_CUDA=OFF >/dev/null
  cmake --build "$src/build" -j"$(nproc)" --target test-backend-ops
fi
echo "# llama.cpp $(basename "$(dirname "$(dirname "$src")")"), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
"$src/build/bin/test-backend-ops" perf -b CPU -o MUL_MAT \
  -p "type_a=($types),type_b=f32,m=4096,n=(1|4|8),k=14336," 2>&1 | grep 'MUL_MAT(' |
  sed -E 's/\x1b\[[0-9;]*m//g' |
  awk '{
    match($0, /type_a=[^,]*/); t = substr($0, RSTART + 7, RLENGTH - 7);
    match($0, /,n=[0-9]*/); n = substr($0, RSTART + 3, RLENGTH - 3);
    for (i = 1; i <= NF; i++) if ($(i + 1) == "us/run") us = $i;
    printf "ggml %-5s rows:4096 cols:14336 batch:%s  %9.1f us  %6.2f G weights/s\n", t, n, us, 4096 * 14336 / us / 1e3
  }'
