// The logits of a token sequence fed to a decoder in steps of the given lengths (cycled), as generation
// (short steps) or a prefill (one long step) would feed it: the decoder tests compare paths with it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "nuq/llama.hpp"

namespace nuq::testing {

inline std::vector<float> logits_of(const LlamaModel& model, const std::vector<int32_t>& tokens,
                                    const std::vector<int64_t>& steps) {
  const auto& c = model.config();
  const int64_t n = int64_t(tokens.size());
  auto cache = model.new_cache(n);
  std::vector<float> hidden(size_t(n * c.dim)), out(size_t(n * c.vocab_size));
  for (int64_t i = 0, s = 0; i < n; s = (s + 1) % int64_t(steps.size())) {
    const int64_t m = std::min(steps[size_t(s)], n - i);
    model.forward(tokens.data() + i, m, *cache, hidden.data() + i * c.dim);
    i += m;
  }
  model.logits(hidden.data(), n, out.data());
  return out;
}

}  // namespace nuq::testing
