#include <csignal>
#include <cstdio>
#include <exception>

#include "commands.hpp"
#include "nuq/error.hpp"
#include "nuq/format.hpp"
#include "nuq/version.hpp"

int main(int argc, char** argv) {
  CLI::App app{"nuq: post-training quantization of large language models"};
  app.set_version_flag("--version", std::string("nuq ") + NUQ_VERSION_STRING + " (packed format v" +
                                        std::to_string(nuq::format::kVersion) + ")");
  app.require_subcommand(1);
  nuq::cli::Action action;
  nuq::cli::add_inspect_command(app, action);
  nuq::cli::add_bench_command(app, action);
  nuq::cli::add_quantize_command(app, action);
  nuq::cli::add_eval_command(app, action);
  nuq::cli::add_convert_command(app, action);
  nuq::cli::add_calibrate_command(app, action);
  nuq::cli::add_fisher_command(app, action);
  nuq::cli::add_tune_command(app, action);
  nuq::cli::add_plan_command(app, action);
  nuq::cli::add_kv_calibrate_command(app, action);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  // Past a file-size limit (ulimit -f) the kernel would kill the process with SIGXFSZ; ignored, the write
  // fails with EFBIG instead and the user gets the same clean error as for a full disk.
  std::signal(SIGXFSZ, SIG_IGN);
  try {
    return action ? action() : 2;
  } catch (const nuq::Error& e) {
    std::fprintf(stderr, "nuq: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nuq: internal error: %s\n", e.what());
    return 3;
  }
}
