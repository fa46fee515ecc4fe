// The paged quantized KV cache of one layer: RoPE tables, token quantization (keys per channel, values
// per token, fixed outlier slots, fp16 sink) and the page bookkeeping. docs/kv-cache.md has the layout.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "cpu/thread_pool.hpp"
#include "kv_internal.hpp"
#include "nuq/error.hpp"
#include "nuq/half.hpp"

namespace nuq::kv {
namespace detail {

std::vector<double> rope_frequencies(const Rope& rope, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  double theta = rope.theta;
  // NTK-aware scaling changes the base so that the lowest frequency stretches by `factor` while the
  // highest stays put: theta' = theta * factor^(d / (d - 2)).
  if (rope.scaling == RopeScaling::ntk) theta *= std::pow(rope.factor, double(head_dim) / double(head_dim - 2));
  std::vector<double> f(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    f[size_t(i)] = std::pow(theta, -double(2 * i) / double(head_dim));
    if (rope.scaling == RopeScaling::linear) f[size_t(i)] /= rope.factor;
  }
  return f;
}

RopeTable::RopeTable(const Rope& rope, int64_t head_dim, int64_t chunk)
    : half_(head_dim / 2), chunk_(chunk), freq_(rope_frequencies(rope, head_dim)) {
  step_c_.resize(size_t(chunk * half_));
  step_s_.resize(size_t(chunk * half_));
  for (int64_t t = 0; t < chunk; ++t)
    for (int64_t i = 0; i < half_; ++i) {
      const double a = double(t) * freq_[size_t(i)];
      step_c_[size_t(t * half_ + i)] = std::cos(a);
      step_s_[size_t(t * half_ + i)] = std::sin(a);
    }
  const int64_t hp = padded_half();
  step_cf_.assign(size_t(chunk * hp), 0.0f);
  step_sf_.assign(size_t(chunk * hp), 0.0f);
  for (int64_t t = 0; t < chunk; ++t)
    for (int64_t i = 0; i < half_; ++i) {
      step_cf_[size_t(t * hp + i)] = float(step_c_[size_t(t * half_ + i)]);
      step_sf_[size_t(t * hp + i)] = float(step_s_[size_t(t * half_ + i)]);
    }
  const int64_t ts = step_stride();
  step_cft_.assign(size_t(hp * ts), 0.0f);
  step_sft_.assign(size_t(hp * ts), 0.0f);
  for (int64_t t = 0; t < chunk; ++t)
    for (int64_t i = 0; i < half_; ++i) {
      step_cft_[size_t(i * ts + t)] = step_cf_[size_t(t * hp + i)];
      step_sft_[size_t(i * ts + t)] = step_sf_[size_t(t * hp + i)];
    }
  jump_c_.resize(size_t(half_));
  jump_s_.resize(size_t(half_));
  for (int64_t i = 0; i < half_; ++i) {
    jump_c_[size_t(i)] = std::cos(double(chunk) * freq_[size_t(i)]);
    jump_s_[size_t(i)] = std::sin(double(chunk) * freq_[size_t(i)]);
  }
}

void RopeTable::base(int64_t pos0, double* bc, double* bs) const {
  for (int64_t i = 0; i < half_; ++i) {
    // pos0 * f rounded to double loses up to half an ulp of the angle (1e-7 rad at 1e9); the rounding
    // error, recovered exactly by an FMA, is folded back in to first order.
    const double f = freq_[size_t(i)];
    const double hi = double(pos0) * f;
    const double lo = std::fma(double(pos0), f, -hi);
    const double ch = std::cos(hi), sh = std::sin(hi);
    bc[i] = ch - lo * sh;
    bs[i] = sh + lo * ch;
  }
}

void RopeTable::advance(double* bc, double* bs) const {
  for (int64_t i = 0; i < half_; ++i) {
    const double c = bc[i] * jump_c_[size_t(i)] - bs[i] * jump_s_[size_t(i)];
    bs[i] = bs[i] * jump_c_[size_t(i)] + bc[i] * jump_s_[size_t(i)];
    bc[i] = c;
  }
}

void RopeTable::fill(int64_t pos0, int64_t n, float* cos_out, float* sin_out) const {
  std::vector<double> bcv(static_cast<size_t>(half_)), bsv(static_cast<size_t>(half_));
  base(pos0, bcv.data(), bsv.data());
  for (int64_t i = 0; i < half_; ++i) {
    const double bc = bcv[size_t(i)], bs = bsv[size_t(i)];
    for (int64_t t = 0; t < n; ++t) {
      const double c = step_c_[size_t(t * half_ + i)], s = step_s_[size_t(t * half_ + i)];
      cos_out[t * half_ + i] = float(bc * c - bs * s);
      sin_out[t * half_ + i] = float(bs * c + bc * s);
    }
  }
}

std::vector<int> key_storage_order(RopeLayout layout, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  std::vector<int> storage(static_cast<size_t>(head_dim));
  for (int64_t i = 0; i < half; ++i) {
    int64_t a, b;
    pair_channels(layout, half, i, a, b);
    const int64_t blk = i / 8, r = i % 8;
    storage[size_t(16 * blk + r)] = int(a);
    storage[size_t(16 * blk + 8 + r)] = int(b);
  }
  return storage;
}

void select_outliers(const float* x, int64_t n, float center, int slots, int* out) {
  // slots is a handful (ceil(1% of 128) = 2), so repeated maximum search beats sorting.
  std::vector<char> taken(size_t(n), 0);
  for (int s = 0; s < slots; ++s) {
    int64_t best = -1;
    float best_d = -1;
    for (int64_t i = 0; i < n; ++i) {
      const float d = std::fabs(x[i] - center);
      if (!taken[size_t(i)] && d > best_d) best_d = d, best = i;
    }
    taken[size_t(best)] = 1;
    out[s] = int(best);
  }
  std::sort(out, out + slots);
}

int nearest_entry(const float* codebook, int k, float x) {
  int best = 0;
  float best_d = std::fabs(x - codebook[0]);
  for (int j = 1; j < k; ++j) {
    const float d = std::fabs(x - codebook[j]);
    if (d < best_d) best_d = d, best = j;
  }
  return best;
}

void value_normalization(const float* v, int64_t n, const bool* outlier, uint16_t& scale16, uint16_t& offset16) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int64_t i = 0; i < n; ++i)
    if (!outlier[i]) lo = std::min(lo, v[i]), hi = std::max(hi, v[i]);
  if (!(lo <= hi)) lo = hi = 0;  // every channel an outlier: nothing left to normalize
  offset16 = float_to_fp16(0.5f * (lo + hi));
  float scale = fp16_to_float(float_to_fp16(0.5f * (hi - lo)));
  // A constant vector (or a range below fp16's resolution) still needs a usable divisor.
  if (!(scale > 0) || !std::isfinite(scale)) scale = 1.0f;
  scale16 = float_to_fp16(scale);
}

namespace {

// Bit position of bit b of channel c's index inside an index block (docs/kv-cache.md, "Index packing"):
// groups of 16 channels take 2·bits bytes each; channels r and r + 8 of a group (a RoPE pair of the key
// storage order) form one 2·bits-bit field, field r at bit 2·bits·r, channel r in its low half. A GPU
// warp gets a pair's index for a table of pairs with one shift and one mask.
int64_t bit_position(int bits, int64_t c, int b) {
  const int64_t base = c / 16 * 16 * bits, r = c % 8, half = c % 16 / 8;
  return base + 2 * bits * r + bits * half + b;
}

void pack_bits(const uint8_t* idx, int64_t n, int bits, uint8_t* out) {
  std::memset(out, 0, size_t(n * bits / 8));
  for (int64_t c = 0; c < n; ++c)
    for (int b = 0; b < bits; ++b)
      if (idx[c] >> b & 1) {
        const int64_t bit = bit_position(bits, c, b);
        out[bit / 8] = uint8_t(out[bit / 8] | (1u << (bit % 8)));
      }
}

int unpack_bits(const uint8_t* in, int64_t c, int bits) {
  int v = 0;
  for (int b = 0; b < bits; ++b) {
    const int64_t bit = bit_position(bits, c, b);
    v |= ((in[bit / 8] >> (bit % 8)) & 1) << b;
  }
  return v;
}

void store_fp16(uint8_t* p, float x) {
  const uint16_t h = float_to_fp16(x);
  std::memcpy(p, &h, 2);
}
float load_fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_float(h);
}

}  // namespace
}  // namespace detail

void rope_cos_sin(const Rope& rope, int64_t head_dim, int64_t pos0, int64_t n, float* cos_out, float* sin_out) {
  NUQ_CHECK(head_dim > 0 && head_dim % 2 == 0, Errc::invalid_argument, "rope: head_dim {} must be even and positive",
            head_dim);
  NUQ_CHECK(pos0 >= 0 && n >= 0, Errc::invalid_argument, "rope: negative position {} or count {}", pos0, n);
  NUQ_CHECK(rope.theta > 1 && std::isfinite(rope.theta), Errc::invalid_argument, "rope: theta {} must exceed 1",
            rope.theta);
  NUQ_CHECK(rope.factor > 0 && std::isfinite(rope.factor), Errc::invalid_argument,
            "rope: scaling factor {} must be positive", rope.factor);
  const int64_t chunk = 32, half = head_dim / 2;
  const detail::RopeTable table(rope, head_dim, chunk);
  for (int64_t t = 0; t < n; t += chunk)
    table.fill(pos0 + t, std::min(chunk, n - t), cos_out + t * half, sin_out + t * half);
}

int Calibration::outlier_slots(int64_t head_dim) const {
  return int(std::ceil(outlier_fraction * double(head_dim) - 1e-9));
}

TokenLayout token_layout(int64_t head_dim, int bits_k, int bits_v, int slots) {
  TokenLayout l;
  l.head_dim = head_dim;
  l.bits_k = bits_k;
  l.bits_v = bits_v;
  l.slots = slots;
  l.k_index_bytes = head_dim * bits_k / 8;
  l.v_index_bytes = head_dim * bits_v / 8;
  l.k_bytes = l.k_index_bytes + 3 * slots;
  l.v_bytes = 4 + l.v_index_bytes + 3 * slots;
  return l;
}

const LayerCache::Impl::Seq& LayerCache::Impl::seq(int id) const {
  NUQ_CHECK(id >= 0 && size_t(id) < seqs.size() && seqs[size_t(id)].live, Errc::invalid_argument,
            "KV cache: sequence {} does not exist", id);
  return seqs[size_t(id)];
}

void LayerCache::Impl::dequantize_token(const Seq& s, int64_t h, int64_t t, float* k, float* v) const {
  if (t < sink) {
    for (int64_t p = 0; p < hd; ++p) {
      k[storage[size_t(p)]] = fp16_to_float(s.sink_k[size_t((t * n_kv + h) * hd + p)]);
      v[p] = fp16_to_float(s.sink_v[size_t((t * n_kv + h) * hd + p)]);
    }
    return;
  }
  decode_records(h, k_record(s, h, t), v_record(s, h, t), k, v);
}

void LayerCache::Impl::decode_records(int64_t h, const uint8_t* kr, const uint8_t* vr, float* k, float* v) const {
  std::vector<float> ks(static_cast<size_t>(hd));
  for (int64_t p = 0; p < hd; ++p)
    ks[size_t(p)] = std::fma(k_cb[detail::unpack_bits(kr, p, bits_k)], k_scale[size_t(h * hd + p)],
                             k_offset[size_t(h * hd + p)]);
  for (int s2 = 0; s2 < slots; ++s2)
    ks[kr[lay.k_index_bytes + s2]] += detail::load_fp16(kr + lay.k_index_bytes + slots + 2 * s2);
  for (int64_t p = 0; p < hd; ++p) k[storage[size_t(p)]] = ks[size_t(p)];
  const float vs = detail::load_fp16(vr), vo = detail::load_fp16(vr + 2);
  for (int64_t c = 0; c < hd; ++c) v[c] = std::fma(v_cb[detail::unpack_bits(vr + 4, c, bits_v)], vs, vo);
  for (int s2 = 0; s2 < slots; ++s2)
    v[vr[4 + lay.v_index_bytes + s2]] += detail::load_fp16(vr + 4 + lay.v_index_bytes + slots + 2 * s2);
}

namespace {

// Quantizes one (token, kv head): k and v in model channel order, records written at kr / vr.
void quantize_token(const LayerCache::Impl& c, int64_t h, const float* k, const float* v, uint8_t* kr, uint8_t* vr) {
  const int64_t hd = c.hd;
  std::vector<float> norm(static_cast<size_t>(hd)), x(static_cast<size_t>(hd));
  std::vector<uint8_t> idx(static_cast<size_t>(hd));
  std::vector<int> out(static_cast<size_t>(std::max(c.slots, 1)));
  // Keys, storage order: normalized by the calibrated per-channel scale and offset.
  for (int64_t p = 0; p < hd; ++p) {
    x[size_t(p)] = k[c.storage[size_t(p)]];
    norm[size_t(p)] = (x[size_t(p)] - c.k_offset[size_t(h * hd + p)]) / c.k_scale[size_t(h * hd + p)];
  }
  const int kk = 1 << c.bits_k, kv = 1 << c.bits_v;
  for (int64_t p = 0; p < hd; ++p) idx[size_t(p)] = uint8_t(detail::nearest_entry(c.k_cb, kk, norm[size_t(p)]));
  detail::pack_bits(idx.data(), hd, c.bits_k, kr);
  detail::select_outliers(norm.data(), hd, 0.0f, c.slots, out.data());
  for (int s = 0; s < c.slots; ++s) {
    const int p = out[size_t(s)];
    const float deq = std::fma(c.k_cb[idx[size_t(p)]], c.k_scale[size_t(h * hd + p)], c.k_offset[size_t(h * hd + p)]);
    kr[c.lay.k_index_bytes + s] = uint8_t(p);
    detail::store_fp16(kr + c.lay.k_index_bytes + c.slots + 2 * s, x[size_t(p)] - deq);
  }
  // Values, model order: outliers by distance from the token's mean, then per-token normalization.
  double mean = 0;
  for (int64_t i = 0; i < hd; ++i) mean += v[i];
  detail::select_outliers(v, hd, float(mean / double(hd)), c.slots, out.data());
  std::unique_ptr<bool[]> flag(new bool[size_t(hd)]());
  for (int s = 0; s < c.slots; ++s) flag[size_t(out[size_t(s)])] = true;
  uint16_t s16, o16;
  detail::value_normalization(v, hd, flag.get(), s16, o16);
  std::memcpy(vr, &s16, 2);
  std::memcpy(vr + 2, &o16, 2);
  const float vs = fp16_to_float(s16), vo = fp16_to_float(o16);
  for (int64_t i = 0; i < hd; ++i) idx[size_t(i)] = uint8_t(detail::nearest_entry(c.v_cb, kv, (v[i] - vo) / vs));
  detail::pack_bits(idx.data(), hd, c.bits_v, vr + 4);
  for (int s = 0; s < c.slots; ++s) {
    const int i = out[size_t(s)];
    vr[4 + c.lay.v_index_bytes + s] = uint8_t(i);
    detail::store_fp16(vr + 4 + c.lay.v_index_bytes + c.slots + 2 * s, v[i] - std::fma(c.v_cb[idx[size_t(i)]], vs, vo));
  }
}

struct AppendJob {
  LayerCache::Impl* c;
  LayerCache::Impl::Seq* s;
  const float *k, *v;
  int64_t pos0;
};

void append_task(void* ctx, int64_t task, int) {
  auto& j = *static_cast<AppendJob*>(ctx);
  auto& c = *j.c;
  const int64_t t = j.pos0 + task / c.n_kv, h = task % c.n_kv;
  const float* k = j.k + task * c.hd;
  const float* v = j.v + task * c.hd;
  uint8_t* page = c.pages[size_t(j.s->blocks[size_t(t / c.block_tokens)])].data();
  uint8_t* kr = page + (h * c.block_tokens + t % c.block_tokens) * c.lay.k_bytes;
  uint8_t* vr = page + c.v_region + (h * c.block_tokens + t % c.block_tokens) * c.lay.v_bytes;
  quantize_token(c, h, k, v, kr, vr);
}

}  // namespace

LayerCache::LayerCache(const LayerCalibration& cal, const Calibration& common, const CacheOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& c = *impl_;
  const int64_t hd = cal.head_dim;
  NUQ_CHECK(hd == 64 || hd == 80 || hd == 96 || hd == 128, Errc::invalid_argument,
            "KV cache: head_dim {} is not supported (64, 80, 96, 128)", hd);
  NUQ_CHECK(cal.n_kv_heads > 0, Errc::invalid_argument, "KV cache: n_kv_heads {} must be positive", cal.n_kv_heads);
  for (int b : {cal.bits_k, cal.bits_v})
    NUQ_CHECK(b >= 2 && b <= 4, Errc::invalid_argument, "KV cache: {} bits per value (supported: 2, 3, 4)", b);
  NUQ_CHECK(cal.k_scale.size() == size_t(cal.n_kv_heads * hd) && cal.k_offset.size() == cal.k_scale.size(),
            Errc::invalid_argument, "KV cache: k_scale/k_offset hold {}/{} values, expected n_kv_heads*head_dim = {}",
            cal.k_scale.size(), cal.k_offset.size(), cal.n_kv_heads * hd);
  NUQ_CHECK(cal.k_codebook.size() == size_t(1) << cal.bits_k && cal.v_codebook.size() == size_t(1) << cal.bits_v,
            Errc::invalid_argument, "KV cache: codebooks of {} and {} entries for {}-bit keys and {}-bit values",
            cal.k_codebook.size(), cal.v_codebook.size(), cal.bits_k, cal.bits_v);
  for (float s : cal.k_scale)
    NUQ_CHECK(s > 0 && std::isfinite(s), Errc::invalid_argument, "KV cache: key scale {} must be positive", s);
  NUQ_CHECK(options.block_tokens >= 8 && options.block_tokens <= 256 && options.block_tokens % 8 == 0,
            Errc::invalid_argument, "KV cache: block_tokens {} must be a multiple of 8 in [8, 256]", options.block_tokens);
  NUQ_CHECK(common.sink_tokens >= 0, Errc::invalid_argument, "KV cache: sink_tokens {} is negative", common.sink_tokens);
  NUQ_CHECK(common.outlier_fraction >= 0 && common.outlier_fraction <= 0.25, Errc::invalid_argument,
            "KV cache: outlier fraction {} must be in [0, 0.25]", common.outlier_fraction);
  NUQ_CHECK(options.rope.theta > 1 && options.rope.factor > 0, Errc::invalid_argument,
            "KV cache: RoPE theta {} must exceed 1 and the scaling factor {} be positive", options.rope.theta,
            options.rope.factor);
  c.n_kv = cal.n_kv_heads;
  c.hd = hd;
  c.bits_k = cal.bits_k;
  c.bits_v = cal.bits_v;
  c.slots = common.outlier_slots(hd);
  c.sink = common.sink_tokens;
  c.block_tokens = options.block_tokens;
  c.rope = options.rope;
  c.lay = token_layout(hd, c.bits_k, c.bits_v, c.slots);
  c.storage = detail::key_storage_order(c.rope.layout, hd);
  c.k_scale.resize(size_t(c.n_kv * hd));
  c.k_offset.resize(size_t(c.n_kv * hd));
  for (int64_t h = 0; h < c.n_kv; ++h)
    for (int64_t p = 0; p < hd; ++p) {
      c.k_scale[size_t(h * hd + p)] = cal.k_scale[size_t(h * hd + c.storage[size_t(p)])];
      c.k_offset[size_t(h * hd + p)] = cal.k_offset[size_t(h * hd + c.storage[size_t(p)])];
    }
  for (int j = 0; j < 16; ++j) {
    c.k_cb[j] = cal.k_codebook[size_t(std::min(j, (1 << c.bits_k) - 1))];
    c.v_cb[j] = cal.v_codebook[size_t(std::min(j, (1 << c.bits_v) - 1))];
  }
  c.k_lut_storage.resize(size_t(c.n_kv * hd * 16 + 16));
  float* lut = c.k_lut();
  for (int64_t p = 0; p < c.n_kv * hd; ++p)
    for (int j = 0; j < 16; ++j)
      lut[p * 16 + j] = std::fma(c.k_cb[j & ((1 << c.bits_k) - 1)], c.k_scale[size_t(p)], c.k_offset[size_t(p)]);
  c.v_region = c.n_kv * c.block_tokens * c.lay.k_bytes;
  c.page_bytes = c.v_region + c.n_kv * c.block_tokens * c.lay.v_bytes;
  c.table = detail::RopeTable(c.rope, hd, c.block_tokens);
}

LayerCache::~LayerCache() = default;
LayerCache::LayerCache(LayerCache&&) noexcept = default;
LayerCache& LayerCache::operator=(LayerCache&&) noexcept = default;

int LayerCache::add_sequence() {
  Impl& c = *impl_;
  int id;
  if (!c.free_seqs.empty()) {
    id = c.free_seqs.back();
    c.free_seqs.pop_back();
  } else {
    id = int(c.seqs.size());
    c.seqs.emplace_back();
  }
  c.seqs[size_t(id)] = Impl::Seq{};
  c.seqs[size_t(id)].live = true;
  return id;
}

void LayerCache::free_sequence(int seq) {
  Impl& c = *impl_;
  c.seq(seq);
  auto& s = c.seqs[size_t(seq)];
  for (int32_t b : s.blocks) c.free_pages.push_back(b);
  s = Impl::Seq{};
  c.free_seqs.push_back(seq);
}

int64_t LayerCache::length(int seq) const { return impl_->seq(seq).len; }

void LayerCache::append(int seq, const float* k, const float* v, int64_t n, int threads) {
  Impl& c = *impl_;
  c.seq(seq);
  auto& s = c.seqs[size_t(seq)];
  NUQ_CHECK(n > 0, Errc::invalid_argument, "KV cache append: {} tokens", n);
  NUQ_CHECK(k != nullptr && v != nullptr, Errc::invalid_argument, "KV cache append: keys or values are null");
  NUQ_CHECK(threads >= 0, Errc::invalid_argument, "KV cache append: threads {} is negative", threads);
  const int64_t hd = c.hd, width = c.n_kv * hd;
  for (int64_t i = 0; i < n * width; ++i)
    NUQ_CHECK(std::isfinite(k[i]) && std::isfinite(v[i]), Errc::invalid_argument,
              "KV cache append: non-finite {} at token {}, kv head {}, channel {}", std::isfinite(k[i]) ? "value" : "key",
              s.len + i / width, i % width / hd, i % hd);
  const int64_t pos0 = s.len, end = s.len + n;
  while (int64_t(s.blocks.size()) * c.block_tokens < end) {
    if (!c.free_pages.empty()) {
      s.blocks.push_back(c.free_pages.back());
      c.free_pages.pop_back();
    } else {
      s.blocks.push_back(int32_t(c.pages.size()));
      // 8 bytes of padding: the kernels load whole 8-byte words of indices at the end of the last record.
      c.pages.emplace_back(size_t(c.page_bytes + 8), uint8_t(0));
    }
  }
  for (int64_t t = pos0; t < std::min<int64_t>(end, c.sink); ++t) {
    s.sink_k.resize(size_t((t + 1) * width));
    s.sink_v.resize(size_t((t + 1) * width));
    for (int64_t h = 0; h < c.n_kv; ++h)
      for (int64_t p = 0; p < hd; ++p) {
        const size_t at = size_t((t * c.n_kv + h) * hd + p), src = size_t(((t - pos0) * c.n_kv + h) * hd);
        s.sink_k[at] = float_to_fp16(k[src + size_t(c.storage[size_t(p)])]);
        s.sink_v[at] = float_to_fp16(v[src + size_t(p)]);
      }
  }
  AppendJob job{&c, &s, k, v, pos0};
  cpu::detail::parallel_for(n * c.n_kv, n > 1 ? threads : 1, append_task, &job);
  s.len = end;
}

void LayerCache::dequantize(int seq, float* k, float* v) const {
  const Impl& c = *impl_;
  const auto& s = c.seq(seq);
  for (int64_t t = 0; t < s.len; ++t)
    for (int64_t h = 0; h < c.n_kv; ++h)
      c.dequantize_token(s, h, t, k + (t * c.n_kv + h) * c.hd, v + (t * c.n_kv + h) * c.hd);
}

void LayerCache::roundtrip(int64_t pos0, int64_t n, float* k, float* v) const {
  const Impl& c = *impl_;
  NUQ_CHECK(pos0 >= 0 && n >= 0 && k != nullptr && v != nullptr, Errc::invalid_argument,
            "KV roundtrip: bad position {} / count {} or null data", pos0, n);
  std::vector<uint8_t> kr(size_t(c.lay.k_bytes + 8)), vr(size_t(c.lay.v_bytes + 8));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < c.n_kv; ++h) {
      float* kh = k + (t * c.n_kv + h) * c.hd;
      float* vh = v + (t * c.n_kv + h) * c.hd;
      if (pos0 + t < c.sink) {
        for (int64_t i = 0; i < c.hd; ++i) {
          kh[i] = fp16_to_float(float_to_fp16(kh[i]));
          vh[i] = fp16_to_float(float_to_fp16(vh[i]));
        }
        continue;
      }
      for (int64_t i = 0; i < c.hd; ++i)
        NUQ_CHECK(std::isfinite(kh[i]) && std::isfinite(vh[i]), Errc::invalid_argument,
                  "KV roundtrip: non-finite key or value at position {}, kv head {}, channel {}", pos0 + t, h, i);
      quantize_token(c, h, kh, vh, kr.data(), vr.data());
      c.decode_records(h, kr.data(), vr.data(), kh, vh);
    }
}

namespace {

// The fp32 RoPE tables of an export (kv_cache.hpp, Export::rope_page_cos): page bases from the same
// double-precision rotation as the CPU kernels' (RopeTable::base), offsets from its fp32 steps.
void export_rope(const LayerCache::Impl& c, LayerCache::Export& e) {
  const int64_t half = c.hd / 2, bt = c.block_tokens, hp = c.table.padded_half();
  int64_t longest = 1;
  for (int32_t len : e.lengths) longest = std::max<int64_t>(longest, len);
  const int64_t pages = (longest + bt - 1) / bt;
  e.rope_page_cos.resize(size_t(pages * half));
  e.rope_page_sin.resize(size_t(pages * half));
  std::vector<double> bc(static_cast<size_t>(half)), bs(static_cast<size_t>(half));
  for (int64_t p = 0; p < pages; ++p) {
    c.table.base(p * bt, bc.data(), bs.data());
    for (int64_t i = 0; i < half; ++i) {
      e.rope_page_cos[size_t(p * half + i)] = float(bc[size_t(i)]);
      e.rope_page_sin[size_t(p * half + i)] = float(bs[size_t(i)]);
    }
  }
  e.rope_step_cos.resize(size_t(bt * half));
  e.rope_step_sin.resize(size_t(bt * half));
  for (int64_t t = 0; t < bt; ++t)
    for (int64_t i = 0; i < half; ++i) {
      e.rope_step_cos[size_t(t * half + i)] = c.table.step_cos()[t * hp + i];
      e.rope_step_sin[size_t(t * half + i)] = c.table.step_sin()[t * hp + i];
    }
}

}  // namespace

LayerCache::Export LayerCache::export_pages(std::span<const int> seqs) const {
  const Impl& c = *impl_;
  Export e;
  // 8 bytes of slack past the last record, and a multiple of 16 so that every page keeps the 16-byte
  // alignment of the CUDA kernel's record loads.
  e.page_stride = (c.page_bytes + 8 + 15) / 16 * 16;
  e.pages.resize(c.pages.size() * size_t(e.page_stride));
  for (size_t i = 0; i < c.pages.size(); ++i)
    std::memcpy(e.pages.data() + i * size_t(e.page_stride), c.pages[i].data(), c.pages[i].size());
  for (int id : seqs) e.max_blocks = std::max<int64_t>(e.max_blocks, int64_t(c.seq(id).blocks.size()));
  const size_t sink_elems = size_t(int64_t(c.sink) * c.n_kv * c.hd);
  for (int id : seqs) {
    const auto& s = c.seq(id);
    e.lengths.push_back(int32_t(s.len));
    std::vector<int32_t> row(size_t(e.max_blocks), 0);
    std::copy(s.blocks.begin(), s.blocks.end(), row.begin());
    e.block_tables.insert(e.block_tables.end(), row.begin(), row.end());
    std::vector<uint16_t> sk(sink_elems, 0), sv(sink_elems, 0);
    std::copy(s.sink_k.begin(), s.sink_k.end(), sk.begin());
    std::copy(s.sink_v.begin(), s.sink_v.end(), sv.begin());
    e.sink_k.insert(e.sink_k.end(), sk.begin(), sk.end());
    e.sink_v.insert(e.sink_v.end(), sv.begin(), sv.end());
  }
  e.k_scale = c.k_scale;
  e.k_offset = c.k_offset;
  e.k_codebook.assign(c.k_cb, c.k_cb + 16);
  e.v_codebook.assign(c.v_cb, c.v_cb + 16);
  e.storage.assign(c.storage.begin(), c.storage.end());
  e.rope_freq = c.table.freq();
  export_rope(c, e);
  return e;
}

int64_t LayerCache::n_kv_heads() const { return impl_->n_kv; }
int64_t LayerCache::head_dim() const { return impl_->hd; }
const TokenLayout& LayerCache::layout() const { return impl_->lay; }
const Rope& LayerCache::rope() const { return impl_->rope; }
int LayerCache::sink_tokens() const { return impl_->sink; }
int LayerCache::block_tokens() const { return impl_->block_tokens; }
int64_t LayerCache::bytes_per_token() const { return impl_->n_kv * impl_->lay.token_bytes(); }
int64_t LayerCache::allocated_bytes() const {
  const Impl& c = *impl_;
  int64_t bytes = (int64_t(c.pages.size()) - int64_t(c.free_pages.size())) * (c.page_bytes + 8);
  for (const auto& s : c.seqs) bytes += int64_t(s.sink_k.size() + s.sink_v.size()) * 2;
  return bytes;
}

}  // namespace nuq::kv
