#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "commands.hpp"
#include "nuq/error.hpp"

namespace nuq::cli {

// `nuq bench <area> [benchmark flags...]` runs the Google Benchmark binary nuq_bench_<area> installed
// next to this executable, so that every bench is reachable from one tool without linking them all in.
void add_bench_command(CLI::App& app, Action& action) {
  struct Options {
    std::string area;
    std::vector<std::string> args;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("bench", "Run the benchmark binary nuq_bench_<area> (e.g. `nuq bench convert "
                                              "--benchmark_format=json`)");
  cmd->add_option("area", opts->area, "benchmark area (convert, ...)")->required();
  cmd->add_option("args", opts->args, "arguments passed to the benchmark binary");
  cmd->prefix_command();  // everything after the area goes to the benchmark unparsed
  cmd->callback([opts, cmd, &action] {
    for (const std::string& extra : cmd->remaining()) opts->args.push_back(extra);
    action = [opts]() -> int {
      namespace fs = std::filesystem;
      std::error_code ec;
      const fs::path self = fs::read_symlink("/proc/self/exe", ec);
      NUQ_CHECK(!ec, Errc::io, "bench: cannot locate the nuq executable: {}", ec.message());
      const fs::path binary = self.parent_path() / ("nuq_bench_" + opts->area);
      NUQ_CHECK(fs::exists(binary), Errc::invalid_argument, "bench: no benchmark '{}' ({} does not exist)", opts->area,
                binary.string());
      std::vector<std::string> argv_storage{binary.string()};
      argv_storage.insert(argv_storage.end(), opts->args.begin(), opts->args.end());
      std::vector<char*> argv;
      for (auto& a : argv_storage) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(binary.c_str(), argv.data());
      fail(Errc::io, "bench: cannot run {}", binary.string());
    };
  });
}

}  // namespace nuq::cli
