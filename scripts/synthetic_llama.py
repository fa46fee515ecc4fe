#!/usr/bin/env python3
"""Writes a LLaMA-shaped checkpoint with random weights: Hugging Face names, fp16 or bf16 safetensors
sharded one decoder block per file (plus one for the embedding, norm and classifier), an index and a
config.json. Its quality is meaningless; its shapes, bytes and names are those of the real model, which
is what the memory and time of nuq's streaming paths depend on (docs/quantize-cli.md).

    python3 scripts/synthetic_llama.py --shape llama2-7b --out /data/llama2-7b-synthetic

Weights are N(0, 1/cols) so that activations keep their scale through the blocks, norms are 1. The
generator is seeded per tensor, so any shard can be rewritten alone and the bytes do not depend on the
order of writing. Progress goes to stderr; an existing complete output is left alone.
"""
import argparse
import json
import os
import sys
import time
import zlib

import numpy as np
from safetensors.numpy import save_file

# (dim, hidden, layers, heads, kv heads, vocab)
SHAPES = {
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": (5120, 13824, 40, 40, 40, 32000),
    # LLaMA-2-70B's blocks (GQA 64/8, 28672-wide SwiGLU), 4 of its 80.
    "llama2-70b-4layers": (8192, 28672, 4, 64, 8, 32000),
    # For tests: every dimension odd enough to find layout slips, seconds to write.
    "tiny": (96, 200, 3, 6, 2, 512),
}


def tensor(name, rows, cols, seed, dtype):
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    w *= np.float32(1.0 / np.sqrt(cols))
    return to_dtype(w, dtype)


def to_dtype(w, dtype):
    if dtype == "f16":
        return w.astype(np.float16)
    # bf16 by rounding the fp32 bit pattern to nearest even; numpy has no bfloat16, safetensors.numpy
    # writes it from a uint16 array only through the torch path, so bf16 shards are written by hand below.
    bits = w.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def save(path, tensors, dtype):
    """safetensors.numpy for fp16; for bf16 the same layout with dtype BF16 in the header."""
    tmp = path + ".tmp"
    if dtype == "f16":
        save_file(tensors, tmp, metadata={"format": "pt"})
    else:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, a in tensors.items():
            header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
            offset += a.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for a in tensors.values():
                f.write(np.ascontiguousarray(a).tobytes())
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", choices=["f16", "bf16"], default="f16")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    dim, hidden, layers, heads, kv_heads, vocab = SHAPES[a.shape]
    head_dim = dim // heads
    os.makedirs(a.out, exist_ok=True)
    index_path = os.path.join(a.out, "model.safetensors.index.json")
    if os.path.exists(index_path):
        print(f"{a.out}: already complete (remove it to write again)", file=sys.stderr)
        return
    elem = 2
    per_block = 2 * dim + (2 * dim * heads * head_dim + 2 * dim * kv_heads * head_dim + 3 * dim * hidden)
    total = elem * (layers * per_block + 2 * vocab * dim + dim)
    st = os.statvfs(a.out)
    free = st.f_bavail * st.f_frsize
    print(f"{a.shape}: {layers} blocks, {total / 2**30:.2f} GiB of {a.dtype} weights; {free / 2**30:.1f} GiB free",
          file=sys.stderr)
    if total > free:
        sys.exit(f"{a.out}: needs {total / 2**30:.2f} GiB, {free / 2**30:.1f} GiB free; nothing written")
    weight_map, t0 = {}, time.time()
    ones = to_dtype(np.ones((dim,), np.float32), a.dtype)

    def shard(file, tensors):
        path = os.path.join(a.out, file)
        if not os.path.exists(path):
            save(path, tensors(), a.dtype)
        return file

    def block(i):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (heads * head_dim, dim),
            "self_attn.k_proj": (kv_heads * head_dim, dim),
            "self_attn.v_proj": (kv_heads * head_dim, dim),
            "self_attn.o_proj": (dim, heads * head_dim),
            "mlp.gate_proj": (hidden, dim),
            "mlp.up_proj": (hidden, dim),
            "mlp.down_proj": (dim, hidden),
        }
        names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + k + ".weight" for k in shapes]

        def make():
            out = {names[0]: ones, names[1]: ones}
            for k, (r, c) in shapes.items():
                out[p + k + ".weight"] = tensor(p + k, r, c, a.seed, a.dtype)
            return out

        return names, make

    files = [f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors" for i in range(layers + 1)]
    for i in range(layers):
        names, make = block(i)
        shard(files[i], make)
        weight_map.update({n: files[i] for n in names})
        done = i + 1
        eta = (time.time() - t0) / done * (layers - done)
        print(f"\rblock {done}/{layers}, ETA {eta:.0f} s", end="", file=sys.stderr, flush=True)
    outer = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    shard(files[layers], lambda: {
        outer[0]: tensor(outer[0], vocab, dim, a.seed, a.dtype),
        outer[1]: ones,
        outer[2]: tensor(outer[2], vocab, dim, a.seed, a.dtype),
    })
    for n in outer:
        weight_map[n] = files[layers]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
        "intermediate_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float16" if a.dtype == "f16" else "bfloat16",
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    # The index last: its presence marks a complete checkpoint.
    with open(index_path + ".tmp", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    os.replace(index_path + ".tmp", index_path)
    print(f"\n{a.out}: written in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
