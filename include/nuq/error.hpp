// nuq's single error type. Every failure that reaches a user carries a message naming what is at
// fault (file, tensor, shape or value), so callers never need to guess from an error code alone.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

namespace nuq {

// Coarse category, so that bindings and launchers can map errors to exceptions or status codes
// without parsing messages.
enum class Errc {
  invalid_argument,  // a caller passed something inconsistent (shape, dtype, option)
  invalid_file,      // a file's content violates its format (truncated, bad header, overlaps...)
  io,                // the operating system refused (open, mmap, write, rename, disk full)
  unsupported,       // valid input nuq does not handle (an unknown dtype, a GGUF type we do not decode)
  internal,          // a broken invariant inside nuq: a bug
};

const char* errc_name(Errc code) noexcept;

class Error : public std::runtime_error {
 public:
  Error(Errc code, std::string message) : std::runtime_error(std::move(message)), code_(code) {}
  Errc code() const noexcept { return code_; }

 private:
  Errc code_;
};

// Who is calling, so that messages name an option the way the caller spelled it: `--skip-tokens` on
// the command line, `skip_tokens` from Python (a flag: `--force` there, `force=True` here).
enum class ArgStyle { cli, python };

// The option's name in `style`: arg_name(style, "--sparse", "outlier_fraction").
inline std::string arg_name(ArgStyle style, std::string_view cli, std::string_view python) {
  return std::string(style == ArgStyle::cli ? cli : python);
}
// A boolean flag as the caller turns it on: "--force" / "force=True".
inline std::string flag_name(ArgStyle style, std::string_view cli, std::string_view python) {
  return style == ArgStyle::cli ? std::string(cli) : std::string(python) + "=True";
}

template <class... Args>
[[noreturn]] void fail(Errc code, fmt::format_string<Args...> format, Args&&... args) {
  throw Error(code, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace nuq

// Checks an invariant that depends on input; the message should say which input and why.
#define NUQ_CHECK(cond, code, ...)             \
  do {                                         \
    if (!(cond)) ::nuq::fail(code, __VA_ARGS__); \
  } while (0)
