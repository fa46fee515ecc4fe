#include "nuq/tokenizer.hpp"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <optional>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "nuq/error.hpp"
#include "nuq/gguf.hpp"
#include "nuq/mapped_file.hpp"
#include "unicode_tables.hpp"

namespace nuq {
namespace {

using Json = nlohmann::json;

// ---- UTF-8 and Unicode classes -----------------------------------------------------------------------

// Decodes one code point at s[i], advancing i; invalid bytes decode as themselves (U+0080..U+00FF
// stand-ins are never produced: an invalid byte yields 0xFFFD) so that text is never dropped.
uint32_t next_codepoint(std::string_view s, std::size_t& i) {
  const auto b0 = uint8_t(s[i]);
  int len = b0 < 0x80 ? 1 : (b0 >> 5) == 6 ? 2 : (b0 >> 4) == 14 ? 3 : (b0 >> 3) == 30 ? 4 : 0;
  if (len == 0 || i + std::size_t(len) > s.size()) {
    ++i;
    return 0xFFFD;
  }
  uint32_t cp = len == 1 ? b0 : len == 2 ? (b0 & 0x1F) : len == 3 ? (b0 & 0x0F) : (b0 & 0x07);
  for (int k = 1; k < len; ++k) {
    const auto b = uint8_t(s[i + std::size_t(k)]);
    if ((b & 0xC0) != 0x80) {
      ++i;
      return 0xFFFD;
    }
    cp = (cp << 6) | (b & 0x3F);
  }
  i += std::size_t(len);
  return cp;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

template <std::size_t N>
bool in_ranges(const detail::CodepointRange (&table)[N], uint32_t cp) {
  const auto* it = std::upper_bound(std::begin(table), std::end(table), cp,
                                    [](uint32_t v, const detail::CodepointRange& r) { return v < r.first; });
  return it != std::begin(table) && cp <= (it - 1)->last;
}

bool is_letter(uint32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return in_ranges(detail::kLetterRanges, cp);
}
bool is_number(uint32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return in_ranges(detail::kNumberRanges, cp);
}
// Unicode White_Space, which \s matches in the regex engines the reference tokenizers use.
bool is_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

// ---- GPT-2 pre-tokenization ----------------------------------------------------------------------------
// The pattern 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ matched by hand:
// alternatives are tried in order at each position, as a backtracking regex engine does.
void gpt2_split(const std::vector<uint32_t>& cp, std::size_t begin, std::size_t end,
                std::vector<std::pair<std::size_t, std::size_t>>& out) {
  std::size_t i = begin;
  auto run = [&](std::size_t j, auto pred) {
    while (j < end && pred(cp[j])) ++j;
    return j;
  };
  auto other = [](uint32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); };
  while (i < end) {
    std::size_t j = i;
    if (cp[i] == '\'' && i + 1 < end) {
      const uint32_t a = cp[i + 1], b = i + 2 < end ? cp[i + 2] : 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') j = i + 2;
      else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) j = i + 3;
    }
    if (j == i) {
      const std::size_t s = cp[i] == ' ' && i + 1 < end ? i + 1 : i;
      if (is_letter(cp[s])) j = run(s, is_letter);
      else if (is_number(cp[s])) j = run(s, is_number);
      else if (other(cp[s])) j = run(s, other);
    }
    if (j == i) {
      const std::size_t e = run(i, is_space);  // cp[i] is whitespace here
      j = (e == end || e - i == 1) ? e : e - 1;
    }
    out.emplace_back(i, j);
    i = j;
  }
}

// GPT-2's reversible map from bytes to printable code points, so byte strings can live in a text vocabulary.
struct ByteLevelMap {
  uint32_t to_cp[256];
  std::unordered_map<uint32_t, uint8_t> to_byte;
  ByteLevelMap() {
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cp[b] = printable ? b : next++;
      to_byte[to_cp[b]] = uint8_t(b);
    }
  }
};
const ByteLevelMap& byte_level() {
  static const ByteLevelMap m;
  return m;
}

// ---- merge loops shared by both BPE flavours ------------------------------------------------------------
// Symbols form a linked list; candidate merges sit in a heap ordered by priority, then by position, and
// are checked for staleness when popped. This is the greedy "best pair first, leftmost on ties" rule of
// the reference implementations in O(n log n) instead of their O(n²) rescans.
struct Symbol {
  std::string text;
  int prev, next;
  bool alive = true;
};

template <class PriorityFn>  // PriorityFn(left, right) -> optional priority (lower is better)
void merge_symbols(std::vector<Symbol>& sym, PriorityFn priority) {
  struct Cand {
    double pri;
    int left;
    std::size_t left_len, right_len;
    bool operator<(const Cand& o) const { return pri != o.pri ? pri > o.pri : left > o.left; }
  };
  std::priority_queue<Cand> heap;
  auto push = [&](int l) {
    if (l < 0) return;
    const int r = sym[std::size_t(l)].next;
    if (r < 0) return;
    if (auto p = priority(sym[std::size_t(l)].text, sym[std::size_t(r)].text))
      heap.push({*p, l, sym[std::size_t(l)].text.size(), sym[std::size_t(r)].text.size()});
  };
  for (int i = 0; i + 1 < int(sym.size()); ++i) push(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Symbol& l = sym[std::size_t(c.left)];
    if (!l.alive || l.next < 0) continue;
    Symbol& r = sym[std::size_t(l.next)];
    if (l.text.size() != c.left_len || r.text.size() != c.right_len) continue;  // stale
    l.text += r.text;
    r.alive = false;
    l.next = r.next;
    if (r.next >= 0) sym[std::size_t(r.next)].prev = c.left;
    push(l.prev);
    push(c.left);
  }
}

// ---- llama2.c sentencepiece-style BPE -------------------------------------------------------------------

class Llama2cTokenizer : public Tokenizer {
 public:
  explicit Llama2cTokenizer(const std::string& path) {
    MappedFile f(path);
    const std::byte* p = f.data();
    const std::byte* end = p + f.size();
    auto read = [&](void* dst, std::size_t n) {
      NUQ_CHECK(std::size_t(end - p) >= n, Errc::invalid_file, "{}: truncated after {} tokens", path, pieces_.size());
      std::memcpy(dst, p, n);
      p += n;
    };
    int32_t max_len = 0;
    read(&max_len, 4);
    NUQ_CHECK(max_len > 0 && max_len < 1 << 16, Errc::invalid_file, "{}: implausible max token length {}", path, max_len);
    while (p < end) {
      float score;
      int32_t len;
      read(&score, 4);
      read(&len, 4);
      NUQ_CHECK(len >= 0 && len <= max_len, Errc::invalid_file, "{}: token {} has length {} (max {})", path,
                pieces_.size(), len, max_len);
      std::string s(std::size_t(len), '\0');
      read(s.data(), std::size_t(len));
      ids_.emplace(s, int32_t(pieces_.size()));
      pieces_.push_back(std::move(s));
      scores_.push_back(score);
    }
    NUQ_CHECK(pieces_.size() > 258, Errc::invalid_file, "{}: {} tokens; a llama2.c vocabulary starts with <unk>, BOS, EOS "
              "and 256 byte tokens", path, pieces_.size());
    vocab_size_ = int64_t(pieces_.size());
    bos_ = 1;
    eos_ = 2;
    description_ = fmt::format("llama2.c BPE, {} tokens", vocab_size_);
  }

  std::vector<int32_t> encode(std::string_view text) const override {
    if (text.empty()) return {};
    // sentencepiece's dummy prefix, then one symbol per code point (or per byte when unknown).
    std::string input = " ";
    input += text;
    std::vector<Symbol> sym;
    for (std::size_t i = 0; i < input.size();) {
      const std::size_t start = i;
      next_codepoint(input, i);
      std::string piece(input.substr(start, i - start));
      if (ids_.count(piece)) {
        sym.push_back({piece, int(sym.size()) - 1, int(sym.size()) + 1});
      } else {
        // Byte fallback under the byte tokens' own names ("<0xE2>"), which, as in llama2.c, never merge.
        for (char ch : piece)
          sym.push_back({fmt::format("<0x{:02X}>", uint8_t(ch)), int(sym.size()) - 1, int(sym.size()) + 1});
      }
    }
    sym.back().next = -1;
    merge_symbols(sym, [&](const std::string& a, const std::string& b) -> std::optional<double> {
      auto it = ids_.find(a + b);
      if (it == ids_.end()) return std::nullopt;
      return -double(scores_[std::size_t(it->second)]);
    });
    std::vector<int32_t> out;
    for (const Symbol& s : sym) {
      if (!s.alive) continue;
      auto it = ids_.find(s.text);
      NUQ_CHECK(it != ids_.end(), Errc::invalid_file, "llama2.c tokenizer: no token for '{}'", s.text);
      out.push_back(it->second);
    }
    return out;
  }

  std::string decode(int32_t id) const override {
    NUQ_CHECK(id >= 0 && id < vocab_size_, Errc::invalid_argument, "token {} is outside the vocabulary of {}", id,
              vocab_size_);
    const std::string& p = pieces_[std::size_t(id)];
    unsigned byte;
    if (p.size() == 6 && std::sscanf(p.c_str(), "<0x%02X>", &byte) == 1) return std::string(1, char(byte));
    return p;
  }

 private:
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int32_t> ids_;
};

// ---- byte-level BPE -------------------------------------------------------------------------------------

class ByteLevelBpe : public Tokenizer {
 public:
  // `split_digits`: every number character is its own pre-token before the GPT-2 pattern applies
  // (the "smollm"/StarCoder pre-tokenizer).
  ByteLevelBpe(std::vector<std::string> tokens, const std::vector<std::string>& merges, bool split_digits,
               std::string source)
      : tokens_(std::move(tokens)), split_digits_(split_digits) {
    for (std::size_t i = 0; i < tokens_.size(); ++i) ids_.emplace(tokens_[i], int32_t(i));
    for (std::size_t r = 0; r < merges.size(); ++r) {
      const std::size_t sp = merges[r].find(' ');
      NUQ_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < merges[r].size(), Errc::invalid_file,
                "{}: merge {} '{}' is not two symbols separated by a space", source, r, merges[r]);
      ranks_.emplace(merges[r], int32_t(r));
    }
    vocab_size_ = int64_t(tokens_.size());
  }

  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<uint32_t> cp;
    std::vector<std::size_t> byte_at;  // byte offset of each code point, plus the end
    for (std::size_t i = 0; i < text.size();) {
      byte_at.push_back(i);
      cp.push_back(next_codepoint(text, i));
    }
    byte_at.push_back(text.size());
    std::vector<std::pair<std::size_t, std::size_t>> words;
    std::size_t seg = 0;
    for (std::size_t i = 0; i <= cp.size(); ++i) {
      const bool digit = i < cp.size() && split_digits_ && is_number(cp[i]);
      if (i == cp.size() || digit) {
        if (seg < i) gpt2_split(cp, seg, i, words);
        if (digit) words.emplace_back(i, i + 1);
        seg = i + 1;
      }
    }
    std::vector<int32_t> out;
    for (auto [b, e] : words) encode_word(text.substr(byte_at[b], byte_at[e] - byte_at[b]), out);
    return out;
  }

  std::string decode(int32_t id) const override {
    NUQ_CHECK(id >= 0 && id < vocab_size_, Errc::invalid_argument, "token {} is outside the vocabulary of {}", id,
              vocab_size_);
    std::string out;
    const std::string& t = tokens_[std::size_t(id)];
    for (std::size_t i = 0; i < t.size();) {
      const uint32_t c = next_codepoint(t, i);
      auto it = byte_level().to_byte.find(c);
      if (it != byte_level().to_byte.end()) out += char(it->second);
      else append_utf8(out, c);  // special tokens are plain text
    }
    return out;
  }

  void set_special(int32_t bos, int32_t eos, std::string description) {
    bos_ = bos;
    eos_ = eos;
    description_ = std::move(description);
  }
  int32_t find(const std::string& token) const {
    auto it = ids_.find(token);
    return it == ids_.end() ? -1 : it->second;
  }

 private:
  void encode_word(std::string_view word, std::vector<int32_t>& out) const {
    auto cached = cache_.find(std::string(word));
    if (cached != cache_.end()) {
      out.insert(out.end(), cached->second.begin(), cached->second.end());
      return;
    }
    std::vector<Symbol> sym;
    for (char ch : word) {
      std::string s;
      append_utf8(s, byte_level().to_cp[uint8_t(ch)]);
      sym.push_back({std::move(s), int(sym.size()) - 1, int(sym.size()) + 1});
    }
    if (sym.empty()) return;
    sym.back().next = -1;
    merge_symbols(sym, [&](const std::string& a, const std::string& b) -> std::optional<double> {
      auto it = ranks_.find(a + " " + b);
      if (it == ranks_.end()) return std::nullopt;
      return double(it->second);
    });
    std::vector<int32_t> ids;
    for (const Symbol& s : sym) {
      if (!s.alive) continue;
      auto it = ids_.find(s.text);
      NUQ_CHECK(it != ids_.end(), Errc::invalid_file, "byte-level BPE: symbol '{}' is not in the vocabulary", s.text);
      ids.push_back(it->second);
    }
    out.insert(out.end(), ids.begin(), ids.end());
    if (cache_.size() < 1'000'000) cache_.emplace(std::string(word), std::move(ids));
  }

  std::vector<std::string> tokens_;
  std::unordered_map<std::string, int32_t> ids_;
  std::unordered_map<std::string, int32_t> ranks_;
  bool split_digits_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;  // words repeat a lot in text
};

std::vector<std::string> gguf_strings(const GgufFile& f, const char* key) {
  const GgufValue* v = f.find_value(key);
  NUQ_CHECK(v, Errc::invalid_file, "{}: no '{}' in the metadata", f.path(), key);
  std::vector<std::string> out;
  for (const GgufValue& e : v->as_array()) out.push_back(e.as_string());
  return out;
}

bool pre_tokenizer_splits_digits(const std::string& pre, const std::string& source) {
  if (pre == "smollm" || pre == "starcoder" || pre == "refact") return true;
  if (pre == "gpt2" || pre == "default" || pre.empty()) return false;
  fail(Errc::unsupported, "{}: pre-tokenizer '{}' is not supported (supported: gpt2, smollm, starcoder)", source, pre);
}

std::unique_ptr<Tokenizer> load_gguf(const std::string& path) {
  GgufFile f(path);
  const GgufValue* model = f.find_value("tokenizer.ggml.model");
  NUQ_CHECK(model, Errc::invalid_file, "{}: no tokenizer in the GGUF metadata (tokenizer.ggml.model)", path);
  NUQ_CHECK(model->as_string() == "gpt2", Errc::unsupported,
            "{}: tokenizer model '{}' is not supported (byte-level BPE 'gpt2' is)", path, model->as_string());
  const GgufValue* pre = f.find_value("tokenizer.ggml.pre");
  const std::string pre_name = pre ? pre->as_string() : "";
  auto tok = std::make_unique<ByteLevelBpe>(gguf_strings(f, "tokenizer.ggml.tokens"),
                                            gguf_strings(f, "tokenizer.ggml.merges"),
                                            pre_tokenizer_splits_digits(pre_name, path), path);
  auto id = [&](const char* key, int32_t fallback) {
    const GgufValue* v = f.find_value(key);
    return v ? int32_t(v->as_int()) : fallback;
  };
  const GgufValue* add_bos = f.find_value("tokenizer.ggml.add_bos_token");
  int32_t bos = id("tokenizer.ggml.bos_token_id", 1);
  if (add_bos && !add_bos->as_bool()) {
    const int32_t eot = tok->find("<|endoftext|>");
    if (eot >= 0) bos = eot;
  }
  tok->set_special(bos, id("tokenizer.ggml.eos_token_id", 2),
                   fmt::format("byte-level BPE ({} pre-tokenizer), {} tokens", pre_name.empty() ? "gpt2" : pre_name,
                               tok->vocab_size()));
  return tok;
}

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  NUQ_CHECK(in, Errc::io, "{}: cannot open: {}", path, std::strerror(errno));
  const Json j = Json::parse(in, nullptr, false);
  NUQ_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(), Errc::invalid_file,
            "{}: not a tokenizer.json (no \"model\" object)", path);
  const Json& model = j["model"];
  NUQ_CHECK(model.value("type", "") == "BPE" && model.contains("vocab") && model.contains("merges"), Errc::unsupported,
            "{}: only BPE tokenizer.json files are supported", path);
  // The pre-tokenizer must be byte-level, optionally preceded by individual-digit splitting.
  bool byte_level_seen = false, digits = false;
  std::function<void(const Json&)> scan = [&](const Json& p) {
    if (!p.is_object()) return;
    const std::string type = p.value("type", "");
    if (type == "Sequence")
      for (const Json& q : p.value("pretokenizers", Json::array())) scan(q);
    else if (type == "ByteLevel") byte_level_seen = true;
    else if (type == "Digits" && p.value("individual_digits", false)) digits = true;
    else fail(Errc::unsupported, "{}: pre-tokenizer '{}' is not supported (ByteLevel, Digits)", path, type);
  };
  scan(j.value("pre_tokenizer", Json()));
  NUQ_CHECK(byte_level_seen, Errc::unsupported, "{}: only byte-level BPE tokenizers are supported", path);
  std::vector<std::string> tokens(model["vocab"].size());
  for (const auto& [piece, id] : model["vocab"].items()) {
    NUQ_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<std::size_t>() < tokens.size(),
              Errc::invalid_file, "{}: vocabulary id of '{}' is out of range", path, piece);
    tokens[id.get<std::size_t>()] = piece;
  }
  std::vector<std::string> merges;
  for (const Json& m : model["merges"])
    merges.push_back(m.is_string() ? m.get<std::string>() : m.at(0).get<std::string>() + " " + m.at(1).get<std::string>());
  auto tok = std::make_unique<ByteLevelBpe>(std::move(tokens), merges, digits, path);
  int32_t eot = tok->find("<|endoftext|>");
  tok->set_special(eot >= 0 ? eot : 0, eot >= 0 ? eot : 0,
                   fmt::format("byte-level BPE{}, {} tokens", digits ? " (digits split)" : "", tok->vocab_size()));
  return tok;
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& path) {
  {
    MappedFile probe(path);
    if (probe.size() >= 4 && std::memcmp(probe.data(), "GGUF", 4) == 0) return load_gguf(path);
    if (probe.size() >= 1 && char(probe.data()[0]) == '{') return load_tokenizer_json(path);
  }
  return std::make_unique<Llama2cTokenizer>(path);
}

}  // namespace nuq
