#include "nuq/error.hpp"

namespace nuq {

const char* errc_name(Errc code) noexcept {
  switch (code) {
    case Errc::invalid_argument: return "invalid argument";
    case Errc::invalid_file: return "invalid file";
    case Errc::io: return "I/O error";
    case Errc::unsupported: return "unsupported";
    case Errc::internal: return "internal error";
  }
  return "error";
}

}  // namespace nuq
