"""nuq's Python functions over whole models and checkpoints: the same C++ code as the `nuq` command-line
tool (src/model_tasks.cpp, src/quantize_checkpoint.cpp, src/codebook_tuning.cpp), with arguments checked
and named in Python spelling, a progress bar, and typed results.

Long-running functions take ``progress``: True (default) draws a bar on stderr (tqdm when installed,
else a plain line), False is silent, a callable receives every event as a dict. An exception raised by
that callable, or Ctrl-C (KeyboardInterrupt), stops the work at the next event and propagates unchanged:
quantize_checkpoint and tune_codebooks then resume where they stopped when called again with the same
arguments; calibrate and fisher write their files only at the end, so a stopped run leaves none.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, TypedDict, Union

import numpy as np

from . import _args
from . import _nuq
from ._progress import BarStep, ProgressArg, ProgressEvent, Reporter

PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = Any  # NumPy arrays, or any DLPack / buffer-protocol producer on the CPU (e.g. torch tensors)


# ---- results -------------------------------------------------------------------------------------------

class CalibrateResult(TypedDict):
    out: str
    hessian: Optional[str]
    layers: int
    tokens: int
    windows: int
    hessian_inputs: int
    hessian_layers: int
    seconds: float


class FisherResult(TypedDict):
    out: str
    weights: int
    windows: int
    tokens: int
    mean_loss: float
    seconds: float
    load_seconds: float


class EvalResult(TypedDict):
    """The object `nuq eval --json` prints, field for field."""

    model: str
    description: str
    linear_bits_per_weight: float
    tokenizer: str
    text: str
    ctx: int
    windows: int
    tokens_scored: int
    mean_nll: float
    perplexity: float
    tokens_per_second: float
    load_seconds: float
    kv_cache: str
    arithmetic: str


class GenerateResult(TypedDict):
    text: str
    tokens: List[int]
    prompt_tokens: List[int]
    description: str
    linear_bits_per_weight: float
    prefill_seconds: float
    decode_seconds: float
    tokens_per_second: float
    kv_cache: str
    arithmetic: str
    kv_cache_bytes: int
    kv_cache_tokens: int
    kv_cache_fp16_bytes: float


class ConvertResult(TypedDict):
    out: str
    description: str
    layers: int


class LayerRecord(TypedDict):
    name: str
    base: str
    rows: int
    cols: int
    source_dtype: str
    bits: int
    method: str
    group_size: int
    nnz: int
    outliers: int
    sensitive: int
    mse: float
    weighted_mse: float
    max_abs_error: float
    bits_per_weight: float
    sensitivity: str
    error_feedback: bool
    relative_output_error: float
    resumed: bool
    seconds: float


class QuantizeCheckpointResult(TypedDict):
    layers: List[LayerRecord]
    tensors_copied: int
    quantized_weights: int
    average_bits_per_weight: float
    files: List[str]
    output_bytes: int
    warnings: List[str]
    seconds: float


class TuneResult(TypedDict):
    windows: int
    tokens: int
    steps: int
    resumed_steps: int
    layers: int
    entries: int
    first_epoch_kl: float
    last_epoch_kl: float
    files: List[str]
    seconds: float
    indices_changed: int


# ---- bars ----------------------------------------------------------------------------------------------

def _window_bar(event: ProgressEvent) -> Optional[BarStep]:
    if event["stage"] != "window":
        return None
    postfix = ""
    if event.get("value_name"):
        postfix = f'{event["value_name"]} {event["value"]:.4f}'
    return event["windows"], event["window"] + 1, postfix


def _named(value_name: str, reporter: Reporter) -> Any:
    def forward(event: ProgressEvent) -> None:
        if value_name:
            event["value_name"] = value_name
        reporter(event)

    return forward


# ---- whole-model tasks ---------------------------------------------------------------------------------

def _calibrate_bar(event: ProgressEvent) -> Optional[BarStep]:
    if event["stage"] == "block":
        return event["blocks"], event["block"] + 1, ""
    return _window_bar(event)


def calibrate(model: PathLike, text: PathLike, out: PathLike, *, hessian: Optional[PathLike] = None,
              tokenizer: Optional[PathLike] = None, ctx: int = 512, max_tokens: int = 32768, skip_tokens: int = 0,
              threads: int = 0, by_block: bool = False, sequential: Optional[int] = None,
              sequential_sparse: _args.Fraction = 0.0, progress: ProgressArg = True) -> CalibrateResult:
    """Activation statistics of every linear layer's input, from a forward pass over a text (`nuq calibrate`).

    model: the checkpoint to be quantized (llama2.c .bin, .gguf, safetensors file or directory; the
        statistics carry its tensor names). text: UTF-8 file, tokenized as one string.
    out: safetensors file of the mean of x² per input column ("activation statistics"), what
        quantize_checkpoint(fisher=...) accepts.
    hessian: also write the full XᵀX / tokens of every layer input here, for
        quantize_checkpoint(hessian=...) (error feedback); q/k/v and gate/up share one matrix.
    tokenizer: default the model's own (GGUF) or tokenizer.json next to a safetensors checkpoint.
    ctx: window length in tokens, BOS included. max_tokens: tokens of text to run (0: all).
    skip_tokens: start this far into the text (keep calibration and evaluation text apart).
    threads: 0 = all cores.
    by_block: run the model one decoder block at a time over all tokens (`nuq calibrate --by-block`):
        memory holds one block's weights and statistics plus the tokens' hidden states (for models larger
        than memory), a rerun with the same inputs resumes after the last finished block, and `hessian`
        names a directory of per-block shards. Same values as the one-pass run.
    sequential: with by_block and hessian, GPTQ's sequential order (`--sequential B`): each block is
        quantized to this many bits (nuq, error feedback from its XᵀX, `sequential_sparse` as
        quantize_checkpoint's outlier_fraction) before the next block runs on its outputs; then
        quantize_checkpoint(bits=B, outlier_fraction=F, hessian=...) with the same values reproduces them.
    progress: see the module docstring (events: stage 'loaded'; with hessian or by block, 'disk' with
        where, bytes_needed, bytes_free (the call refuses to start when they do not fit); then 'window'
        with window, windows, tokens_done, window_seconds, elapsed_seconds, or by block 'block' with block,
        blocks, first_block, block_seconds, elapsed_seconds).
    Both files are written atomically after the last window (block); a stopped run writes neither.
    """
    fn = "calibrate"
    if sequential is not None:
        sequential = _args.bits(fn, sequential, name="sequential")
    sparse = _args.fraction(fn, "sequential_sparse", sequential_sparse)
    if sparse and sequential is None:
        raise ValueError(f"{fn}: sequential_sparse is used only with sequential=BITS")
    args = (_args.path(fn, "model", model), _args.path(fn, "text", text), _args.path(fn, "out", out),
            _args.optional_path(fn, "hessian", hessian), _args.optional_path(fn, "tokenizer", tokenizer),
            _args.integer(fn, "ctx", ctx, 2), _args.integer(fn, "max_tokens", max_tokens),
            _args.integer(fn, "skip_tokens", skip_tokens), _args.integer(fn, "threads", threads), bool(by_block),
            sequential or 0, sparse)
    with Reporter(fn, progress, "calibrate", "window", _calibrate_bar) as reporter:
        result: CalibrateResult = _nuq._calibrate(*args, progress=reporter)
    return result


def fisher(model: PathLike, text: PathLike, out: PathLike, *, tokenizer: Optional[PathLike] = None, ctx: int = 512,
           max_tokens: int = 16384, skip_tokens: int = 0, threads: int = 0,
           progress: ProgressArg = True) -> FisherResult:
    """Empirical Fisher diagonal of every linear weight from the decoder's backward pass (`nuq fisher`).

    One squared gradient of each window's mean next-token loss per window of `ctx` tokens; written to
    `out` (atomically, at the end) for quantize_checkpoint(fisher=...). Arguments as in calibrate; a
    'disk' event (as calibrate's) precedes the windows, and the 'window' events carry the window's loss as
    `value`.
    """
    fn = "fisher"
    args = (_args.path(fn, "model", model), _args.path(fn, "text", text), _args.path(fn, "out", out),
            _args.optional_path(fn, "tokenizer", tokenizer), _args.integer(fn, "ctx", ctx, 2),
            _args.integer(fn, "max_tokens", max_tokens), _args.integer(fn, "skip_tokens", skip_tokens),
            _args.integer(fn, "threads", threads))
    with Reporter(fn, progress, "fisher", "window", _window_bar) as reporter:
        result: FisherResult = _nuq._fisher(*args, progress=_named("loss", reporter))
    return result


def _arithmetic(fn: str, arithmetic: str, int8: bool) -> str:
    """The `arithmetic` argument, with int8=True as its shorthand for 'int8'."""
    choice = _args.choice(fn, "arithmetic", arithmetic, ("fastest", "exact", "int8"))
    if int8 and choice not in ("fastest", "int8"):
        raise ValueError(f"{fn}: int8=True conflicts with arithmetic={arithmetic!r}")
    return "int8" if int8 else choice


def evaluate(model: PathLike, text: PathLike, *, tokenizer: Optional[PathLike] = None, ctx: int = 512,
             max_tokens: int = 0, step: Optional[int] = None, threads: int = 0, decode_packed: bool = False,
             arithmetic: str = "fastest", int8: bool = False, device: str = "cpu",
             kv_calibration: Optional[PathLike] = None, kv_path: Optional[str] = None, kv_method: str = "nuq", kv_bits: Optional[int] = None,
             kv_outliers: Optional[_args.Fraction] = None, progress: ProgressArg = True) -> EvalResult:
    """Perplexity of a LLaMA-family checkpoint on a text file (`nuq eval`), over non-overlapping windows
    of `ctx` tokens that each start with BOS. Returns the fields `nuq eval --json` prints.

    model: llama2.c .bin, .gguf, safetensors (full precision or nuq-packed). max_tokens: score only the
        first N tokens (0: all). step: feed each window in forward calls of N tokens, as generation does
        (N <= 16 takes the fused decode kernels); None runs each window at once.
    decode_packed: decode packed layers to fp32 at load (reference numbers). arithmetic: how packed
        layers multiply in calls of <= 16 tokens: 'fastest' (int8 activations × int8 codebooks where the
        CPU has the AVX-512 VNNI+VBMI kernel, else exact), 'exact' (fp32), or 'int8' (step 16 unless
        given); the prefill path is exact. int8=True: the same as arithmetic='int8'. device: 'cpu', or
        'cuda' / 'cuda-bf16' for the packed layers (builds with CUDA).
    KV cache: kv_calibration (a file from save_kv_calibration or `nuq kv-calibrate`) quantizes it;
        kv_path 'kernel' (default) or 'roundtrip'; kv_method 'uniform' with kv_bits is the int baseline;
        kv_bits and kv_outliers (a fraction or '1%') are checked against the calibration.
    progress: 'window' events carry the perplexity so far as `value`.
    """
    fn = "evaluate"
    step_value = 0 if step is None else _args.integer(fn, "step", step, 1)
    kv_bits_value = 0 if kv_bits is None else _args.bits(fn, kv_bits, tuple(range(2, 9)), "kv_bits")
    outliers = None if kv_outliers is None else _args.fraction(fn, "kv_outliers", kv_outliers)
    args = (_args.path(fn, "model", model), _args.path(fn, "text", text),
            _args.optional_path(fn, "tokenizer", tokenizer), _args.integer(fn, "ctx", ctx, 2),
            _args.integer(fn, "max_tokens", max_tokens), step_value, _args.integer(fn, "threads", threads),
            bool(decode_packed), _arithmetic(fn, arithmetic, int8),
            _args.choice(fn, "device", device, ("cpu", "cuda", "cuda-bf16")),
            _args.optional_path(fn, "kv_calibration", kv_calibration),
            None if kv_path is None else _args.choice(fn, "kv_path", kv_path, ("kernel", "roundtrip")),
            _args.choice(fn, "kv_method", kv_method, ("nuq", "uniform")), kv_bits_value, outliers,
            repr(kv_outliers))
    with Reporter(fn, progress, "evaluate", "window", _window_bar) as reporter:
        result: EvalResult = _nuq._evaluate(*args, progress=_named("perplexity", reporter))
    return result


def generate(model: PathLike, prompt: str, *, tokenizer: Optional[PathLike] = None, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int = 1, threads: int = 0, decode_packed: bool = False,
             arithmetic: str = "fastest", int8: bool = False, device: str = "cpu",
             kv_calibration: Optional[PathLike] = None, progress: ProgressArg = True) -> GenerateResult:
    """Continue `prompt` with a LLaMA-family checkpoint (what examples/generate.cpp does).

    Greedy when temperature is 0, else sampled (deterministic for a given seed). Stops after
    max_new_tokens, at EOS or when the cache is full. kv_calibration generates on a quantized KV cache
    (decode attention over its pages); the result reports its bytes (kv_cache_bytes) against an fp16
    cache of the same tokens (kv_cache_fp16_bytes). decode_packed, arithmetic, int8, device: as in
    evaluate; the result's `arithmetic` says which one the packed layers used.
    Returns the text generated (without the prompt), its token ids and timings. progress: 'token'
    events carry each new token's id (`token`) and bytes (`piece`) as it is generated.
    """
    fn = "generate"
    if not isinstance(prompt, str):
        raise TypeError(f"{fn}: prompt must be a str, got {prompt!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"{fn}: temperature must be a number >= 0, got {temperature!r}")
    args = (_args.path(fn, "model", model), prompt, _args.optional_path(fn, "tokenizer", tokenizer),
            _args.integer(fn, "max_new_tokens", max_new_tokens), float(temperature),
            _args.integer(fn, "seed", seed), _args.integer(fn, "threads", threads), bool(decode_packed),
            _arithmetic(fn, arithmetic, int8), _args.choice(fn, "device", device, ("cpu", "cuda", "cuda-bf16")),
            _args.optional_path(fn, "kv_calibration", kv_calibration))

    def token_bar(event: ProgressEvent) -> Optional[BarStep]:
        if event["stage"] != "token":
            return None
        return event["steps"], event["step"] + 1, ""

    with Reporter(fn, progress, "generate", "token", token_bar) as reporter:
        result: GenerateResult = _nuq._generate(*args, progress=reporter)
    return result


def convert(model: PathLike, out: PathLike) -> ConvertResult:
    """Write any checkpoint the decoder reads (llama2.c .bin, .gguf, safetensors) as a Hugging Face one
    (`nuq convert`): out/model.safetensors (fp32, Hugging Face names and RoPE layout) and config.json, for
    transformers' LlamaForCausalLM.from_pretrained and nuq.torch.load_quantized."""
    result: ConvertResult = _nuq._convert(_args.path("convert", "model", model), _args.path("convert", "out", out))
    return result


# ---- checkpoints and layers ----------------------------------------------------------------------------

def _checkpoint_bar(event: ProgressEvent) -> Optional[BarStep]:
    if event["stage"] in ("quantized", "resumed"):
        return event["weights_total"], event["weights_done"], event["name"]
    return None


def quantize_checkpoint(input: PathLike, output_dir: PathLike, bits: int = 4, *, method: str = "nuq",
                        group_size: int = 0, outlier_fraction: _args.Fraction = 0.0,
                        sensitive_fraction: _args.Fraction = 0.0, outliers_per_row: bool = False,
                        fisher: Optional[PathLike] = None, plan: Optional[PathLike] = None,
                        include: Sequence[str] = (), exclude: Sequence[str] = (),
                        max_shard_bytes: int = 5_000_000_000, threads: int = 0, force: bool = False,
                        restart: bool = False, progress: ProgressArg = True, hessian: Optional[PathLike] = None,
                        damping: float = 0.01) -> QuantizeCheckpointResult:
    """Quantize a whole checkpoint into a packed nuq checkpoint (`nuq quantize`), streaming one tensor at a
    time and resuming an interrupted run.

    input: .safetensors file, sharded directory or index .json, or .gguf file. output_dir: created if absent.
    bits (2, 3, 4), method ('nuq', 'kmeans', 'rtn'), group_size, outlier_fraction, sensitive_fraction,
        outliers_per_row: as in quantize, for every selected layer (a plan overrides them per layer).
        Fractions are numbers (0.0045) or percent strings ('0.45%'); numbers above 0.2 are refused.
    fisher: per-weight sensitivities (fisher() output, or calibrate()'s activation statistics).
    hessian: calibrate(hessian=...) output: round with error feedback; damping as in quantize.
    plan: JSON plan (`nuq plan`). include/exclude: regular expressions on tensor names.
    max_shard_bytes: split bigger outputs into shards. threads: 0 = all cores.
    force: replace a complete checkpoint in output_dir. restart: discard unfinished work instead of resuming.
    progress: True/False/callable (module docstring). Events have keys stage, tensor_index, tensor_count,
        name, weights_done, weights_total, weights_resumed, elapsed_seconds, tensor_seconds and layer.
        Stages: 'start' (once per tensor, before it is quantized), then 'quantized' (or 'resumed' when an
        earlier run finished it; layer is then its record), 'assemble' once per output file, and 'done'
        (name is output_dir) at the end.
    Returns layers (one record per quantized layer), tensors_copied, quantized_weights,
    average_bits_per_weight, files, output_bytes, warnings, seconds.
    """
    fn = "quantize_checkpoint"
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError(f"{fn}: include and exclude take a list of regular expressions, not a str")
    in_path, out_path = _args.path(fn, "input", input), _args.path(fn, "output_dir", output_dir)
    bits = _args.bits(fn, bits)
    method = _args.choice(fn, "method", method, ("nuq", "kmeans", "rtn"))
    outliers = _args.fraction(fn, "outlier_fraction", outlier_fraction)
    sensitive = _args.fraction(fn, "sensitive_fraction", sensitive_fraction)
    with Reporter(fn, progress, "quantize", "weight", _checkpoint_bar) as reporter:
        result: QuantizeCheckpointResult = _nuq.quantize_checkpoint(
            in_path, out_path, bits, method=method, group_size=_args.integer(fn, "group_size", group_size),
            outlier_fraction=outliers, sensitive_fraction=sensitive, outliers_per_row=bool(outliers_per_row),
            fisher=_args.optional_path(fn, "fisher", fisher), plan=_args.optional_path(fn, "plan", plan),
            include=list(include), exclude=list(exclude),
            max_shard_bytes=_args.integer(fn, "max_shard_bytes", max_shard_bytes, 1),
            threads=_args.integer(fn, "threads", threads), force=bool(force), restart=bool(restart),
            progress=reporter, hessian=_args.optional_path(fn, "hessian", hessian), damping=float(damping))
    return result


_CALIBRATION_DIR = ".nuq-calibration"


def _calibration_settings(model: str, text: str, tokenizer: Optional[str], ctx: int, tokens: int, skip: int,
                          hessian: bool) -> Dict[str, Any]:
    """What decides the calibration statistics' bytes: files are named with their size and mtime so
    that an edited text or model is calibrated again rather than reused."""
    def identity(p: Optional[str]) -> Optional[List[Any]]:
        if p is None:
            return None
        files = sorted(os.path.join(p, f) for f in os.listdir(p)) if os.path.isdir(p) else [p]
        return [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files if os.path.isfile(f)]
    return {"model": identity(model), "text": identity(text), "tokenizer": identity(tokenizer), "ctx": ctx,
            "max_tokens": tokens, "skip_tokens": skip, "hessian": hessian}


def _calibrate_once(model: str, out_dir: str, text: str, tokenizer: Optional[str], ctx: int, tokens: int, skip: int,
                    hessian: bool, threads: int, progress: ProgressArg) -> Dict[str, Optional[str]]:
    """Stage 1 of quantize_pretrained: activation statistics (and XᵀX for error feedback) in
    out_dir/.nuq-calibration, reused by a rerun with the same settings (calibrate writes its files
    atomically at the end, and the settings file is written after them)."""
    import json

    work = os.path.join(out_dir, _CALIBRATION_DIR)
    os.makedirs(work, exist_ok=True)
    act = os.path.join(work, "act.safetensors")
    xtx = os.path.join(work, "xtx.safetensors") if hessian else None
    stamp = os.path.join(work, "settings.json")
    settings = _calibration_settings(model, text, tokenizer, ctx, tokens, skip, hessian)
    try:
        with open(stamp, encoding="utf-8") as f:
            done = json.load(f) == settings and os.path.isfile(act) and (xtx is None or os.path.isfile(xtx))
    except (OSError, ValueError):
        done = False
    if not done:
        if os.path.exists(stamp):
            os.remove(stamp)
        calibrate(model, text, act, hessian=xtx, tokenizer=tokenizer, ctx=ctx, max_tokens=tokens, skip_tokens=skip,
                  threads=threads, progress=progress)
        with open(stamp + ".tmp", "w", encoding="utf-8") as f:
            json.dump(settings, f)
        os.replace(stamp + ".tmp", stamp)
    return {"act": act, "xtx": xtx}


# What quantize_pretrained needs of a Hub repository: weights, configs, tokenizer; not other formats' weights.
_HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model", "merges.txt", "vocab.txt",
              "*.jinja"]


def _model_directory(fn: str, model: PathLike) -> str:
    """A local path as it is; a Hugging Face Hub id ("org/name", not a path here) downloaded with
    huggingface_hub (its cache, only the files quantization needs)."""
    path = _args.path(fn, "model", model)
    if os.path.exists(path) or path.count("/") != 1 or path.startswith((".", "/")):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{fn}: model {path!r} is not a local path, and huggingface_hub (to fetch it from the Hub "
                         "as a model id) is not installed") from None
    local: str = snapshot_download(path, allow_patterns=_HUB_FILES)
    return local


def quantize_pretrained(model: PathLike, out_dir: PathLike, bits: int = 3, *, sparse: _args.Fraction = "0.45%",
                        calibration_text: Optional[PathLike] = None, error_feedback: Optional[bool] = None,
                        tokenizer: Optional[PathLike] = None, calibration_tokens: int = 8192, skip_tokens: int = 0,
                        ctx: int = 512, group_size: int = 0, plan: Optional[PathLike] = None, threads: int = 0,
                        force: bool = False, restart: bool = False, keep_calibration: bool = False,
                        progress: ProgressArg = True) -> QuantizeCheckpointResult:
    """Calibrate, quantize and save a Hugging Face model directory in one call: the result is a directory
    that `AutoModelForCausalLM.from_pretrained` loads after `import nuq.hf` (and that `nuq eval` runs).

    model: Hugging Face model directory (config.json + safetensors, sharded or not), a Hub model id
        ("org/name", fetched with huggingface_hub when no such local path exists), a .safetensors file, or
        anything quantize_checkpoint reads. out_dir: created if absent; config.json (with
        quantization_config) and tokenizer files are copied from a model directory.
    bits: 2, 3 or 4 (a plan overrides it per layer). sparse: share of each layer's weights kept in fp16
        ('0.45%' or 0.0045); with calibration, 0.05% of it goes to the most sensitive weights, as in
        `nuq quantize --sparse --fisher`.
    calibration_text: UTF-8 text to calibrate on (activation statistics weight the codebooks);
        calibration_tokens of it (0: all) after skip_tokens, in windows of ctx. tokenizer: for
        calibration when the model directory has no tokenizer.json.
    error_feedback: round with second-order error feedback from the calibration's XᵀX (GPTQ-style);
        default: on when calibration_text is given. It needs calibration_text.
    Resumable: a call stopped at any point (Ctrl-C, an exception from a progress callable, a killed
    process) continues where it stopped when made again with the same arguments: the calibration is
    reused when its inputs are unchanged, quantization resumes per tensor. The calibration files live in
    out_dir/.nuq-calibration until the checkpoint is complete (kept with keep_calibration=True).
    Returns quantize_checkpoint's result.
    """
    fn = "quantize_pretrained"
    in_path, out_path = _model_directory(fn, model), _args.path(fn, "out_dir", out_dir)
    sparse_fraction = _args.fraction(fn, "sparse", sparse)
    if error_feedback is None:
        error_feedback = calibration_text is not None
    if error_feedback and calibration_text is None:
        raise ValueError(f"{fn}: error_feedback needs calibration_text (the XᵀX it rounds against comes from it)")
    stats: Dict[str, Optional[str]] = {"act": None, "xtx": None}
    if calibration_text is not None:
        stats = _calibrate_once(in_path, out_path, _args.path(fn, "calibration_text", calibration_text),
                                _args.optional_path(fn, "tokenizer", tokenizer), _args.integer(fn, "ctx", ctx, 2),
                                _args.integer(fn, "calibration_tokens", calibration_tokens),
                                _args.integer(fn, "skip_tokens", skip_tokens), bool(error_feedback),
                                _args.integer(fn, "threads", threads), progress)
    sensitive = min(sparse_fraction, 0.0005) if stats["act"] else 0.0
    result = quantize_checkpoint(in_path, out_path, bits, group_size=group_size,
                                 outlier_fraction=sparse_fraction - sensitive, sensitive_fraction=sensitive,
                                 fisher=stats["act"], hessian=stats["xtx"], plan=plan, threads=threads, force=force,
                                 restart=restart, progress=progress)
    if stats["act"] and not keep_calibration:
        import shutil

        shutil.rmtree(os.path.join(out_path, _CALIBRATION_DIR), ignore_errors=True)
    return result


def tune_codebooks(packed: PathLike, reference: PathLike, ids: Union[Sequence[int], ArrayLike], start: int,
                   output_dir: PathLike, *, ctx: int = 512, epochs: int = 1, lr: float = 2e-4, norms: bool = False,
                   indices: bool = False, index_lr: float = 2e-3, save_every: int = 8, threads: int = 0,
                   progress: ProgressArg = True) -> TuneResult:
    """Tune the codebooks of a packed checkpoint by distillation from its reference (`nuq tune`,
    docs/quantization.md#codebook-tuning-nuq-tune).

    packed: nuq-packed checkpoint. reference: the checkpoint it was quantized from. ids: calibration
    token ids (list or int32 array), cut into windows of `start` (BOS) + ctx - 1 tokens. output_dir:
    created if absent, not the input's. lr: Adam step relative to each codebook's RMS. norms: also tune
    the RMSNorm gains. indices: also move weights between codebook entries (index_lr). save_every: steps
    between saved optimizer states, so that a call with the same arguments resumes. progress: events
    with step, steps, epoch, kl, seconds, resumed_steps.
    Returns windows, tokens, steps, resumed_steps, layers, entries, first_epoch_kl, last_epoch_kl, files,
    seconds, indices_changed.
    """
    fn = "tune_codebooks"
    ids_list = [int(i) for i in np.asarray(ids).reshape(-1)]

    def step_bar(event: ProgressEvent) -> Optional[BarStep]:
        return event["steps"], event["step"] + 1, f'KL {event["kl"]:.5f}'

    with Reporter(fn, progress, "tune", "step", step_bar) as reporter:
        result: TuneResult = _nuq.tune_codebooks(
            _args.path(fn, "packed", packed), _args.path(fn, "reference", reference), ids_list,
            _args.integer(fn, "start", start), _args.path(fn, "output_dir", output_dir),
            ctx=_args.integer(fn, "ctx", ctx, 2), epochs=_args.integer(fn, "epochs", epochs, 1), lr=float(lr),
            norms=bool(norms), indices=bool(indices), index_lr=float(index_lr),
            save_every=_args.integer(fn, "save_every", save_every), threads=_args.integer(fn, "threads", threads),
            progress=reporter)
    return result


def quantize(weight: ArrayLike, bits: int = 4, *, method: str = "nuq", sensitivity: Optional[ArrayLike] = None,
             group_size: int = 0, outlier_fraction: _args.Fraction = 0.0, sensitive_fraction: _args.Fraction = 0.0,
             outliers_per_row: bool = False, kmeans_init: str = "binned_dp", max_iterations: int = 50,
             dp_candidates: int = 256, seed: int = 0, threads: int = 0, name: str = "weight",
             hessian: Optional[ArrayLike] = None, damping: float = 0.01,
             error_feedback: bool = True) -> _nuq.PackedLayer:
    """Quantize a weight matrix into a PackedLayer (docs/quantization.md).

    weight: float32 [rows, cols], C-contiguous (rows = output features); NumPy, or any DLPack/buffer
        producer on the CPU (e.g. a torch CPU tensor), read without a copy.
    bits: 2, 3 or 4. method: 'nuq' (sensitivity-weighted k-means codebooks), 'kmeans' (unweighted),
        'rtn' (round to nearest).
    sensitivity: optional float32 [rows, cols], finite and >= 0 (e.g. the Fisher diagonal).
    group_size: columns per codebook, dividing cols; 0 = the method's default (per row; 128 for rtn).
    outlier_fraction, sensitive_fraction: fractions of the weights kept exactly in the sparse part
        (largest magnitudes; then largest sensitivities): numbers such as 0.0045 or percent strings such
        as '0.45%'. Numbers above 0.2 are refused as probable percentages ('45%' states the intent).
    outliers_per_row: count outliers per row. kmeans_init: 'binned_dp' (default), 'quantiles',
        'kmeans++' or 'exact_dp'; max_iterations, dp_candidates and seed tune the solver.
    threads: 0 = all cores (results do not depend on it). name: used in error messages.
    hessian: optional float64 [cols, cols], the mean XᵀX of the layer's inputs
        (HessianAccumulator.matrix): rounds with GPTQ-style error feedback onto the same codebooks.
        damping: added to its diagonal, relative to the diagonal's mean. error_feedback=False rounds to
        nearest and only measures .stats['relative_output_error'].
    Returns a PackedLayer whose .stats holds the error figures and bits per weight. Releases the GIL.
    """
    fn = "quantize"
    return _nuq.quantize(weight, _args.bits(fn, bits), method=method, sensitivity=sensitivity,
                         group_size=_args.integer(fn, "group_size", group_size),
                         outlier_fraction=_args.fraction(fn, "outlier_fraction", outlier_fraction),
                         sensitive_fraction=_args.fraction(fn, "sensitive_fraction", sensitive_fraction),
                         outliers_per_row=bool(outliers_per_row), kmeans_init=kmeans_init,
                         max_iterations=max_iterations, dp_candidates=dp_candidates, seed=seed, threads=threads,
                         name=name, hessian=hessian, damping=damping, error_feedback=error_feedback)


def calibrate_kv_layer(k: ArrayLike, v: ArrayLike, k_sensitivity: Optional[ArrayLike] = None,
                       v_sensitivity: Optional[ArrayLike] = None, bits_k: int = 3, bits_v: int = 3,
                       outlier_fraction: _args.Fraction = 0.01, q_norm: bool = False) -> Dict[str, Any]:
    """Fit one layer's quantized KV cache (docs/kv-cache.md) from its keys and values.

    k, v: float32 [tokens, n_kv_heads, head_dim], keys before RoPE. k_sensitivity, v_sensitivity:
    optional float32 of the same shapes (e.g. squared gradients) weighting the fit. bits_k, bits_v: 2, 3
    or 4. outlier_fraction: share of each vector kept in fp16 (0.01 or '1%'; numbers above 0.2 are
    refused). q_norm: match the datatypes' mean and spread to the data.
    Returns the calibration as a dict (for KVCache and save_kv_calibration).
    """
    fn = "calibrate_kv_layer"
    result: Dict[str, Any] = _nuq.calibrate_kv_layer(
        k, v, k_sensitivity, v_sensitivity, _args.bits(fn, bits_k, name="bits_k"),
        _args.bits(fn, bits_v, name="bits_v"), _args.fraction(fn, "outlier_fraction", outlier_fraction),
        bool(q_norm))
    return result
