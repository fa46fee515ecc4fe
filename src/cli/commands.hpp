// Subcommands of the `nuq` tool. Each registers itself on the app; main() runs whichever was chosen
// and turns nuq::Error into a one-line message and a non-zero exit.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string_view>
#include <string>

#include "nuq/model_tasks.hpp"


namespace nuq::cli {

using Action = std::function<int()>;

// Adds `inspect` to app; the returned action is set when the subcommand is parsed.
void add_inspect_command(CLI::App& app, Action& action);
void add_bench_command(CLI::App& app, Action& action);
void add_quantize_command(CLI::App& app, Action& action);
void add_eval_command(CLI::App& app, Action& action);
void add_convert_command(CLI::App& app, Action& action);
void add_calibrate_command(CLI::App& app, Action& action);
// `fisher`: the empirical Fisher diagonal from the decoder's backward pass (fisher_command.cpp).
void add_fisher_command(CLI::App& app, Action& action);
// `tune`: codebook tuning by distillation (fisher_command.cpp, include/nuq/codebook_tuning.hpp).
void add_tune_command(CLI::App& app, Action& action);
// `plan` and `stats merge` (docs/sensitivity.md).
void add_plan_command(CLI::App& app, Action& action);
// `kv-calibrate`, and the --kv-* options of `eval` (kv_command.cpp, docs/kv-cache.md).
void add_kv_calibrate_command(CLI::App& app, Action& action);
// The --kv-* options of `eval`, filling `o` (KvCacheOptions, include/nuq/model_tasks.hpp) except the
// outlier fraction, which `outliers` receives as written ("1%").
void add_kv_eval_options(CLI::App* cmd, KvCacheOptions& o, std::string& outliers);
// Makes CUDA linear backends in a build with CUDA; empty otherwise.
LinearBackendFactory cuda_backend_factory();

// "71.2 MiB"
std::string human_bytes(uint64_t n);

// Argument parsing shared by the subcommands (parse.cpp).
// The whole of `text` as a finite number, or NaN (which fails every range check) if it is not one.
double parse_number(const std::string& text);
// "0.45%" and "0.45" both mean 0.45 percent (sparse fractions are always spoken of in percent); returns
// the fraction. Throws naming `flag` outside [0, 100).
double parse_percent(std::string text, std::string_view flag);
// "5GB" (10^9), "1.5GiB" (2^30), "500MB", "4096" -> bytes; nullopt if it is not a size of at least 1 byte.
std::optional<uint64_t> parse_size(std::string text);

}  // namespace nuq::cli
