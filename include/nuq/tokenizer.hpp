// Tokenizers for the models the decoder runs (include/nuq/llama.hpp): llama2.c's sentencepiece-style
// BPE (tokenizer.bin) and byte-level BPE (GPT-2 style, as SmolLM2 uses) from GGUF metadata or a Hugging
// Face tokenizer.json. Encoding matches the reference implementations on ordinary text; special-token
// strings inside the text are not recognised (evaluation text never holds them).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace nuq {

class Tokenizer {
 public:
  // `path` is a llama2.c tokenizer .bin, a .gguf file holding tokenizer.ggml.* metadata, or a
  // tokenizer.json. Throws nuq::Error naming the file and the problem (unknown tokenizer model or
  // pre-tokenizer, malformed tables).
  static std::unique_ptr<Tokenizer> load(const std::string& path);
  virtual ~Tokenizer() = default;

  // Token ids of `text`, without BOS. llama2.c-style tokenizers prepend a space (sentencepiece's
  // dummy prefix), as llama2.c's encoder does.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // The bytes token `id` stands for (byte tokens decoded to their byte).
  virtual std::string decode(int32_t id) const = 0;

  int64_t vocab_size() const noexcept { return vocab_size_; }
  // The token that starts a sequence: BOS, or for GPT-2-style vocabularies that do not add one, the
  // end-of-text token that separates documents in training (as lm-evaluation-harness does).
  int32_t bos() const noexcept { return bos_; }
  int32_t eos() const noexcept { return eos_; }
  const std::string& description() const noexcept { return description_; }

 protected:
  int64_t vocab_size_ = 0;
  int32_t bos_ = 1, eos_ = 2;
  std::string description_;
};

}  // namespace nuq
