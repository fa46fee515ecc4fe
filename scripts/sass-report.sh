#!/usr/bin/env bash
# The SASS report (docs/cuda-kernels.md, "SASS report"): compiles every kernel file for sm_90 and sm_80
# (or $NUQ_SASS_ARCHS) with nvcc, reads the machine code with cuobjdump (PyPI wheels
# nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm, installed when absent; the toolkit here has neither),
# prints one row per kernel instantiation and writes them as JSON into OUT_DIR/sass-report.json. Fails
# (exit 1) when a kernel of the families in $NUQ_SASS_CHECK (default gemv,kv_decode,kv_dense) exceeds a budget:
# instructions per weight or token-head in its steady loop, local memory, FP64.
# Usage: bash scripts/sass-report.sh [OUT_DIR]   (default build-sass)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-build-sass}
mkdir -p "$out"
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
# Both tools, each looked for as sass_report.py does (glob's generators are always truthy: list them).
if ! python3 -c "import nvidia, pathlib, sys; sys.exit(not all(any(list(pathlib.Path(p).glob('*/bin/' + t)) for p in nvidia.__path__) for t in ('cuobjdump', 'nvdisasm')))" 2>/dev/null; then
  python3 -m pip install -q nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm 2>/dev/null ||
    python3 -m pip install -q --break-system-packages nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
fi
cubins=()
pids=()
for arch in ${NUQ_SASS_ARCHS:-90 80}; do
  for kernel in kernels/*.cu; do
    name=$(basename "$kernel" .cu)
    cubin=$out/${name}_sm$arch.cubin
    nvcc -cubin -arch=sm_$arch -O3 -std=c++17 --expt-relaxed-constexpr -Iinclude "$kernel" -o "$cubin" &
    pids+=($!)
    cubins+=(--cubin "sm_$arch=$cubin")
    # Two compilations at a time (the CI machine has two cores).
    if ((${#pids[@]} >= 2)); then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  done
done
for pid in "${pids[@]}"; do wait "$pid"; done
python3 scripts/sass_report.py "${cubins[@]}" --json "$out/sass-report.json" --check "${NUQ_SASS_CHECK:-gemv,kv_decode,kv_dense}"
