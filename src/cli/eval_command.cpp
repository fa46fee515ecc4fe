// `nuq eval`: perplexity of a LLaMA-family checkpoint on a text file (docs/llama.md describes the
// chunking), `nuq calibrate`: activation statistics, both through include/nuq/model_tasks.hpp; and `nuq
// convert`: any checkpoint the decoder reads, written as a Hugging Face one.
#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>

#include "commands.hpp"
#include "nuq/error.hpp"
#include "nuq/llama.hpp"
#ifdef NUQ_WITH_CUDA
#include "nuq/llama_cuda.hpp"
#endif
#include "nuq/model_tasks.hpp"

namespace nuq::cli {

LinearBackendFactory cuda_backend_factory() {
#ifdef NUQ_WITH_CUDA
  return [](const std::string& device) -> std::shared_ptr<LinearBackend> {
    return cuda::make_linear_backend(device == "cuda" ? cuda::ActivationType::f16 : cuda::ActivationType::bf16);
  };
#else
  return nullptr;
#endif
}

void add_eval_command(CLI::App& app, Action& action) {
  struct Options {
    EvalOptions eval;
    std::string kv_outliers;
    bool json = false, quiet = false;
  };
  auto o = std::make_shared<Options>();
  EvalOptions& e = o->eval;
  CLI::App* cmd = app.add_subcommand(
      "eval", "Perplexity of a LLaMA-family checkpoint (llama2.c .bin, .gguf, safetensors, full precision or "
              "nuq-packed) on a text file, over non-overlapping windows that each start with BOS");
  cmd->add_option("--model,-m", e.model, "checkpoint")->required();
  cmd->add_option("--tokenizer", e.tokenizer,
                  "tokenizer: llama2.c .bin, .gguf or tokenizer.json (default: the model's own GGUF, or "
                  "tokenizer.json next to a safetensors checkpoint)");
  cmd->add_option("--text", e.text, "UTF-8 text file, tokenized as one string")->required();
  cmd->add_option("--ctx", e.ctx, "window length in tokens, BOS included")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--max-tokens", e.max_tokens, "score only the first N tokens of the text (0: all)")->capture_default_str();
  cmd->add_option("--threads,-j", e.threads, "worker threads (0: all cores)")->capture_default_str();
  cmd->add_flag("--json", o->json, "print one JSON object instead of text");
  cmd->add_flag("--decode-packed", e.decode_packed,
                "decode nuq-packed layers to fp32 at load (reference numbers) instead of running the packed kernels");
  cmd->add_option("--step", e.step,
                  "feed each window in forward calls of N tokens, as generation does; N <= 16 runs packed layers "
                  "through the fused decode kernels (default: the whole window at once, the prefill path)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  auto* arithmetic =
      cmd->add_option("--arithmetic", e.arithmetic,
                      "how packed layers multiply in forward calls of <= 16 tokens (--step): fastest (int8 where "
                      "the CPU has the AVX-512 VNNI+VBMI kernel, else exact), exact (fp32, the reference numbers), "
                      "or int8 (also on other CPUs, through the portable reference; implies --step 16 unless "
                      "--step is given). The prefill path is exact whatever this says")
          ->capture_default_str()
          ->check(CLI::IsMember({"fastest", "exact", "int8"}));
  cmd->add_flag_callback("--int8", [&e] { e.arithmetic = "int8"; }, "same as --arithmetic int8")->excludes(arithmetic);
  cmd->add_option("--device", e.device,
                  "where nuq-packed layers run: cpu, or cuda / cuda-bf16 (the CUDA kernels with fp16 / bf16 "
                  "activations; the rest of the decoder stays on the CPU)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda", "cuda-bf16"}));
  cmd->add_flag("--quiet,-q", o->quiet, "no progress output");
  add_kv_eval_options(cmd, e.kv, o->kv_outliers);
  cmd->callback([o, &action] {
    action = [o]() -> int {
      EvalOptions& e = o->eval;
      e.make_backend = cuda_backend_factory();
      if (!o->kv_outliers.empty()) {
        e.kv.outlier_fraction = parse_percent(o->kv_outliers, "--kv-outliers");
        e.kv.outliers_text = o->kv_outliers;
      }
      const bool tty = ::isatty(STDERR_FILENO) && !o->quiet && !o->json;
      const EvalResult r = evaluate_perplexity(e, [&](const TextTaskProgress& p) {
        if (p.stage != TextTaskProgress::Stage::window) return;
        if (tty)
          std::fprintf(stderr, "\r\033[Kwindow %lld/%lld  perplexity so far %.4f", (long long)(p.window + 1),
                       (long long)p.windows, p.value);
        else if (!o->quiet && !o->json && (p.window + 1) % 16 == 0)
          std::fprintf(stderr, "window %lld/%lld  perplexity so far %.4f\n", (long long)(p.window + 1),
                       (long long)p.windows, p.value);
      });
      if (tty) std::fprintf(stderr, "\r\033[K");
      if (o->json) {
        fmt::print("{}\n", to_json(r, 1));
        return 0;
      }
      fmt::print("model: {} ({}; linear layers {:.3f} bits/weight)\n", r.model, r.description, r.linear_bits_per_weight);
      fmt::print("text: {} ({} tokens, {} windows of up to {} tokens with BOS)\n", r.text, r.tokens_scored, r.windows,
                 r.ctx);
      if (r.kv_cache != "fp32") fmt::print("KV cache: {}\n", r.kv_cache);
      fmt::print("tokens scored {}, mean NLL {:.4f}, perplexity {:.4f}\n", r.tokens_scored, r.mean_nll, r.perplexity);
      const std::string mode = r.step > 0 ? fmt::format("{}-token step", r.step) : std::string("prefill");
      fmt::print("{} throughput {:.1f} tokens/s ({:.1f} s; model loaded in {:.1f} s; packed layers: {})\n", mode,
                 r.tokens_per_second, r.seconds, r.load_seconds, r.arithmetic);
      return 0;
    };
  });
}

void add_calibrate_command(CLI::App& app, Action& action) {
  auto o = std::make_shared<CalibrateOptions>();
  CLI::App* cmd = app.add_subcommand(
      "calibrate", "Activation statistics of every linear layer's input (mean of x² per input column, the diagonal "
                   "of XᵀX / tokens) from a forward pass over a text, written as a sensitivity file that `nuq "
                   "quantize --fisher` accepts");
  cmd->add_option("--model,-m", o->model, "checkpoint (the one to be quantized, for matching tensor names)")->required();
  cmd->add_option("--tokenizer", o->tokenizer, "tokenizer (as for nuq eval)");
  cmd->add_option("--text", o->text, "calibration text")->required();
  cmd->add_option("--out,-o", o->out, "output .safetensors file")->required();
  cmd->add_option("--hessian", o->hessian,
                  "also write the full XᵀX / tokens of every linear layer's input (Hessian statistics, "
                  "docs/sensitivity.md) to this file, for `nuq quantize --hessian` and `nuq plan --stats`; layers "
                  "reading the same input (q/k/v, gate/up) share one matrix");
  cmd->add_option("--ctx", o->ctx, "window length in tokens, BOS included")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--max-tokens", o->max_tokens, "tokens of text to run (0: all)")->capture_default_str();
  cmd->add_option("--skip-tokens", o->skip_tokens,
                  "start this many tokens into the text (keep calibration and evaluation text apart)")
      ->capture_default_str();
  cmd->add_option("--threads,-j", o->threads, "worker threads (0: all cores)")->capture_default_str();
  cmd->add_flag("--by-block", o->by_block,
                "run the model one decoder block at a time over all tokens (memory: one block's weights and "
                "statistics plus the tokens' hidden states, for models larger than memory); resumes after the last "
                "finished block when run again; --hessian then names a directory of per-block shards");
  auto sequential = std::make_shared<std::pair<int, std::string>>(0, "0");
  cmd->add_option("--sequential", sequential->first,
                  "with --by-block and --hessian: GPTQ's sequential order, quantizing each block to this many bits "
                  "(nuq, error feedback from the block's XᵀX) before the next block runs on its outputs; then quantize "
                  "with `nuq quantize --hessian DIR --bits B [--sparse F]`, the same options")
      ->check(CLI::IsMember({2, 3, 4}));
  cmd->add_option("--sequential-sparse", sequential->second,
                  "with --sequential: the sparse fraction (e.g. 0.45%), as `nuq quantize --sparse`")
      ->capture_default_str();
  cmd->callback([o, sequential, &action] {
    if (sequential->first > 0) {
      NUQ_CHECK(o->by_block && !o->hessian.empty(), Errc::invalid_argument,
                "--sequential needs --by-block and --hessian");
      QuantizeOptions q;
      q.bits = sequential->first;
      q.outlier_fraction = parse_percent(sequential->second, "--sequential-sparse");
      q.threads = o->threads;
      o->sequential = q;
    }
    action = [o]() -> int {
      const CalibrateResult r = calibrate_activations(*o, [](const TextTaskProgress& p) {
        using Stage = TextTaskProgress::Stage;
        if (p.stage == Stage::window && ((p.window + 1) % 8 == 0 || p.window + 1 == p.windows))
          std::fprintf(stderr, "window %lld/%lld\n", (long long)(p.window + 1), (long long)p.windows);
        if (p.stage == Stage::disk)
          fmt::print(stderr, "{}: writes up to {:.2f} GiB, {:.2f} GiB free\n", p.where,
                     double(p.bytes_needed) / (1 << 30), double(p.bytes_free) / (1 << 30));
        if (p.stage == Stage::block) {
          const int64_t done = p.block + 1 - p.first_block, left = p.blocks - p.block - 1;
          fmt::print(stderr, "block {}/{}{} in {:.1f} s, ETA {:.0f} s\n", p.block + 1, p.blocks,
                     p.first_block > 0 && done == 1 ? fmt::format(" (resumed after block {})", p.first_block) : "",
                     p.block_seconds, p.elapsed_seconds / double(done) * double(left));
        }
      });
      fmt::print("wrote {}: mean squared inputs of {} layers over {} tokens ({} windows) in {:.1f} s\n", o->out,
                 r.layers, r.tokens, r.windows, r.seconds);
      if (!o->hessian.empty())
        fmt::print("wrote {}: XᵀX of {} distinct layer inputs ({} layers)\n", o->hessian, r.hessian_inputs,
                   r.hessian_layers);
      return 0;
    };
  });
}

void add_convert_command(CLI::App& app, Action& action) {
  struct Options {
    std::string input, out;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "convert", "Write a LLaMA-family checkpoint the decoder reads (llama2.c .bin, .gguf, safetensors) as a Hugging "
                 "Face checkpoint (fp32 model.safetensors + config.json), e.g. to quantize a llama2.c model");
  cmd->add_option("input", o->input, "checkpoint")->required();
  cmd->add_option("--out,-o", o->out, "output directory")->required();
  cmd->callback([o, &action] {
    action = [o]() -> int {
      auto model = LlamaModel::load(o->input);
      model->save_hf(o->out);
      fmt::print("wrote {}/model.safetensors and config.json ({}, {} layers)\n", o->out, model->description(),
                 model->config().n_layers);
      return 0;
    };
  });
}

}  // namespace nuq::cli
