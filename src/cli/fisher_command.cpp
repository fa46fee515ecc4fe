// `nuq fisher`: the empirical Fisher diagonal of every linear weight from the decoder's backward pass
// (include/nuq/llama_grad.hpp), one gradient sample per window of text, written as a Fisher statistics
// file (docs/sensitivity.md) that `nuq quantize --fisher`, `nuq plan --stats` and `nuq stats merge` read.
// `nuq tune`: the other user of the backward pass, codebook tuning by distillation
// (include/nuq/codebook_tuning.hpp).
#include <fmt/format.h>

#include <chrono>
#include <filesystem>

#include "commands.hpp"
#include "nuq/codebook_tuning.hpp"
#include "nuq/error.hpp"
#include "nuq/llama.hpp"
#include "nuq/llama_grad.hpp"
#include "nuq/model_tasks.hpp"
#include "nuq/safetensors.hpp"
#include "nuq/sensitivity.hpp"
#include "nuq/tokenizer.hpp"

namespace nuq::cli {
namespace {

namespace fs = std::filesystem;

std::string duration(double s) {
  if (s < 120) return fmt::format("{:.0f}s", s);
  if (s < 7200) return fmt::format("{:.0f}m{:02.0f}s", std::floor(s / 60), std::fmod(s, 60));
  return fmt::format("{:.0f}h{:02.0f}m", std::floor(s / 3600), std::fmod(s / 60, 60));
}

}  // namespace

void add_fisher_command(CLI::App& app, Action& action) {
  struct Options {
    FisherOptions fisher;
    bool quiet = false;
  };
  auto o = std::make_shared<Options>();
  FisherOptions& f = o->fisher;
  CLI::App* cmd = app.add_subcommand(
      "fisher", "Empirical Fisher diagonal (mean squared gradient of each window's mean next-token loss) of every "
                "linear weight, from a backward pass through the decoder, written as a statistics file for `nuq "
                "quantize --fisher` and `nuq plan --stats`");
  cmd->add_option("--model,-m", f.model, "checkpoint (the one to be quantized, for matching tensor names)")->required();
  cmd->add_option("--tokenizer", f.tokenizer, "tokenizer (as for nuq eval)");
  cmd->add_option("--text", f.text, "calibration text, tokenized as one string")->required();
  cmd->add_option("--out,-o", f.out, "output .safetensors file (written atomically)")->required();
  cmd->add_option("--ctx", f.ctx, "window length in tokens, BOS included; one gradient sample per window")
      ->capture_default_str()
      ->check(CLI::Range(2, 1 << 16));
  cmd->add_option("--max-tokens", f.max_tokens, "tokens of text to run (0: all)")->capture_default_str();
  cmd->add_option("--skip-tokens", f.skip_tokens,
                  "start this many tokens into the text (keep calibration and evaluation text apart)")
      ->capture_default_str();
  cmd->add_option("--threads,-j", f.threads, "worker threads (0: all cores)")->capture_default_str();
  cmd->add_flag("--quiet,-q", o->quiet, "no progress output");
  cmd->callback([o, &action] {
    action = [o]() -> int {
      const FisherOptions& f = o->fisher;
      const FisherResult r = compute_fisher(f, [&](const TextTaskProgress& p) {
        if (o->quiet) return;
        if (p.stage == TextTaskProgress::Stage::loaded) {
          std::fprintf(stderr, "%s: %s, %lld layers; %lld tokens of %s in windows of %lld (loaded in %.1f s)\n",
                       f.model.c_str(), p.model->description().c_str(), (long long)p.model->config().n_layers,
                       (long long)p.tokens, f.text.c_str(), (long long)f.ctx, p.load_seconds);
          return;
        }
        if (p.stage == TextTaskProgress::Stage::disk) {
          fmt::print(stderr, "{}: writes {} after the last window, {} free\n", p.where, human_bytes(p.bytes_needed),
                     human_bytes(p.bytes_free));
          return;
        }
        std::fprintf(stderr, "window %lld/%lld  loss %.4f  %.1f s  ETA %s\n", (long long)(p.window + 1),
                     (long long)p.windows, p.value, p.window_seconds,
                     duration(p.elapsed_seconds / double(p.window + 1) * double(p.windows - p.window - 1)).c_str());
      });
      fmt::print("wrote {}: Fisher diagonal of {} weights over {} windows ({} tokens, mean loss {:.4f}) in {:.1f} s "
                 "({:.1f} s per window)\n",
                 f.out, r.weights, r.windows, r.tokens, r.mean_loss, r.seconds, r.seconds / double(r.windows));
      return 0;
    };
  });
}

void add_tune_command(CLI::App& app, Action& action) {
  struct Options {
    std::string model, reference, tokenizer, out;
    std::vector<std::string> texts;
    int64_t max_tokens = 65536, skip_tokens = 0;
    CodebookTuningOptions tuning;
    bool quiet = false;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "tune", "Tune the codebooks of a nuq-packed checkpoint so that the quantized decoder's next-token "
              "distribution matches its full-precision reference's on calibration text (distillation); same "
              "format and size, indices unchanged unless --indices");
  cmd->add_option("model", o->model, "nuq-packed checkpoint (from nuq quantize)")->required();
  cmd->add_option("--reference,-r", o->reference, "the full-precision checkpoint it was quantized from")->required();
  cmd->add_option("--out,-o", o->out, "output directory (not the input's)")->required();
  cmd->add_option("--tokenizer", o->tokenizer, "tokenizer (as for nuq eval; default: the reference's own)");
  cmd->add_option("--text", o->texts,
                  "calibration text, tokenized as one string; repeat to mix texts (their windows alternate, "
                  "--skip-tokens and --max-tokens apply to each)")
      ->required();
  cmd->add_option("--ctx", o->tuning.ctx, "window length in tokens, BOS included; one optimizer step per window")
      ->capture_default_str()
      ->check(CLI::Range(2, 1 << 16));
  cmd->add_option("--max-tokens", o->max_tokens, "tokens of each text to train on (0: all)")->capture_default_str();
  cmd->add_option("--skip-tokens", o->skip_tokens,
                  "start this many tokens into the text (keep calibration and evaluation text apart)")
      ->capture_default_str();
  cmd->add_option("--epochs", o->tuning.epochs, "passes over the windows")->capture_default_str()->check(CLI::Range(1, 1000));
  cmd->add_option("--lr", o->tuning.learning_rate, "Adam step size relative to each codebook's RMS")
      ->capture_default_str()
      ->check(CLI::Range(1e-7, 1.0));
  cmd->add_option("--threads,-j", o->tuning.threads, "worker threads (0: all cores)")->capture_default_str();
  cmd->add_flag("--norms", o->tuning.tune_norms, "also tune the RMSNorm gains (kept in full precision)");
  cmd->add_flag("--indices", o->tuning.tune_indices,
                "also move weights between the entries of their codebook (straight-through; same bits per weight)");
  cmd->add_option("--index-lr", o->tuning.index_learning_rate,
                  "with --indices: Adam step size of each weight's offset from its entry, relative to its codebook's RMS")
      ->capture_default_str()
      ->check(CLI::Range(1e-7, 1.0));
  cmd->add_option("--save-every", o->tuning.save_every,
                  "save the optimizer state every N steps, so that the same command run again resumes (0: never)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--quiet,-q", o->quiet, "no progress output");
  cmd->callback([o, &action] {
    action = [o]() -> int {
      // The tokenizer and text are checked before both models are loaded and the first step is taken.
      std::string tok_path = o->tokenizer;
      if (tok_path.empty()) {
        auto reference = LlamaModel::load(o->reference, {1, false});
        tok_path = find_tokenizer(*reference, o->reference, "", ArgStyle::cli);
      }
      auto tok = Tokenizer::load(tok_path);
      const auto meta = LlamaModel::load(o->model, {1, false});
      // Several texts: their windows alternate (each text cut to whole windows), so that every part of the
      // run, and the decaying steps at its end, sees all of them.
      std::vector<std::vector<int32_t>> streams;
      const std::size_t per = std::size_t(o->tuning.ctx - 1);
      for (const std::string& text : o->texts) {
        streams.push_back(
            calibration_tokens(*tok, tok_path, meta->config().vocab_size, text, o->skip_tokens, o->max_tokens,
                               ArgStyle::cli));
        if (o->texts.size() == 1) break;
        NUQ_CHECK(streams.back().size() >= per, Errc::invalid_argument,
                  "{}: {} tokens after --skip-tokens, fewer than one window of {}; mixed texts need whole windows",
                  text, streams.back().size(), per);
        streams.back().resize(streams.back().size() / per * per);
      }
      std::vector<int32_t> ids;
      for (std::size_t at = 0;; at += per) {
        bool any = false;
        for (const auto& st : streams)
          if (at < st.size()) {
            ids.insert(ids.end(), st.begin() + std::ptrdiff_t(at), st.begin() + std::ptrdiff_t(std::min(st.size(), at + per)));
            any = true;
          }
        if (!any) break;
      }
      if (!o->quiet) {
        std::string names;
        for (const std::string& t : o->texts) names += (names.empty() ? "" : " + ") + t;
        std::fprintf(stderr, "%s: %s; %zu tokens of %s in windows of %lld, %d epochs\n", o->model.c_str(),
                     meta->description().c_str(), ids.size(), names.c_str(), (long long)o->tuning.ctx,
                     o->tuning.epochs);
      }
      const auto t1 = std::chrono::steady_clock::now();
      const CodebookTuningResult r =
          tune_codebooks(o->model, o->reference, ids, tok->bos(), o->out, o->tuning, [&](const CodebookTuningProgress& p) {
            if (o->quiet) return;
            if (p.resumed_steps && p.step == p.resumed_steps)
              std::fprintf(stderr, "resumed after step %lld from the saved state in %s\n", (long long)p.resumed_steps,
                           o->out.c_str());
            const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
            std::fprintf(stderr, "step %lld/%lld (epoch %d)  KL %.5f  %.1f s  ETA %s\n", (long long)(p.step + 1),
                         (long long)p.steps, p.epoch + 1, p.kl, p.seconds,
                         duration(elapsed / double(p.step + 1 - p.resumed_steps) * double(p.steps - p.step - 1)).c_str());
          });
      fmt::print("wrote {}: {} codebook entries of {} layers tuned in {} steps on {} tokens; mean KL per position "
                 "{:.5f} in the first epoch, {:.5f} in the last ({:.1f} s)\n",
                 o->out, r.entries, r.layers, r.steps, r.tokens, r.first_epoch_kl, r.last_epoch_kl, r.seconds);
      if (o->tuning.tune_indices)
        fmt::print("{} weights read a different codebook entry than before\n", r.indices_changed);
      return 0;
    };
  });
}

}  // namespace nuq::cli
