// Argument parsing shared by the subcommands (declared in commands.hpp).
#include <cctype>
#include <cmath>
#include <string>
#include <utility>

#include "commands.hpp"
#include "nuq/error.hpp"

namespace nuq::cli {

double parse_number(const std::string& text) {
  std::size_t used = 0;
  double v = NAN;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    return NAN;
  }
  return used == text.size() && std::isfinite(v) ? v : NAN;
}

double parse_percent(std::string text, std::string_view flag) {
  if (!text.empty() && text.back() == '%') text.pop_back();
  const double v = parse_number(text);
  NUQ_CHECK(v >= 0 && v < 100, Errc::invalid_argument, "{} takes percentages in [0, 100), e.g. 0.45%, not '{}'", flag,
            text);
  return v / 100.0;
}

std::optional<uint64_t> parse_size(std::string text) {
  std::string unit;
  while (!text.empty() && std::isalpha(static_cast<unsigned char>(text.back()))) {
    unit.insert(unit.begin(), char(std::tolower(static_cast<unsigned char>(text.back()))));
    text.pop_back();
  }
  double scale = 0;
  for (auto [name, s] : {std::pair{"", 1.0}, {"b", 1.0}, {"kb", 1e3}, {"mb", 1e6}, {"gb", 1e9}, {"tb", 1e12},
                         {"k", 1e3}, {"m", 1e6}, {"g", 1e9}, {"kib", 1024.0}, {"mib", 1048576.0},
                         {"gib", 1073741824.0}, {"tib", 1099511627776.0}})
    if (unit == name) scale = s;
  const double v = parse_number(text);
  if (!(scale > 0 && v * scale >= 1 && v * scale < 1.8e19)) return std::nullopt;
  return uint64_t(v * scale);
}

}  // namespace nuq::cli
