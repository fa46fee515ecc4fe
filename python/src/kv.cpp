// Bindings for the quantized KV cache (include/nuq/kv_cache.hpp, docs/kv-cache.md): fit one layer from
// NumPy arrays of pre-RoPE keys and values, save/load calibrations, the paged cache of one layer
// (KVCache), decode attention over it, and the unquantized dense baseline.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cmath>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <string>
#include <tuple>

#include "bindings.hpp"
#include "interop.hpp"
#include "nuq/kv_cache.hpp"
#include "nuq/linear_cpu.hpp"

namespace py = pybind11;

namespace nuq::python {
namespace {

py::dict to_dict(const kv::LayerCalibration& c) {
  py::dict d;
  auto arr = [](const std::vector<float>& v, std::vector<py::ssize_t> shape) {
    py::array_t<float> a(shape);
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  d["k_scale"] = arr(c.k_scale, {py::ssize_t(c.n_kv_heads), py::ssize_t(c.head_dim)});
  d["k_offset"] = arr(c.k_offset, {py::ssize_t(c.n_kv_heads), py::ssize_t(c.head_dim)});
  d["k_codebook"] = arr(c.k_codebook, {py::ssize_t(c.k_codebook.size())});
  d["v_codebook"] = arr(c.v_codebook, {py::ssize_t(c.v_codebook.size())});
  d["bits_k"] = c.bits_k;
  d["bits_v"] = c.bits_v;
  return d;
}

// A layer dict as calibrate_kv_layer and load_kv_calibration return it, through the same checks as any
// other array argument: a float64 scale is refused by name rather than silently rounded.
kv::LayerCalibration from_dict(const py::dict& d, const std::string& fn) {
  for (const char* key : {"k_scale", "k_offset", "k_codebook", "v_codebook", "bits_k", "bits_v"})
    if (!d.contains(key))
      throw py::value_error(fn + ": calibration has no '" + key +
                            "' (expected a dict from calibrate_kv_layer or load_kv_calibration(...)['layers'][l])");
  const py::object scale_obj = d["k_scale"], offset_obj = d["k_offset"], kc_obj = d["k_codebook"],
                   vc_obj = d["v_codebook"];
  ArrayArg scale(scale_obj, fn, "calibration['k_scale']");
  scale.dtype({"float32"}).ndim(2).contiguous();
  ArrayArg offset(offset_obj, fn, "calibration['k_offset']");
  offset.dtype({"float32"}).ndim(2).contiguous().dim(0, scale.shape(0), "n_kv_heads, as k_scale")
      .dim(1, scale.shape(1), "head_dim, as k_scale");
  ArrayArg kc(kc_obj, fn, "calibration['k_codebook']"), vc(vc_obj, fn, "calibration['v_codebook']");
  kc.dtype({"float32"}).ndim(1).contiguous();
  vc.dtype({"float32"}).ndim(1).contiguous();
  kv::LayerCalibration c;
  c.n_kv_heads = scale.shape(0);
  c.head_dim = scale.shape(1);
  const int64_t n = c.n_kv_heads * c.head_dim;
  c.k_scale.assign(scale.as<float>(), scale.as<float>() + n);
  c.k_offset.assign(offset.as<float>(), offset.as<float>() + n);
  c.k_codebook.assign(kc.as<float>(), kc.as<float>() + kc.shape(0));
  c.v_codebook.assign(vc.as<float>(), vc.as<float>() + vc.shape(0));
  c.bits_k = d["bits_k"].cast<int>();
  c.bits_v = d["bits_v"].cast<int>();
  return c;
}

py::dict calibrate(py::handle k_obj, py::handle v_obj, py::handle k_sens_obj, py::handle v_sens_obj, int bits_k,
                   int bits_v, double outlier_fraction, bool q_norm) {
  // The shared argument checks (interop.hpp): float32, C-contiguous, host memory, any buffer or DLPack
  // producer; a wrong dtype is refused by name rather than converted.
  ArrayArg k(k_obj, "calibrate_kv_layer", "k"), v(v_obj, "calibrate_kv_layer", "v");
  k.dtype({"float32"}).contiguous();
  v.dtype({"float32"}).contiguous();
  if (k.ndims() != 3 || v.ndims() != 3)
    throw py::value_error("keys and values must be [tokens, n_kv_heads, head_dim] arrays");
  for (int i = 0; i < 3; ++i)
    if (k.shape(i) != v.shape(i)) throw py::value_error("keys and values differ in shape");
  std::optional<ArrayArg> k_sens, v_sens;
  for (auto [obj, sens, name] : {std::tuple{k_sens_obj, &k_sens, "k_sensitivity"}, std::tuple{v_sens_obj, &v_sens, "v_sensitivity"}}) {
    if (obj.is_none()) continue;
    sens->emplace(obj, "calibrate_kv_layer", name);
    (*sens)->dtype({"float32"}).contiguous();
    if (int64_t((*sens)->array.size()) != int64_t(k.array.size()))
      throw py::value_error("a sensitivity array differs in size from the keys");
  }
  kv::CalibrationOptions o;
  o.bits_k = bits_k;
  o.bits_v = bits_v;
  o.outlier_fraction = outlier_fraction;
  o.q_norm = q_norm;
  kv::LayerCalibration c;
  {
    py::gil_scoped_release release;
    c = kv::calibrate_layer(k.as<float>(), v.as<float>(), k_sens ? k_sens->as<float>() : nullptr,
                            v_sens ? v_sens->as<float>() : nullptr, k.shape(0), k.shape(1), k.shape(2), o);
  }
  return to_dict(c);
}


// ---------------------------------------------------------------------------------------------------
// The paged cache
// ---------------------------------------------------------------------------------------------------

kv::Rope parse_rope(const std::string& layout, double theta, const std::string& scaling, double factor,
                    const std::string& fn) {
  kv::Rope r;
  if (layout == "half_split")
    r.layout = RopeLayout::half_split;
  else if (layout == "interleaved")
    r.layout = RopeLayout::interleaved;
  else
    throw py::value_error(fn + ": rope_layout must be 'half_split' (Hugging Face) or 'interleaved' (GGUF, "
                          "llama2.c), got '" + layout + "'");
  if (scaling == "none")
    r.scaling = kv::RopeScaling::none;
  else if (scaling == "linear")
    r.scaling = kv::RopeScaling::linear;
  else if (scaling == "ntk")
    r.scaling = kv::RopeScaling::ntk;
  else
    throw py::value_error(fn + ": rope_scaling must be 'none', 'linear' or 'ntk', got '" + scaling + "'");
  r.theta = theta;
  r.factor = factor;
  return r;
}

py::dict rope_dict(const kv::Rope& r) {
  py::dict d;
  d["layout"] = r.layout == RopeLayout::half_split ? "half_split" : "interleaved";
  d["theta"] = r.theta;
  d["scaling"] = r.scaling == kv::RopeScaling::none ? "none" : r.scaling == kv::RopeScaling::linear ? "linear" : "ntk";
  d["factor"] = r.factor;
  return d;
}

std::optional<cpu::Isa> parse_isa(const std::optional<std::string>& s, const std::string& fn) {
  if (!s) return std::nullopt;
  for (cpu::Isa isa : {cpu::Isa::scalar, cpu::Isa::avx2, cpu::Isa::avx512})
    if (*s == cpu::to_string(isa)) {
      if (!cpu::isa_supported(isa)) throw py::value_error(fn + ": isa '" + *s + "' is not supported by this CPU");
      return isa;
    }
  throw py::value_error(fn + ": isa must be scalar, avx2 or avx512; got '" + *s + "'");
}

kv::AttentionOptions attention_options(std::optional<double> scale, int threads, const std::optional<std::string>& isa,
                                       const std::string& fn) {
  kv::AttentionOptions o;
  if (scale) {
    // 0 means "1/sqrt(head_dim)" to the C++ API; here None says that, so 0 is a mistake worth reporting.
    if (!(*scale > 0) || !std::isfinite(*scale))
      throw py::value_error(fn + ": scale must be positive and finite (None for 1/sqrt(head_dim)), got " +
                            std::to_string(*scale));
    o.scale = float(*scale);
  }
  if (threads < 0)
    throw py::value_error(fn + ": threads must be >= 0 (0 = all hardware threads), got " + std::to_string(threads));
  o.threads = threads;
  o.isa = parse_isa(isa, fn);
  return o;
}

// One layer's cache as Python holds it. The bindings release the GIL while they append and attend, so
// two Python threads (a server appending for one request while decoding another) could otherwise
// reallocate pages under a running attention: appends take the lock exclusively, reads share it.
struct KVCache {
  kv::LayerCache cache;
  double outlier_fraction = 0;
  mutable std::shared_mutex mutex;

  KVCache(kv::LayerCache c, double fraction) : cache(std::move(c)), outlier_fraction(fraction) {}
};

std::unique_ptr<KVCache> make_cache(const py::dict& calibration, std::optional<int> layer,
                                    std::optional<double> outlier_fraction, std::optional<int> sink_tokens,
                                    int block_tokens, const std::string& rope_layout, double rope_theta,
                                    const std::string& rope_scaling, double rope_factor) {
  const std::string fn = "KVCache";
  kv::Calibration common;
  py::dict layer_dict = calibration;
  if (calibration.contains("layers")) {
    // A whole calibration file (load_kv_calibration): its outlier fraction and sink size are what the
    // codebooks were fitted with, so a different value given here would be a silent mismatch.
    const py::list layers = calibration["layers"];
    if (!layer)
      throw py::value_error(fn + ": the calibration holds " + std::to_string(layers.size()) +
                            " layers; say which one with layer=");
    if (*layer < 0 || size_t(*layer) >= layers.size())
      throw py::value_error(fn + ": layer " + std::to_string(*layer) + " is out of range (the calibration holds " +
                            std::to_string(layers.size()) + " layers)");
    layer_dict = layers[size_t(*layer)];
    common.outlier_fraction = calibration["outlier_fraction"].cast<double>();
    common.sink_tokens = calibration["sink_tokens"].cast<int>();
    if (outlier_fraction && *outlier_fraction != common.outlier_fraction)
      throw py::value_error(fn + ": outlier_fraction " + std::to_string(*outlier_fraction) +
                            " differs from the calibration's " + std::to_string(common.outlier_fraction));
    if (sink_tokens && *sink_tokens != common.sink_tokens)
      throw py::value_error(fn + ": sink_tokens " + std::to_string(*sink_tokens) + " differs from the calibration's " +
                            std::to_string(common.sink_tokens));
  } else {
    if (layer)
      throw py::value_error(fn + ": layer= applies to a whole calibration (load_kv_calibration), not to one "
                            "layer's dict");
    if (outlier_fraction) common.outlier_fraction = *outlier_fraction;
    if (sink_tokens) common.sink_tokens = *sink_tokens;
  }
  const kv::LayerCalibration cal = from_dict(layer_dict, fn);
  kv::CacheOptions options;
  options.block_tokens = block_tokens;
  options.rope = parse_rope(rope_layout, rope_theta, rope_scaling, rope_factor, fn);
  return std::make_unique<KVCache>(kv::LayerCache(cal, common, options), common.outlier_fraction);
}

// Keys and values of `tokens` tokens for this cache: float32 [tokens, n_kv_heads, head_dim], C-contiguous.
std::pair<ArrayArg, ArrayArg> token_arrays(const KVCache& c, py::handle k_obj, py::handle v_obj, const std::string& fn,
                                           std::optional<int64_t> tokens, const std::string& tokens_meaning) {
  ArrayArg k(k_obj, fn, "k"), v(v_obj, fn, "v");
  for (ArrayArg* a : {&k, &v}) {
    a->dtype({"float32"}).ndim(3).contiguous();
    a->dim(1, c.cache.n_kv_heads(), "the cache's n_kv_heads").dim(2, c.cache.head_dim(), "the cache's head_dim");
    if (tokens) a->dim(0, *tokens, tokens_meaning);
  }
  v.dim(0, k.shape(0), "tokens, as k");
  return {std::move(k), std::move(v)};
}

void append(KVCache& c, int seq, py::handle k_obj, py::handle v_obj, int threads) {
  const std::string fn = "KVCache.append";
  auto [k, v] = token_arrays(c, k_obj, v_obj, fn, std::nullopt, "");
  if (k.shape(0) == 0) throw py::value_error(fn + ": k and v hold no tokens");
  if (threads < 0)
    throw py::value_error(fn + ": threads must be >= 0 (0 = all hardware threads), got " + std::to_string(threads));
  py::gil_scoped_release release;
  std::unique_lock lock(c.mutex);
  c.cache.append(seq, k.as<float>(), v.as<float>(), k.shape(0), threads);
}

void append_batch(KVCache& c, const std::vector<int>& seqs, py::handle k_obj, py::handle v_obj) {
  const std::string fn = "KVCache.append_batch";
  if (seqs.empty()) throw py::value_error(fn + ": seqs is empty");
  if (std::set<int>(seqs.begin(), seqs.end()).size() != seqs.size())
    throw py::value_error(fn + ": seqs names a sequence twice (one decode step appends one token per sequence)");
  auto [k, v] = token_arrays(c, k_obj, v_obj, fn, int64_t(seqs.size()), "one token per sequence in seqs");
  py::gil_scoped_release release;
  std::unique_lock lock(c.mutex);
  // Everything is checked before the first append, so that a bad row leaves every sequence as it was
  // instead of a batch half-advanced by one token.
  for (int s : seqs) c.cache.length(s);
  const int64_t width = c.cache.n_kv_heads() * c.cache.head_dim();
  const float* kp = k.as<float>();
  const float* vp = v.as<float>();
  for (int64_t i = 0; i < int64_t(seqs.size()) * width; ++i)
    if (!std::isfinite(kp[i]) || !std::isfinite(vp[i]))
      throw py::value_error(fn + ": non-finite " + (std::isfinite(kp[i]) ? "value" : "key") + " at batch row " +
                            std::to_string(i / width) + ", kv head " + std::to_string(i % width / c.cache.head_dim()) +
                            ", channel " + std::to_string(i % c.cache.head_dim()));
  for (size_t b = 0; b < seqs.size(); ++b) c.cache.append(seqs[b], kp + int64_t(b) * width, vp + int64_t(b) * width, 1);
}

py::array_t<float> float_array(std::vector<py::ssize_t> shape) { return py::array_t<float>(shape); }

py::tuple dequantize(const KVCache& c, int seq) {
  std::shared_lock lock(c.mutex);
  const int64_t len = c.cache.length(seq);
  const std::vector<py::ssize_t> shape{len, c.cache.n_kv_heads(), c.cache.head_dim()};
  py::array_t<float> k = float_array(shape), v = float_array(shape);
  if (len > 0) {
    float* kp = k.mutable_data();
    float* vp = v.mutable_data();
    py::gil_scoped_release release;
    c.cache.dequantize(seq, kp, vp);
  }
  return py::make_tuple(k, v);
}

py::tuple roundtrip(const KVCache& c, py::handle k_obj, py::handle v_obj, int64_t pos0) {
  const std::string fn = "KVCache.roundtrip";
  if (pos0 < 0) throw py::value_error(fn + ": pos0 must be >= 0, got " + std::to_string(pos0));
  auto [k, v] = token_arrays(c, k_obj, v_obj, fn, std::nullopt, "");
  const std::vector<py::ssize_t> shape{k.shape(0), c.cache.n_kv_heads(), c.cache.head_dim()};
  py::array_t<float> ko = float_array(shape), vo = float_array(shape);
  const size_t n = size_t(k.shape(0) * c.cache.n_kv_heads() * c.cache.head_dim());
  float* kp = ko.mutable_data();
  float* vp = vo.mutable_data();
  std::copy(k.as<float>(), k.as<float>() + n, kp);
  std::copy(v.as<float>(), v.as<float>() + n, vp);
  {
    py::gil_scoped_release release;
    // roundtrip() reads only the calibration, which never changes: no lock needed.
    c.cache.roundtrip(pos0, k.shape(0), kp, vp);
  }
  return py::make_tuple(ko, vo);
}

py::dict export_pages(const KVCache& c, const std::vector<int>& seqs) {
  if (seqs.empty()) throw py::value_error("KVCache.export_pages: seqs is empty");
  auto e = std::make_unique<kv::LayerCache::Export>();
  {
    std::shared_lock lock(c.mutex);
    *e = c.cache.export_pages(seqs);
  }
  const kv::TokenLayout& lay = c.cache.layout();
  const int64_t batch = int64_t(seqs.size()), n_kv = c.cache.n_kv_heads(), hd = c.cache.head_dim();
  const int64_t sink = c.cache.sink_tokens();
  // The arrays view the export's vectors, which the capsule frees with the last of them: no copies of
  // the page pool, which is the whole cache.
  kv::LayerCache::Export* raw = e.release();
  py::capsule owner(raw, [](void* p) { delete static_cast<kv::LayerCache::Export*>(p); });
  py::dict d;
  d["pages"] = view_of(raw->pages.data(), "uint8", 1,
                       {raw->page_stride > 0 ? int64_t(raw->pages.size()) / raw->page_stride : 0, raw->page_stride},
                       owner, true);
  d["page_stride"] = raw->page_stride;
  d["block_tables"] = view_of(raw->block_tables.data(), "int32", 4, {batch, raw->max_blocks}, owner, true);
  d["max_blocks"] = raw->max_blocks;
  d["lengths"] = view_of(raw->lengths.data(), "int32", 4, {batch}, owner, true);
  d["sink_k"] = view_of(raw->sink_k.data(), "float16", 2, {batch, sink, n_kv, hd}, owner, true);
  d["sink_v"] = view_of(raw->sink_v.data(), "float16", 2, {batch, sink, n_kv, hd}, owner, true);
  d["sink_tokens"] = sink;
  d["n_kv_heads"] = n_kv;
  d["head_dim"] = hd;
  d["block_tokens"] = c.cache.block_tokens();
  d["bits_k"] = lay.bits_k;
  d["bits_v"] = lay.bits_v;
  d["slots"] = lay.slots;
  d["k_scale"] = view_of(raw->k_scale.data(), "float32", 4, {n_kv, hd}, owner, true);
  d["k_offset"] = view_of(raw->k_offset.data(), "float32", 4, {n_kv, hd}, owner, true);
  d["k_codebook"] = view_of(raw->k_codebook.data(), "float32", 4, {int64_t(raw->k_codebook.size())}, owner, true);
  d["v_codebook"] = view_of(raw->v_codebook.data(), "float32", 4, {int64_t(raw->v_codebook.size())}, owner, true);
  d["storage"] = view_of(raw->storage.data(), "int32", 4, {hd}, owner, true);
  d["rope_freq"] = view_of(raw->rope_freq.data(), "float64", 8, {hd / 2}, owner, true);
  const int64_t rope_pages = int64_t(raw->rope_page_cos.size()) / (hd / 2);
  d["rope_pages"] = rope_pages;
  d["rope_page_cos"] = view_of(raw->rope_page_cos.data(), "float32", 4, {rope_pages, hd / 2}, owner, true);
  d["rope_page_sin"] = view_of(raw->rope_page_sin.data(), "float32", 4, {rope_pages, hd / 2}, owner, true);
  d["rope_step_cos"] = view_of(raw->rope_step_cos.data(), "float32", 4, {int64_t(c.cache.block_tokens()), hd / 2}, owner, true);
  d["rope_step_sin"] = view_of(raw->rope_step_sin.data(), "float32", 4, {int64_t(c.cache.block_tokens()), hd / 2}, owner, true);
  return d;
}


// The [batch, n_heads, head_dim] fp32 output of a decode attention call: a new array, or the caller's
// `out` after checking its shape and that it does not overlap the queries it is computed from.
py::array attention_output(py::object out_obj, const ArrayArg& q, int64_t batch, int64_t n_heads, int64_t hd,
                           const std::string& fn) {
  if (out_obj.is_none()) return float_array({batch, n_heads, hd});
  ArrayArg a(out_obj, fn, "out");
  a.dtype({"float32"}).ndim(3).contiguous().writeable().dim(0, batch, "batch, as q").dim(1, n_heads, "n_heads, as q")
      .dim(2, hd, "head_dim, as q");
  if (py::module_::import("numpy").attr("shares_memory")(a.array, q.array).cast<bool>())
    throw py::value_error(fn + ": out must not overlap q");
  return a.array;
}

py::array decode_attention(const KVCache& c, const std::vector<int>& seqs, py::handle q_obj, py::object out_obj,
                           std::optional<double> scale, bool query_has_rope, int threads,
                           const std::optional<std::string>& isa, int split_tokens,
                           const std::optional<std::vector<int64_t>>& lengths) {
  const std::string fn = "kv_decode_attention";
  if (lengths && lengths->size() != seqs.size())
    throw py::value_error(fn + ": lengths has " + std::to_string(lengths->size()) + " entries for " +
                          std::to_string(seqs.size()) + " sequences");
  if (seqs.empty()) throw py::value_error(fn + ": seqs is empty");
  const int64_t batch = int64_t(seqs.size()), n_kv = c.cache.n_kv_heads(), hd = c.cache.head_dim();
  ArrayArg q(q_obj, fn, "q");
  q.dtype({"float32"}).ndim(3).contiguous().dim(0, batch, "batch, one query per sequence in seqs")
      .dim(2, hd, "the cache's head_dim");
  const int64_t n_heads = q.shape(1);
  if (n_heads <= 0 || n_heads % n_kv != 0)
    throw py::value_error(fn + ": q: dimension 1 (n_heads = " + std::to_string(n_heads) +
                          ") must be a positive multiple of the cache's " + std::to_string(n_kv) + " kv heads (GQA)");
  kv::AttentionOptions o = attention_options(scale, threads, isa, fn);
  o.query_has_rope = query_has_rope;
  o.split_tokens = split_tokens;
  if (lengths) o.lengths = *lengths;
  py::array out = attention_output(out_obj, q, batch, n_heads, hd, fn);
  const float* qp = q.as<float>();
  float* op = static_cast<float*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    std::shared_lock lock(c.mutex);
    kv::decode_attention(c.cache, seqs, qp, n_heads, op, o);
  }
  return out;
}

py::array dense_attention(py::handle k_obj, py::handle v_obj, const std::vector<int64_t>& lengths, py::handle q_obj,
                          py::object out_obj, std::optional<double> scale, int threads,
                          const std::optional<std::string>& isa) {
  const std::string fn = "dense_decode_attention";
  ArrayArg k(k_obj, fn, "k"), v(v_obj, fn, "v");
  k.dtype({"float32"}).ndim(4).contiguous();
  const int64_t batch = k.shape(0), n_kv = k.shape(1), max_len = k.shape(2), hd = k.shape(3);
  v.dtype({"float32"}).ndim(4).contiguous().dim(0, batch, "batch, as k").dim(1, n_kv, "n_kv_heads, as k")
      .dim(2, max_len, "max_length, as k").dim(3, hd, "head_dim, as k");
  if (int64_t(lengths.size()) != batch)
    throw py::value_error(fn + ": lengths holds " + std::to_string(lengths.size()) + " entries for a batch of " +
                          std::to_string(batch));
  for (size_t b = 0; b < lengths.size(); ++b)
    if (lengths[b] < 1 || lengths[b] > max_len)
      throw py::value_error(fn + ": lengths[" + std::to_string(b) + "] = " + std::to_string(lengths[b]) +
                            " is outside [1, " + std::to_string(max_len) + "] (k's dimension 2)");
  ArrayArg q(q_obj, fn, "q");
  q.dtype({"float32"}).ndim(3).contiguous().dim(0, batch, "batch, as k").dim(2, hd, "head_dim, as k");
  const int64_t n_heads = q.shape(1);
  if (n_heads <= 0 || n_heads % n_kv != 0)
    throw py::value_error(fn + ": q: dimension 1 (n_heads = " + std::to_string(n_heads) +
                          ") must be a positive multiple of k's " + std::to_string(n_kv) + " kv heads (GQA)");
  const kv::AttentionOptions o = attention_options(scale, threads, isa, fn);
  py::array out = attention_output(out_obj, q, batch, n_heads, hd, fn);
  kv::DenseKv d;
  d.k = k.data();
  d.v = v.data();
  d.n_kv_heads = n_kv;
  d.head_dim = hd;
  d.head_stride = max_len * hd;
  d.seq_stride = n_kv * max_len * hd;
  const float* qp = q.as<float>();
  float* op = static_cast<float*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    kv::dense_decode_attention(d, lengths, qp, n_heads, op, o);
  }
  return out;
}

py::tuple rope_cos_sin(int64_t head_dim, int64_t pos0, int64_t n, const std::string& layout, double theta,
                       const std::string& scaling, double factor) {
  const std::string fn = "kv_rope_cos_sin";
  const kv::Rope r = parse_rope(layout, theta, scaling, factor, fn);
  if (head_dim <= 0 || head_dim % 2 != 0 || n < 0 || pos0 < 0)
    throw py::value_error(fn + ": head_dim must be even and positive, pos0 and n non-negative; got head_dim=" +
                          std::to_string(head_dim) + " pos0=" + std::to_string(pos0) + " n=" + std::to_string(n));
  py::array_t<float> cs = float_array({n, head_dim / 2}), sn = float_array({n, head_dim / 2});
  float* cp = cs.mutable_data();
  float* sp = sn.mutable_data();
  {
    py::gil_scoped_release release;
    kv::rope_cos_sin(r, head_dim, pos0, n, cp, sp);
  }
  return py::make_tuple(cs, sn);
}

std::string cache_repr(const KVCache& c) {
  const kv::TokenLayout& l = c.cache.layout();
  return "KVCache(n_kv_heads=" + std::to_string(c.cache.n_kv_heads()) + ", head_dim=" +
         std::to_string(c.cache.head_dim()) + ", bits_k=" + std::to_string(l.bits_k) + ", bits_v=" +
         std::to_string(l.bits_v) + ", outlier_slots=" + std::to_string(l.slots) + ", sink_tokens=" +
         std::to_string(c.cache.sink_tokens()) + ", block_tokens=" + std::to_string(c.cache.block_tokens()) +
         ", bytes_per_token=" + std::to_string(c.cache.bytes_per_token()) + ")";
}

}  // namespace

void bind_kv(py::module_& m) {
  m.def("calibrate_kv_layer", &calibrate, py::arg("k"), py::arg("v"), py::arg("k_sensitivity") = py::none(),
        py::arg("v_sensitivity") = py::none(), py::arg("bits_k") = 3, py::arg("bits_v") = 3,
        py::arg("outlier_fraction") = 0.01, py::arg("q_norm") = false,
        R"doc(KV-cache calibration of one layer (nuq::kv::calibrate_layer, docs/kv-cache.md).

k, v: float32 [tokens, n_kv_heads, head_dim], C-contiguous: sample keys BEFORE RoPE and values, channels
  in the model's order.
k_sensitivity, v_sensitivity: optional float32 arrays of the same shape (>= 0, e.g. squared gradients)
  weighting the k-means.
bits_k, bits_v: 2, 3 or 4. outlier_fraction: share of each vector kept in fp16 (also the quantile
  range of the key channels). q_norm: match the codebooks' mean and std to the samples.
Returns a dict: k_scale, k_offset float32 [n_kv_heads, head_dim]; k_codebook float32 [2**bits_k],
v_codebook float32 [2**bits_v] (ascending); bits_k, bits_v. KVCache takes it.)doc");
  m.def(
      "save_kv_calibration",
      [](const std::vector<py::dict>& layers, const std::string& path, double outlier_fraction, int sink_tokens,
         bool q_norm) {
        kv::Calibration cal;
        cal.outlier_fraction = outlier_fraction;
        cal.sink_tokens = sink_tokens;
        cal.q_norm = q_norm;
        for (const auto& d : layers) cal.layers.push_back(from_dict(d, "save_kv_calibration"));
        kv::save_calibration(cal, path);
      },
      py::arg("layers"), py::arg("path"), py::arg("outlier_fraction") = 0.01, py::arg("sink_tokens") = 1,
      py::arg("q_norm") = false,
      "Write per-layer calibration dicts (from calibrate_kv_layer; float32 arrays, checked like any argument) as "
      "a nuq KV calibration safetensors file, with the outlier_fraction and sink_tokens they are meant for.");
  m.def(
      "load_kv_calibration",
      [](const std::string& path) {
        const kv::Calibration cal = kv::load_calibration(path);
        py::dict d;
        py::list layers;
        for (const auto& l : cal.layers) layers.append(to_dict(l));
        d["layers"] = layers;
        d["outlier_fraction"] = cal.outlier_fraction;
        d["sink_tokens"] = cal.sink_tokens;
        d["q_norm"] = cal.q_norm;
        return d;
      },
      py::arg("path"), "Read a KV calibration file: {layers: [dict], outlier_fraction, sink_tokens, q_norm}.");

  py::class_<KVCache>(m, "KVCache", R"doc(The quantized, paged KV cache of one attention layer (nuq::kv::LayerCache,
docs/kv-cache.md): keys per channel before RoPE, values per token, both in the calibration's 2/3/4-bit
non-uniform datatype, a fixed number of fp16 outlier slots per (token, kv head) vector, and the first
sink_tokens tokens of every sequence in fp16. It holds any number of sequences of any lengths.

KVCache(calibration, layer=None, *, outlier_fraction=None, sink_tokens=None, block_tokens=32,
        rope_layout="half_split", rope_theta=10000.0, rope_scaling="none", rope_factor=1.0)

calibration: one layer's dict from calibrate_kv_layer (k_scale, k_offset: float32 [n_kv_heads,
  head_dim]; k_codebook, v_codebook: float32 [2**bits], ascending; bits_k, bits_v), then
  outlier_fraction (default 0.01, the value given to calibrate_kv_layer) and sink_tokens (default 1)
  say how many outlier slots and fp16 sink tokens to keep; or a whole calibration from
  load_kv_calibration together with layer=, when outlier_fraction and sink_tokens come from the file
  (giving different ones is an error).
head_dim must be 64, 80, 96 or 128. block_tokens: tokens per page, a multiple of 8 in [8, 256].
rope_layout: "half_split" (pairs i, i + head_dim/2; Hugging Face) or "interleaved" (pairs 2i, 2i+1;
  GGUF, llama2.c). rope_theta: the base. rope_scaling: "none", "linear" (positions divided by
  rope_factor) or "ntk" (theta multiplied by rope_factor**(d/(d-2))).
Keys are stored before RoPE and rotated when attending (to their position in their sequence).
Thread-safe: appends and attention from several Python threads are serialized per cache.)doc")
      .def(py::init(&make_cache), py::arg("calibration"), py::arg("layer") = py::none(), py::kw_only(),
           py::arg("outlier_fraction") = py::none(), py::arg("sink_tokens") = py::none(), py::arg("block_tokens") = 32,
           py::arg("rope_layout") = "half_split", py::arg("rope_theta") = 10000.0, py::arg("rope_scaling") = "none",
           py::arg("rope_factor") = 1.0)
      .def(
          "add_sequence",
          [](KVCache& c) {
            std::unique_lock lock(c.mutex);
            return c.cache.add_sequence();
          },
          "A new, empty sequence; returns its id (an int). Ids and pages of freed sequences are reused.")
      .def(
          "free_sequence",
          [](KVCache& c, int seq) {
            std::unique_lock lock(c.mutex);
            c.cache.free_sequence(seq);
          },
          py::arg("seq"), "Return a sequence's pages to the cache's pool; its id may be handed out again.")
      .def(
          "length",
          [](const KVCache& c, int seq) {
            std::shared_lock lock(c.mutex);
            return c.cache.length(seq);
          },
          py::arg("seq"), "Tokens cached for sequence `seq`.")
      .def("append", &append, py::arg("seq"), py::arg("k"), py::arg("v"), py::arg("threads") = 0,
           R"doc(Quantize and append n tokens to one sequence, at positions length(seq) .. length(seq) + n - 1.

k, v: float32 [n, n_kv_heads, head_dim], C-contiguous, keys BEFORE RoPE, channels in the model's order
  (the K/V projection's output order). n = 1 is a decode step; n > 1 is a bulk prefill, quantized in
  parallel over tokens and kv heads.
threads: for n > 1; 0 = all hardware threads.
A non-finite key or value is a ValueError naming its token, kv head and channel (nothing is appended).)doc")
      .def("append_batch", &append_batch, py::arg("seqs"), py::arg("k"), py::arg("v"),
           R"doc(One decode step for a batch: append one token to each sequence of `seqs`.

seqs: distinct sequence ids (ints), length batch.
k, v: float32 [batch, n_kv_heads, head_dim], C-contiguous; row b (pre-RoPE, model channel order) is the
  next token of seqs[b].
Every id and value is checked before anything is appended, so an error leaves every sequence unchanged.)doc")
      .def("dequantize", &dequantize, py::arg("seq"),
           R"doc(What the cache holds for a sequence, decoded: (k, v), each float32 [length, n_kv_heads, head_dim],
pre-RoPE keys, model channel order (fp16-rounded for the sink tokens). For tests and error measurements.)doc")
      .def("roundtrip", &roundtrip, py::arg("k"), py::arg("v"), py::arg("pos0") = 0,
           R"doc(Encode and decode keys and values exactly as append + dequantize would, without storing them.

k, v: float32 [n, n_kv_heads, head_dim], C-contiguous, pre-RoPE, model channel order, at positions
  pos0 .. pos0 + n - 1 (positions below sink_tokens are only rounded to fp16).
Returns new arrays (k, v) of the same shape; the inputs are not modified.)doc")
      .def("export_pages", &export_pages, py::arg("seqs"),
           R"doc(Host copies of everything the CUDA kernel reads for a batch (nuq::kv::LayerCache::export_pages), as a
dict whose keys are the fields of nuq::cuda::KvDeviceCache (include/nuq/kv_cuda.hpp):
pages uint8 [n_pages, page_stride] (the whole pool), block_tables int32 [batch, max_blocks],
lengths int32 [batch], sink_k / sink_v float16 [batch, sink_tokens, n_kv_heads, head_dim] (keys in
storage order), k_scale / k_offset float32 [n_kv_heads, head_dim] (storage order), k_codebook /
v_codebook float32 [16] (padded), storage int32 [head_dim] (model channel of each key storage
position), rope_freq float64 [head_dim / 2] (per-pair angle per position), rope_page_cos / rope_page_sin
float32 [rope_pages, head_dim / 2] and rope_step_cos / rope_step_sin float32 [block_tokens, head_dim / 2]
(the fp32 RoPE rotations the kernel reads: page base times in-page step), and the ints rope_pages,
page_stride, max_blocks, sink_tokens,
n_kv_heads, head_dim, block_tokens, bits_k, bits_v, slots. Upload the arrays, replace each by its
device pointer, and pass the dict to cuda_kv_decode_attention.)doc")
      .def_property_readonly("n_kv_heads", [](const KVCache& c) { return c.cache.n_kv_heads(); })
      .def_property_readonly("head_dim", [](const KVCache& c) { return c.cache.head_dim(); })
      .def_property_readonly("bits_k", [](const KVCache& c) { return c.cache.layout().bits_k; })
      .def_property_readonly("bits_v", [](const KVCache& c) { return c.cache.layout().bits_v; })
      .def_property_readonly("outlier_fraction", [](const KVCache& c) { return c.outlier_fraction; })
      .def_property_readonly("outlier_slots", [](const KVCache& c) { return c.cache.layout().slots; },
                             "fp16 outlier slots per (token, kv head) vector: ceil(outlier_fraction * head_dim).")
      .def_property_readonly("sink_tokens", [](const KVCache& c) { return c.cache.sink_tokens(); })
      .def_property_readonly("block_tokens", [](const KVCache& c) { return c.cache.block_tokens(); })
      .def_property_readonly("rope", [](const KVCache& c) { return rope_dict(c.cache.rope()); },
                             "{layout, theta, scaling, factor}")
      .def_property_readonly(
          "token_layout",
          [](const KVCache& c) {
            const kv::TokenLayout& l = c.cache.layout();
            py::dict d;
            d["head_dim"] = l.head_dim;
            d["bits_k"] = l.bits_k;
            d["bits_v"] = l.bits_v;
            d["slots"] = l.slots;
            d["k_index_bytes"] = l.k_index_bytes;
            d["k_bytes"] = l.k_bytes;
            d["v_index_bytes"] = l.v_index_bytes;
            d["v_bytes"] = l.v_bytes;
            return d;
          },
          "Bytes of one cached token of one kv head (docs/kv-cache.md, \"Per-token layout\").")
      .def_property_readonly("bytes_per_token", [](const KVCache& c) { return c.cache.bytes_per_token(); },
                             "Every byte one token occupies in the pages, all kv heads: n_kv_heads * (k_bytes + "
                             "v_bytes). fp16 K+V would be n_kv_heads * head_dim * 4.")
      .def_property_readonly(
          "allocated_bytes",
          [](const KVCache& c) {
            std::shared_lock lock(c.mutex);
            return c.cache.allocated_bytes();
          },
          "Bytes of the pages in use (with their padding) plus the sink tokens' fp16 copies.")
      .def("__repr__", &cache_repr);

  m.def("kv_decode_attention", &decode_attention, py::arg("cache"), py::arg("seqs"), py::arg("q"), py::kw_only(),
        py::arg("out") = py::none(), py::arg("scale") = py::none(), py::arg("query_has_rope") = false,
        py::arg("threads") = 0, py::arg("isa") = py::none(), py::arg("split_tokens") = 1024,
        py::arg("lengths") = py::none(),
        R"doc(One decode step of attention over the quantized cache (nuq::kv::decode_attention): sequence seqs[b]
attends with query q[b] to all its cached tokens, without decompressing the cache.

cache: a KVCache. seqs: sequence ids (ints), length batch, each with at least one token.
q: float32 [batch, n_heads, head_dim], C-contiguous, model channel order; n_heads a multiple of
  cache.n_kv_heads (GQA: query heads h*G .. h*G+G-1 share kv head h, G = n_heads / n_kv_heads).
  The query sits at position length(seqs[b]) - 1 and is rotated there with the cache's RoPE, unless
  query_has_rope=True (already rotated).
out: optional float32 [batch, n_heads, head_dim], C-contiguous, written in place.
scale: softmax scale, None for 1/sqrt(head_dim).
threads: 0 = all hardware threads (the result does not depend on it). isa: None (best for this CPU),
  "avx512", "avx2" or "scalar" (the double-precision reference). split_tokens: context per task, a
  multiple of the page size.
lengths: optional ints, one per row: row b attends to the first lengths[b] tokens of seqs[b] only, its
  query at position lengths[b] - 1 (1 <= lengths[b] <= the sequence's length). Rows may repeat a
  sequence, so that one call serves every query of a causal prefill.
Returns float32 [batch, n_heads, head_dim].)doc");
  m.def("dense_decode_attention", &dense_attention, py::arg("k"), py::arg("v"), py::arg("lengths"), py::arg("q"),
        py::kw_only(), py::arg("out") = py::none(), py::arg("scale") = py::none(), py::arg("threads") = 0,
        py::arg("isa") = py::none(),
        R"doc(Decode attention over an unquantized cache (nuq::kv::dense_decode_attention): nuq's fp32 baseline kernel.

k, v: float32 [batch, n_kv_heads, max_length, head_dim], C-contiguous; keys ALREADY rotated (RoPE
  applied at their positions); head_dim 64, 80, 96 or 128. Tokens past lengths[b] are never read.
lengths: ints, length batch, each in [1, max_length].
q: float32 [batch, n_heads, head_dim], C-contiguous, already rotated; n_heads a multiple of
  n_kv_heads (GQA as in kv_decode_attention).
out, scale, threads, isa: as in kv_decode_attention (isa="scalar" is a plain double-precision
  attention). Returns float32 [batch, n_heads, head_dim].)doc");
  m.def("kv_rope_cos_sin", &rope_cos_sin, py::arg("head_dim"), py::arg("pos0"), py::arg("n"), py::kw_only(),
        py::arg("rope_layout") = "half_split", py::arg("rope_theta") = 10000.0, py::arg("rope_scaling") = "none",
        py::arg("rope_factor") = 1.0,
        R"doc(cos and sin of the RoPE angles the KV cache uses (nuq::kv::rope_cos_sin) at positions
pos0 .. pos0 + n - 1: a tuple (cos, sin), each float32 [n, head_dim / 2]; column i is pair i (channels 2i, 2i+1 when
interleaved, i, i + head_dim/2 when half_split). Angles are reduced in double precision.)doc");
}

}  // namespace nuq::python
