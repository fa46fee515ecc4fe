#!/usr/bin/env bash
# Builds nuq and runs every test: the unit tests (ctest) and the Python tests (pytest) on a release
# build, the same again under AddressSanitizer + UndefinedBehaviorSanitizer, and the libFuzzer targets
# for a bounded time. The CUDA kernels run in both builds, emulated on the CPU (NUQ_CUDA=EMULATED: the
# HIP CPU Runtime from ../shared/third_party/hip-cpu or $NUQ_HIP_CPU_DIR; ctest label cuda-emulated, test
# names prefixed "emulated."); they are also compiled by nvcc whenever it is present (build-nvcc, one
# architecture, $NUQ_CUDA_ARCHS, default 90), where their GPU tests report as skipped without a GPU.
#   NUQ_FUZZ_SECONDS   seconds per fuzz target (default 30; 0 skips fuzzing)
#   NUQ_SKIP_ASAN=1    skip the sanitizer build (for quick local iterations; CI never sets it)
#   NUQ_SKIP_TORCH=1   do not install PyTorch and transformers (their tests then report as skipped; CI never sets it)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
jobs=$(nproc)
sanitizer_opt="-O1 -g1 -DNDEBUG"
# pytest on every core, one test file per worker (module fixtures such as converted models are built once).
pytest_parallel=(-n "$jobs" --dist loadfile)
# Each phase reports how long the one before it took: CI must stay under 45 minutes on 2 cores.
phase_name="" phase_start=$SECONDS
phase() {
  [ -n "$phase_name" ] && echo "== $phase_name took $((SECONDS - phase_start)) s (total $SECONDS s)"
  phase_name=$1 phase_start=$SECONDS
  echo "== $1"
}

phase "dependencies and real models"
bash scripts/install-deps.sh
# Real checkpoints used by tests; tests skip with a reason if this fails (no network).
bash scripts/fetch-models.sh || echo "warning: real models unavailable; tests that need them will be skipped"

if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi

phase "release build (CUDA kernels emulated on the CPU)"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DNUQ_BUILD_TESTS=ON -DNUQ_BUILD_BENCH=ON \
  -DNUQ_BUILD_PYTHON=ON -DNUQ_BUILD_EXAMPLES=ON -DNUQ_CUDA=EMULATED
cmake --build build -j"$jobs"
phase "release ctest"
(cd build && ctest --output-on-failure -j"$jobs")
# PyTorch and transformers for the nuq.torch and nuq.hf tests: the requirements of pyproject.toml's `hf`
# extra (what `pip install ".[hf]"` adds; read from there so the two cannot drift apart), without
# building the package a second time. PyPI's torch wheel (the CPU-only one lives on download.pytorch.org,
# which CI cannot reach) comes with its CUDA libraries, ~3 GB, about 2 minutes here. Without them those
# tests report as skipped with the reason, so a slow or failed download does not fail CI.
if [ "${NUQ_SKIP_TORCH:-0}" != 1 ] && ! python3 -c "import torch, transformers, gguf" 2>/dev/null; then
  phase "installing the hf extra (PyTorch, transformers) for the nuq.torch and nuq.hf tests"
  mapfile -t hf_requirements < <(python3 -c '
import tomllib
for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["hf"]:
    print(r)')
  timeout 900 python3 -m pip install -q --no-cache-dir "${hf_requirements[@]}" 2>/dev/null ||
    timeout 900 python3 -m pip install -q --no-cache-dir --break-system-packages "${hf_requirements[@]}" ||
    echo "warning: the hf extra could not be installed; the torch and transformers tests will be skipped"
fi
# The tests marked `cuda` ran under ctest (emulated.pytest.cuda_decoder).
phase "release pytest"
NUQ_BUILD_DIR="$root/build" python3 -m pytest -q -rs --durations=10 "${pytest_parallel[@]}" -m "not cuda" tests/python

if [ "${NUQ_SKIP_ASAN:-0}" != 1 ]; then
  phase "AddressSanitizer + UndefinedBehaviorSanitizer build"
  # -O1 -g1 (line tables: enough for the sanitizers' stack traces) compiles in half the time of -O2 -g
  # (388 s against 743 s here). The instrumented tests ran slower at -O1 (ctest 638 s against 454 s),
  # the emulated CUDA GEMV cases most; since the emulation's MMA sums in double instead of calling
  # libm's fmaf per product and reads the thread index once per call, those cases take ~65 s instead of
  # ~200 s alone at -O1. The same flags for the fuzz build below.
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNUQ_SANITIZE=address,undefined \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=$sanitizer_opt" \
    -DNUQ_CUDA=EMULATED -DNUQ_BUILD_BENCH=OFF -DNUQ_BUILD_PYTHON=OFF -DNUQ_BUILD_EXAMPLES=ON
  cmake --build build-asan -j"$jobs"
  phase "sanitizer ctest"
  # The two SmolLM2 KV tests (real model, two minutes instrumented) ran in the release pass; the smaller
  # KV tests cover the same code here.
  (cd build-asan && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j"$jobs" -LE install \
    -E 'KvRealModel.SmolLM2|LlamaQuantizedKv.SmolLM2')
  # The CLI, the decoder example and the reader/writer tools run instrumented under the Python tests too.
  phase "sanitizer pytest"
  # Tests marked `whole_model` (real checkpoints end to end, minutes each when instrumented) ran in the
  # release pass; so did the `wheel` test, which builds its own uninstrumented package (110 s here).
  ASAN_OPTIONS=detect_leaks=1 NUQ_BUILD_DIR="$root/build-asan" python3 -m pytest -q --durations=10 "${pytest_parallel[@]}" \
    -m "not cuda and not whole_model and not wheel" tests/python
fi

if command -v nvcc >/dev/null; then
  # The real CUDA library, its tests and benchmark, compiled by nvcc and linked against cudart and
  # cuBLAS; without a GPU their tests report as skipped.
  phase "nvcc build (sm_${NUQ_CUDA_ARCHS:-90})"
  cmake -S . -B build-nvcc -G Ninja -DCMAKE_BUILD_TYPE=Release -DNUQ_CUDA=ON \
    "-DCMAKE_CUDA_ARCHITECTURES=${NUQ_CUDA_ARCHS:-90}" -DNUQ_BUILD_TESTS=ON -DNUQ_BUILD_BENCH=ON \
    -DNUQ_BUILD_PYTHON=OFF -DNUQ_BUILD_EXAMPLES=ON
  cmake --build build-nvcc -j"$jobs" --target nuq_cuda nuq_cuda_tests nuq_bench_linear_cuda nuq_bench_kv_cuda nuq_cli nuq_generate
  (cd build-nvcc && ctest --output-on-failure -j"$jobs" -L '^cuda$')
  phase "SASS report (instruction budgets, docs/cuda-kernels.md)"
  NUQ_SASS_ARCHS=${NUQ_SASS_ARCHS:-90} bash scripts/sass-report.sh build-sass
else
  echo "warning: nvcc not found: the CUDA kernels were not compiled for a GPU"
fi

fuzz_seconds=${NUQ_FUZZ_SECONDS:-30}
if [ "$fuzz_seconds" != 0 ]; then
  phase "libFuzzer, ${fuzz_seconds}s per target"
  cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-14 \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=$sanitizer_opt" -DNUQ_BUILD_FUZZERS=ON -DNUQ_SANITIZE=address,undefined -DNUQ_CUDA=OFF -DNUQ_BUILD_TESTS=OFF \
    -DNUQ_BUILD_BENCH=OFF -DNUQ_BUILD_PYTHON=OFF -DNUQ_BUILD_EXAMPLES=OFF -DNUQ_BUILD_CLI=OFF
  cmake --build build-fuzz -j"$jobs" --target nuq_fuzz_safetensors nuq_fuzz_gguf
  for target in safetensors gguf; do
    corpus=$(mktemp -d)
    cp tests/fuzz/corpus/$target/* "$corpus"/ 2>/dev/null || true
    build-fuzz/tests/fuzz/nuq_fuzz_$target -max_total_time="$fuzz_seconds" -max_len=4096 -print_final_stats=1 \
      "$corpus" 2>&1 | tail -n 12
    rm -rf "$corpus"
  done
fi
phase "done"
echo "== all tests passed"
echo "CUDA kernels: run emulated on the CPU (ctest label cuda-emulated, release and ASan+UBSan builds)$(command -v nvcc >/dev/null && echo ", compiled by nvcc for sm_${NUQ_CUDA_ARCHS:-90}"); not run on a GPU here"
