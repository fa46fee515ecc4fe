#!/usr/bin/env bash
# Everything a GPU machine should check, in one call (docs/cuda-kernels.md, "On a GPU"): build with the
# dependencies packed by scripts/device-deps.sh, run every CUDA test (ctest -L cuda), the CUDA unit tests
# under compute-sanitizer (memcheck, racecheck, initcheck, synccheck), and the linear and KV benchmarks,
# writing logs and JSON into OUT_DIR (at most 8 files, as the device tool brings back).
#
#   here:            bash scripts/device-deps.sh          # packs .devdeps (libraries + test data)
#   on the GPU:      bash scripts/gpu-check.sh "$OUT"     # with .devdeps carried
#
# Without a GPU (here) it rehearses: builds, runs the CUDA tests (they report as skipped), lists the
# benchmark cases, and says that the sanitizers and benchmarks were not run. Budget: about 8 minutes of
# GPU time on an H100 (build ~2-3 min on 16 cores, tests and sanitizers ~3 min, benchmarks ~2 min);
# every step has its own time limit so that one slow step cannot eat the rest.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=$(mkdir -p "${1:-gpu-check-out}" && cd "${1:-gpu-check-out}" && pwd)
deps=$root/.devdeps
build=${NUQ_GPU_BUILD_DIR:-$root/build-gpu}
jobs=$(nproc)
summary=$out/summary.txt
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

[ -d "$deps/usr" ] || { note "error: $deps is missing: run scripts/device-deps.sh here and carry .devdeps"; exit 1; }
export LD_LIBRARY_PATH=$deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
[ -d "$deps/data" ] && export NUQ_SHARED_DATA=$deps/data
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi

gpu=""
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpu=$(nvidia-smi -L | head -n 1); fi
note "machine: ${gpu:-no GPU (rehearsal: the sanitizers and benchmarks are not run)}; $(nvcc --version | tail -n 1)"
note "host: $(g++ --version | head -n 1); $(ldd --version | head -n 1)"

step() {  # step NAME SECONDS COMMAND...: runs with a time limit, logs to $out/NAME.log, notes the result
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  note "$name: exit $rc after $((SECONDS - start)) s$([ $rc = 124 ] && echo " (time limit $limit s)")"
  return $rc
}

archs=${NUQ_CUDA_ARCHS:-90}
step build 600 bash -c "cmake -S . -B '$build' -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH='$deps/usr' \
  -DNUQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES='$archs' -DNUQ_BUILD_TESTS=ON -DNUQ_BUILD_BENCH=ON -DNUQ_BUILD_PYTHON=OFF \
  -DNUQ_BUILD_EXAMPLES=ON && cmake --build '$build' -j$jobs --target nuq_cuda_tests nuq_bench_linear_cuda \
  nuq_bench_kv_cuda nuq_cli nuq_generate" || {
  tail -n 40 "$out/build.log"
  exit 1
}

# Every CUDA test: the unit tests and the decoder through the CLI (pytest, marked `cuda`).
step ctest 600 bash -c "cd '$build' && ctest -L '^cuda$' --output-on-failure --timeout 500 -j4"
grep -E "tests passed|tests failed|Skipped|Failed" "$out/ctest.log" | tail -n 12 | tee -a "$summary"

if [ -z "$gpu" ]; then
  step bench-list 60 bash -c "'$build/nuq_bench_linear_cuda' --benchmark_list_tests | head -n 5"
  note "rehearsal done: build and tests ran; compute-sanitizer and benchmarks need a GPU"
  exit 0
fi

# compute-sanitizer: the tests on a subset of shapes (memcheck multiplies run time ~10-100x).
tests=$build/tests/nuq_cuda_tests
filter='*CudaUnpack*:*CudaKv*:*CudaLinearArgs*:*CudaLinear.MatchesCpuReference/f16*'
for tool in memcheck racecheck initcheck synccheck; do
  step "sanitizer" 150 compute-sanitizer --tool "$tool" --error-exitcode 3 "$tests" --gtest_filter="$filter" \
    --gtest_brief=1 || true
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|error" "$out/sanitizer.log" | tail -n 2 | sed "s/^/  $tool: /" | tee -a "$summary"
done

# Benchmarks (JSON): the issue's shapes at batch 1/8/16, then the KV decode at 32k tokens.
step bench-linear 240 "$build/nuq_bench_linear_cuda" --benchmark_format=json --benchmark_out="$out/linear_cuda.json" \
  --benchmark_filter='(rows:4096/cols:14336|rows:14336/cols:4096)/batch:(1|8|16)/' --benchmark_min_time=0.2s
step bench-kv 180 "$build/nuq_bench_kv_cuda" --benchmark_format=json --benchmark_out="$out/kv_cuda.json" \
  --benchmark_filter='tokens:32768/' --benchmark_min_time=0.2s
note "done: $(ls "$out" | tr '\n' ' ')"
