#include <fmt/format.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.hpp"
#include "nuq/inspect.hpp"

namespace nuq::cli {

std::string human_bytes(uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = double(n);
  int u = 0;
  while (v >= 1024 && u < 4) v /= 1024, ++u;
  return u == 0 ? fmt::format("{} B", n) : fmt::format("{:.1f} {}", v, units[u]);
}

namespace {

std::string one_line(std::string s, std::size_t max_len) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  if (s.size() > max_len) s = s.substr(0, max_len - 3) + "...";
  return s;
}

void print_text(const InspectReport& r, bool show_metadata) {
  fmt::print("{}: {}, {}, {} tensors, {}\n", r.path, checkpoint_kind_name(r.kind), r.format_detail, r.tensors.size(),
             human_bytes(r.total_bytes));
  if (show_metadata && !r.metadata.empty()) {
    fmt::print("metadata ({} keys):\n", r.metadata.size());
    for (const auto& [k, v] : r.metadata) fmt::print("  {} = {}\n", k, one_line(v, 100));
  }
  std::size_t name_w = 4, dtype_w = 5, shape_w = 5;
  for (const auto& t : r.tensors) {
    name_w = std::max(name_w, t.name.size());
    dtype_w = std::max(dtype_w, t.dtype.size());
    shape_w = std::max(shape_w, to_string(t.shape).size());
  }
  const bool sharded = r.kind == CheckpointKind::safetensors_sharded;
  fmt::print("{:<{}}  {:<{}}  {:<{}}  {:>10}{}\n", "name", name_w, "dtype", dtype_w, "shape", shape_w, "bytes",
             sharded ? "  file" : "");
  for (const auto& t : r.tensors)
    fmt::print("{:<{}}  {:<{}}  {:<{}}  {:>10}{}{}\n", t.name, name_w, t.dtype, dtype_w, to_string(t.shape), shape_w,
               human_bytes(t.nbytes), sharded ? "  " : "", t.file);
  if (!r.packed_layers.empty()) {
    fmt::print("quantized layers ({}):\n", r.packed_layers.size());
    uint64_t bytes = 0;
    double weights = 0;
    for (const auto& l : r.packed_layers) {
      fmt::print("  {}  {} {}-bit  [{}, {}]  group {}  sparse {}  {:.3f} bits/weight\n", l.name, l.meta.method, l.meta.bits,
                 l.meta.rows, l.meta.cols, l.meta.group_size, l.meta.nnz, l.bits_per_weight);
      bytes += l.storage.total();
      weights += double(l.meta.rows) * double(l.meta.cols);
    }
    fmt::print("  all quantized layers: {:.3f} bits/weight\n", 8.0 * double(bytes) / weights);
  }
}

void print_json(const InspectReport& r) {
  nlohmann::json j;
  j["path"] = r.path;
  j["kind"] = checkpoint_kind_name(r.kind);
  j["format_detail"] = r.format_detail;
  j["total_bytes"] = r.total_bytes;
  j["metadata"] = nlohmann::json::object();
  for (const auto& [k, v] : r.metadata) j["metadata"][k] = v;
  j["tensors"] = nlohmann::json::array();
  for (const auto& t : r.tensors) {
    nlohmann::json tj = {{"name", t.name}, {"dtype", t.dtype}, {"shape", std::vector<int64_t>(t.shape.begin(), t.shape.end())},
                         {"bytes", t.nbytes}};
    if (!t.file.empty()) tj["file"] = t.file;
    j["tensors"].push_back(std::move(tj));
  }
  j["quantized_layers"] = nlohmann::json::array();
  for (const auto& l : r.packed_layers)
    j["quantized_layers"].push_back({{"name", l.name},
                                     {"bits", l.meta.bits},
                                     {"method", l.meta.method},
                                     {"rows", l.meta.rows},
                                     {"cols", l.meta.cols},
                                     {"group_size", l.meta.group_size},
                                     {"nnz", l.meta.nnz},
                                     {"bytes", l.storage.total()},
                                     {"bits_per_weight", l.bits_per_weight}});
  fmt::print("{}\n", j.dump(2));
}

}  // namespace

void add_inspect_command(CLI::App& app, Action& action) {
  struct Options {
    std::string path;
    bool json = false;
    bool metadata = true;
    bool check = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "inspect", "List the tensors, dtypes, shapes, bytes and quantization metadata of a checkpoint "
                 "(.safetensors file, sharded directory or index, or .gguf file)");
  cmd->add_option("path", opts->path, "checkpoint file or directory")->required();
  cmd->add_flag("--json", opts->json, "print a JSON document instead of a table");
  cmd->add_flag("!--no-metadata", opts->metadata, "do not print metadata key-values");
  cmd->add_flag("--check", opts->check, "decode and validate every quantized layer completely");
  cmd->callback([opts, &action] {
    action = [opts] {
      InspectReport report = inspect_checkpoint(opts->path, {opts->check});
      if (opts->json)
        print_json(report);
      else
        print_text(report, opts->metadata);
      return 0;
    };
  });
}

}  // namespace nuq::cli
