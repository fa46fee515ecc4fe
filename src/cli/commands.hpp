// Subcommands of the `nuq` tool. Each registers itself on the app; main() runs whichever was chosen
// and turns nuq::Error into a one-line message and a non-zero exit.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
#include <string>

namespace nuq::cli {

using Action = std::function<int()>;

// Adds `inspect` to app; the returned action is set when the subcommand is parsed.
void add_inspect_command(CLI::App& app, Action& action);
void add_bench_command(CLI::App& app, Action& action);
void add_quantize_command(CLI::App& app, Action& action);
void add_eval_command(CLI::App& app, Action& action);
void add_convert_command(CLI::App& app, Action& action);
void add_calibrate_command(CLI::App& app, Action& action);
// `plan` and `stats merge` (docs/sensitivity.md).
void add_plan_command(CLI::App& app, Action& action);

// "71.2 MiB"
std::string human_bytes(uint64_t n);

}  // namespace nuq::cli
