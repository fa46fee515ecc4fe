#!/usr/bin/env bash
# llama.cpp's own CPU matrix-vector kernels (ggml, `test-backend-ops perf`) on the shapes of
# nuq_bench_linear_cpu, for the side-by-side table in docs/benchmarks.md. ggml is built outside the
# project (default ~/.cache/nuq/ggml) from the llama.cpp sources vendored in the llama-cpp-python sdist on
# PyPI, and never enters the repository.
#   NUQ_GGML_DIR     where to unpack and build (default ~/.cache/nuq/ggml)
#   NUQ_GGML_TYPES   regex of ggml weight types (default q3_K|q4_K|f32|bf16)
#   NUQ_GGML_THREADS threads of the CPU backend (default: test-backend-ops' own choice, half the hardware
#                    threads, i.e. 1 on a 2-core machine)
#   NUQ_GGML_ROWS    rows m of the MUL_MAT case m × 14336 (default 4096, nuq's rows:4096/cols:14336)
#   NUQ_GGML_BATCHES regex of batch sizes n (default 1|4|8; each case initializes its own matrix, which
#                    takes minutes at DRAM-sized row counts)
# test-backend-ops repeats one multiplication on the same tensors, so a weight matrix smaller than the
# last-level cache is read from there, not from DRAM (4096 × 14336 q3_K is 25 MB; the L3 was 32 MiB on
# the AMD EPYC, 260 MiB on the Intel Xeon). nuq's benchmark rotates over copies (working_set_over_llc);
# here each line says how the matrix compares with the last-level cache (over_llc), and NUQ_GGML_ROWS
# sets the rows to exceed it (16384: 101 MB of q3_K; 98304: 605 MB). test-backend-ops has neither
# option, so the unpacked copy (never the repository) is patched once to read GGML_BENCH_THREADS and
# GGML_BENCH_M.
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
tbo="$src/tests/test-backend-ops.cpp"
if ! grep -q GGML_BENCH_M "$tbo"; then
  sed -i -e 's|ggml_backend_set_n_threads_fn(backend.get(), std::max<int>(1, N_THREADS/2));|ggml_backend_set_n_threads_fn(backend.get(), getenv("GGML_BENCH_THREADS") ? atoi(getenv("GGML_BENCH_THREADS")) : std::max<int>(1, N_THREADS/2));|' \
    -e 's|new test_mul_mat(type_a, type_b, 4096, bs, 14336, {1,  1}, {1, 1})|new test_mul_mat(type_a, type_b, getenv("GGML_BENCH_M") ? atoi(getenv("GGML_BENCH_M")) : 4096, bs, 14336, {1,  1}, {1, 1})|' "$tbo"
  [ "$(grep -c 'GGML_BENCH_THREADS\|GGML_BENCH_M' "$tbo")" = 2 ] ||
    { echo "bench-ggml.sh: could not patch the thread count and rows into $tbo" >&2; exit 1; }
  rm -f "$src/build/bin/test-backend-ops"
fi
if [ ! -x "$src/build/bin/test-backend-ops" ]; then
  cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DGGML_CUDA=OFF >/dev/null
  cmake --build "$src/build" -j"$(nproc)" --target test-backend-ops
fi
threads=${NUQ_GGML_THREADS:-$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))}
rows=${NUQ_GGML_ROWS:-4096}
# The largest cache level sysfs lists for cpu0, in bytes (0 when unknown).
llc_bytes() {
  local best_level=0 best=0 d level size bytes
  for d in /sys/devices/system/cpu/cpu0/cache/index*; do
    level=$(cat "$d/level" 2>/dev/null) && size=$(cat "$d/size" 2>/dev/null) || continue
    case $size in *K) bytes=$(( ${size%K} * 1024 ));; *M) bytes=$(( ${size%M} * 1048576 ));; *) bytes=$size;; esac
    if [ "$level" -gt "$best_level" ] || { [ "$level" = "$best_level" ] && [ "$bytes" -gt "$best" ]; }; then
      best_level=$level best=$bytes
    fi
  done
  echo "$best"
}
llc=$(llc_bytes)
echo "# llama.cpp $(basename "$(dirname "$(dirname "$src")")"), $threads thread(s), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), last-level cache $llc bytes"
GGML_BENCH_THREADS=$threads GGML_BENCH_M=$rows "$src/build/bin/test-backend-ops" perf -b CPU -o MUL_MAT \
  -p "type_a=($types),type_b=f32,m=$rows,n=(${NUQ_GGML_BATCHES:-1|4|8}),k=14336," 2>&1 | grep 'MUL_MAT(' |
  sed -E 's/\x1b\[[0-9;]*m//g' |
  awk -v rows="$rows" -v llc="$llc" 'BEGIN { split("q3_K 3.4375 q4_K 4.5 f32 32 bf16 16 f16 16 q8_0 8.5", kv); for (i = 1; i < 12; i += 2) bpw[kv[i]] = kv[i + 1] } {
    match($0, /type_a=[^,]*/); t = substr($0, RSTART + 7, RLENGTH - 7);
    match($0, /,n=[0-9]*/); n = substr($0, RSTART + 3, RLENGTH - 3);
    for (i = 1; i <= NF; i++) if ($(i + 1) == "us/run") us = $i;
    bytes = rows * 14336 * bpw[t] / 8;
    over = llc > 0 && bpw[t] > 0 ? sprintf("%.2f", bytes / llc) : "?";
    printf "ggml %-5s rows:%s cols:14336 batch:%s  %9.1f us  %6.2f G weights/s  over_llc:%s\n", t, rows, n, us, rows * 14336 / us / 1e3, over
  }'
