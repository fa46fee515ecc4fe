// Decode attention over the quantized KV cache: argument checks, ISA choice, query rotation, the split
// over the context with its deterministic merge, the scalar reference, and the unquantized baseline.
//
// Work is split into (sequence, context split) tasks of a fixed number of tokens, each producing a
// partial softmax state (max, sum, weighted V sum) per query head; the partials of a sequence are merged
// in split order afterwards, so the result does not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/kv_attention_kernel.hpp"
#include "cpu/thread_pool.hpp"
#include "kv_internal.hpp"
#include "nuq/error.hpp"
#include "nuq/half.hpp"

namespace nuq::kv {
namespace {

using detail::ChunkArgs;
using detail::kMaxChunkTokens;

cpu::Isa resolve(const AttentionOptions& o) {
  NUQ_CHECK(o.threads >= 0, Errc::invalid_argument, "KV attention: threads {} is negative", o.threads);
  if (o.isa) {
    NUQ_CHECK(cpu::isa_supported(*o.isa), Errc::invalid_argument, "KV attention: this CPU cannot run the {} kernel",
              cpu::to_string(*o.isa));
    return *o.isa;
  }
  return cpu::best_isa();
}

struct Task {
  int64_t b, t0, t1;
};

// Partial state of one task: per query head m, l, then head_dim accumulators.
struct Partials {
  int64_t n_heads, hd;
  std::vector<float> data;
  float* m(int64_t task) { return data.data() + task * n_heads * (hd + 2); }
  float* l(int64_t task) { return m(task) + n_heads; }
  float* acc(int64_t task) { return l(task) + n_heads; }
};

struct Job {
  const LayerCache::Impl* c = nullptr;  // null for the dense baseline
  const DenseKv* dense = nullptr;
  cpu::Isa isa;
  std::vector<Task> tasks;
  std::vector<const LayerCache::Impl::Seq*> seqs;
  const float* q = nullptr;  // [batch][n_heads][hd], prepared for the kernel
  const float* q_partner = nullptr;  // quantized path: ChunkArgs::q_partner, same shape
  int64_t n_heads = 0, hd = 0;
  float scale = 1;
  Partials* parts = nullptr;
  std::vector<float>* scratch = nullptr;  // per participant
  int64_t scratch_floats = 0;
  int64_t task_state_floats = 0;  // after the scratch: ChunkArgs::vout
  int64_t chunk = 0;
};

void run_task(void* ctx, int64_t ti, int worker) {
  const Job& j = *static_cast<Job*>(ctx);
  const Task& task = j.tasks[size_t(ti)];
  // 64-byte aligned: the kernels' tables are read in whole cache lines.
  float* scratch = LayerCache::Impl::align64(j.scratch[worker].data());
  float* kernel_scratch = scratch;
  float* task_state = scratch + j.scratch_floats;
  float* m = j.parts->m(ti);
  float* l = j.parts->l(ti);
  float* acc = j.parts->acc(ti);
  std::fill(m, m + j.n_heads, -INFINITY);
  std::fill(l, l + j.n_heads, 0.0f);
  std::fill(acc, acc + j.n_heads * j.hd, 0.0f);
  ChunkArgs a{};
  a.q = j.q + task.b * j.n_heads * j.hd;
  if (j.q_partner) a.q_partner = j.q_partner + task.b * j.n_heads * j.hd;
  a.n_heads = j.n_heads;
  a.head_dim = j.hd;
  a.scale = j.scale;
  a.m = m;
  a.l = l;
  a.acc = acc;
  a.scratch = kernel_scratch;
  if (j.c) {
    const auto& c = *j.c;
    const auto& s = *j.seqs[size_t(task.b)];
    a.n_kv = c.n_kv;
    a.block_tokens = c.block_tokens;
    a.k_bytes = c.lay.k_bytes;
    a.v_bytes = c.lay.v_bytes;
    a.k_index_bytes = c.lay.k_index_bytes;
    a.v_index_bytes = c.lay.v_index_bytes;
    a.v_region = c.v_region;
    a.slots = c.slots;
    a.bits_k = c.bits_k;
    a.bits_v = c.bits_v;
    a.k_scale = c.k_scale.data();
    a.k_offset = c.k_offset.data();
    a.k_cb = c.k_cb;
    a.k_lut = c.k_lut();
    a.v_cb = c.v_cb;
    a.sink_k = s.sink_k.data();
    a.sink_v = s.sink_v.data();
    a.sink_len = std::min<int64_t>(c.sink, s.len);
    // The rotation at the split's first position in double, advanced exactly a page at a time; the
    // kernel rounds it to fp32 once per page and multiplies by the per-offset steps.
    const int64_t half = j.hd / 2, hp = c.table.padded_half();
    std::vector<double> bc(static_cast<size_t>(half)), bs(static_cast<size_t>(half));
    std::vector<float> bcf(size_t(hp), 0.0f), bsf(size_t(hp), 0.0f);
    c.table.base(task.t0, bc.data(), bs.data());
    a.base_cos = bcf.data();
    a.base_sin = bsf.data();
    a.step_cos = c.table.step_cos();
    a.step_sin = c.table.step_sin();
    a.step_cos_t = c.table.step_cos_t();
    a.step_sin_t = c.table.step_sin_t();
    a.step_stride = c.table.step_stride();
    a.vout = task_state;
    for (int64_t t = task.t0; t < task.t1; t += c.block_tokens) {
      a.first_chunk = t == task.t0;
      a.t0 = t;
      a.n = std::min<int64_t>(c.block_tokens, task.t1 - t);
      a.page = c.pages[size_t(s.blocks[size_t(t / c.block_tokens)])].data();
      a.t_in_page = t % c.block_tokens;
      a.next_page = t + c.block_tokens < task.t1 ? c.pages[size_t(s.blocks[size_t(t / c.block_tokens + 1)])].data() : nullptr;
      for (int64_t i = 0; i < half; ++i) bcf[size_t(i)] = float(bc[size_t(i)]), bsf[size_t(i)] = float(bs[size_t(i)]);
      c.table.advance(bc.data(), bs.data());
      if (j.isa == cpu::Isa::avx512)
        detail::chunk_avx512(a);
      else
        detail::chunk_avx2(a);
    }
    if (j.isa == cpu::Isa::avx512) detail::finish_task_avx512(a);
  } else {
    const DenseKv& d = *j.dense;
    a.n_kv = d.n_kv_heads;
    a.dense_bf16 = d.bf16;
    a.dense_head_stride = d.head_stride;
    const size_t elem = d.bf16 ? 2 : 4;
    for (int64_t t = task.t0; t < task.t1; t += j.chunk) {
      a.t0 = t;
      a.n = std::min<int64_t>(j.chunk, task.t1 - t);
      const size_t off = size_t(task.b * d.seq_stride + t * d.head_dim) * elem;
      a.dense_k = static_cast<const uint8_t*>(d.k) + off;
      a.dense_v = static_cast<const uint8_t*>(d.v) + off;
      if (j.isa == cpu::Isa::avx512)
        detail::dense_chunk_avx512(a);
      else
        detail::dense_chunk_avx2(a);
    }
  }
}

// Splits every sequence into tasks of split_tokens, runs them, and merges each sequence's partials in
// order into out [batch][n_heads][hd] (model order).
void run_and_merge(Job& j, const std::vector<int64_t>& lengths, int64_t split, int threads, float* out) {
  std::vector<int64_t> first(lengths.size() + 1, 0);
  for (size_t b = 0; b < lengths.size(); ++b) {
    for (int64_t t = 0; t < lengths[b]; t += split) j.tasks.push_back({int64_t(b), t, std::min(lengths[b], t + split)});
    first[b + 1] = int64_t(j.tasks.size());
  }
  Partials parts{j.n_heads, j.hd, {}};
  parts.data.resize(j.tasks.size() * size_t(j.n_heads * (j.hd + 2)));
  j.parts = &parts;
  const int64_t tasks = int64_t(j.tasks.size());
  const int participants = cpu::detail::max_participants(tasks, threads);
  std::vector<std::vector<float>> scratch(size_t(participants),
                                         std::vector<float>(size_t(j.scratch_floats + j.task_state_floats + 16)));
  j.scratch = scratch.data();
  cpu::detail::parallel_for(tasks, threads, run_task, &j);
  for (size_t b = 0; b < lengths.size(); ++b)
    for (int64_t h = 0; h < j.n_heads; ++h) {
      float mx = -INFINITY;
      for (int64_t t = first[b]; t < first[b + 1]; ++t) mx = std::max(mx, parts.m(t)[h]);
      double sum = 0;
      std::vector<double> o(size_t(j.hd), 0.0);
      for (int64_t t = first[b]; t < first[b + 1]; ++t) {
        const double w = std::exp(double(parts.m(t)[h]) - double(mx));
        sum += w * parts.l(t)[h];
        const float* acc = parts.acc(t) + h * j.hd;
        for (int64_t i = 0; i < j.hd; ++i) o[size_t(i)] += w * acc[i];
      }
      float* dst = out + (int64_t(b) * j.n_heads + h) * j.hd;
      for (int64_t i = 0; i < j.hd; ++i) dst[i] = float(o[size_t(i)] / sum);
    }
}

int64_t kernel_scratch_floats(int64_t n_heads, int64_t hd, int64_t chunk) {
  // The kernels' cos/sin tables (rows padded to 16 pairs, columns to 16 positions), V rows,
  // [group][kMaxChunkTokens] scores and value weights, [group][hd] outlier sums, [group] offset sums,
  // the AVX-512 kernel's value-outlier buffers.
  const int64_t chunk16 = (chunk + 15) / 16 * 16;
  return 2 * chunk16 * ((hd / 2 + 15) / 16 * 16) + chunk * hd + n_heads * (2 * kMaxChunkTokens + hd + 16) +
         16 * kMaxChunkTokens + 64;
}

// Checks the arguments; returns the number of tokens each batch row attends to.
std::vector<int64_t> check_batch(const LayerCache::Impl& c, std::span<const int> seqs, const void* q, int64_t n_heads,
                                 const void* out, const AttentionOptions& options) {
  NUQ_CHECK(!seqs.empty(), Errc::invalid_argument, "KV attention: empty batch");
  NUQ_CHECK(q != nullptr && out != nullptr, Errc::invalid_argument, "KV attention: query or output is null");
  NUQ_CHECK(n_heads > 0 && n_heads % c.n_kv == 0, Errc::invalid_argument,
            "KV attention: {} query heads are not a positive multiple of the cache's {} kv heads", n_heads, c.n_kv);
  NUQ_CHECK(options.lengths.empty() || options.lengths.size() == seqs.size(), Errc::invalid_argument,
            "KV attention: {} lengths for a batch of {} rows", options.lengths.size(), seqs.size());
  std::vector<int64_t> lengths(seqs.size());
  for (size_t b = 0; b < seqs.size(); ++b) {
    const int64_t len = c.seq(seqs[b]).len;
    NUQ_CHECK(len > 0, Errc::invalid_argument, "KV attention: sequence {} (batch row {}) is empty", seqs[b], b);
    lengths[b] = options.lengths.empty() ? len : options.lengths[b];
    NUQ_CHECK(lengths[b] >= 1 && lengths[b] <= len, Errc::invalid_argument,
              "KV attention: batch row {} asks for the first {} tokens of sequence {}, which holds {}", b, lengths[b],
              seqs[b], len);
  }
  return lengths;
}

}  // namespace

void decode_attention_reference(const LayerCache& cache, std::span<const int> seqs, const float* q, int64_t n_heads,
                                float* out, const AttentionOptions& options) {
  const auto& c = cache.impl();
  const std::vector<int64_t> lengths = check_batch(c, seqs, q, n_heads, out, options);
  const int64_t hd = c.hd, half = hd / 2, group = n_heads / c.n_kv;
  const double scale = options.scale > 0 ? options.scale : 1.0 / std::sqrt(double(hd));
  // Frequencies from the definition, and every angle from std::cos/sin of (position * frequency) in
  // double: independent of the kernels' chunked tables.
  const std::vector<double> freq = detail::rope_frequencies(c.rope, hd);
  auto rotate = [&](std::vector<double>& x, int64_t pos) {
    for (int64_t i = 0; i < half; ++i) {
      int64_t a, b;
      detail::pair_channels(c.rope.layout, half, i, a, b);
      const double ang = double(pos) * freq[size_t(i)];
      const double cs = std::cos(ang), sn = std::sin(ang), x0 = x[size_t(a)], x1 = x[size_t(b)];
      x[size_t(a)] = x0 * cs - x1 * sn;
      x[size_t(b)] = x0 * sn + x1 * cs;
    }
  };
  std::vector<float> kf(static_cast<size_t>(hd)), vf(static_cast<size_t>(hd));
  std::vector<double> k(static_cast<size_t>(hd)), qv(static_cast<size_t>(hd));
  for (size_t bi = 0; bi < seqs.size(); ++bi) {
    const auto& s = c.seq(seqs[bi]);
    const int64_t len = lengths[bi];
    std::vector<double> score(static_cast<size_t>(len * group));
    std::vector<std::vector<double>> acc(size_t(group), std::vector<double>(size_t(hd), 0.0));
    for (int64_t h = 0; h < c.n_kv; ++h) {
      std::vector<std::vector<double>> qs(static_cast<size_t>(group));
      for (int64_t g = 0; g < group; ++g) {
        const float* src = q + (int64_t(bi) * n_heads + h * group + g) * hd;
        qs[size_t(g)].assign(src, src + hd);
        if (!options.query_has_rope) rotate(qs[size_t(g)], len - 1);
      }
      for (int64_t t = 0; t < len; ++t) {
        c.dequantize_token(s, h, t, kf.data(), vf.data());
        k.assign(kf.begin(), kf.end());
        rotate(k, t);
        for (int64_t g = 0; g < group; ++g) {
          double d = 0;
          for (int64_t i = 0; i < hd; ++i) d += qs[size_t(g)][size_t(i)] * k[size_t(i)];
          score[size_t(g * len + t)] = d * scale;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        double mx = -INFINITY, sum = 0;
        for (int64_t t = 0; t < len; ++t) mx = std::max(mx, score[size_t(g * len + t)]);
        for (int64_t t = 0; t < len; ++t) sum += score[size_t(g * len + t)] = std::exp(score[size_t(g * len + t)] - mx);
        std::fill(acc[size_t(g)].begin(), acc[size_t(g)].end(), 0.0);
        for (int64_t t = 0; t < len; ++t) {
          c.dequantize_token(s, h, t, kf.data(), vf.data());
          const double p = score[size_t(g * len + t)] / sum;
          for (int64_t i = 0; i < hd; ++i) acc[size_t(g)][size_t(i)] += p * vf[size_t(i)];
        }
        float* dst = out + (int64_t(bi) * n_heads + h * group + g) * hd;
        for (int64_t i = 0; i < hd; ++i) dst[i] = float(acc[size_t(g)][size_t(i)]);
      }
    }
  }
}

void decode_attention(const LayerCache& cache, std::span<const int> seqs, const float* q, int64_t n_heads,
                      float* out, const AttentionOptions& options) {
  const auto& c = cache.impl();
  const std::vector<int64_t> lengths = check_batch(c, seqs, q, n_heads, out, options);
  const cpu::Isa isa = resolve(options);
  NUQ_CHECK(options.split_tokens > 0 && options.split_tokens % c.block_tokens == 0, Errc::invalid_argument,
            "KV attention: split_tokens {} must be a positive multiple of the page size {}", options.split_tokens,
            c.block_tokens);
  if (isa == cpu::Isa::scalar) return decode_attention_reference(cache, seqs, q, n_heads, out, options);
  const int64_t hd = c.hd, half = hd / 2, batch = int64_t(seqs.size());
  Job j;
  j.c = &c;
  j.isa = isa;
  j.n_heads = n_heads;
  j.hd = hd;
  j.scale = options.scale > 0 ? options.scale : float(1.0 / std::sqrt(double(hd)));
  j.chunk = c.block_tokens;
  j.scratch_floats = kernel_scratch_floats(n_heads, hd, j.chunk);
  if (isa == cpu::Isa::avx512) j.task_state_floats = detail::task_state_floats_avx512(c.n_kv, hd, n_heads);
  // Queries: rotated to their position (lengths[b] - 1) with the kernels' own table, then permuted to the
  // keys' storage order so that q · k is the same sum.
  std::vector<float> qs(static_cast<size_t>(batch * n_heads * hd)), cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
  for (int64_t b = 0; b < batch; ++b) {
    j.seqs.push_back(&c.seq(seqs[size_t(b)]));
    if (!options.query_has_rope) c.table.fill(lengths[size_t(b)] - 1, 1, cs.data(), sn.data());
    for (int64_t h = 0; h < n_heads; ++h) {
      std::vector<float> x(q + (b * n_heads + h) * hd, q + (b * n_heads + h + 1) * hd);
      if (!options.query_has_rope)
        for (int64_t i = 0; i < half; ++i) {
          int64_t a0, b0;
          detail::pair_channels(c.rope.layout, half, i, a0, b0);
          const float x0 = x[size_t(a0)], x1 = x[size_t(b0)];
          x[size_t(a0)] = x0 * cs[size_t(i)] - x1 * sn[size_t(i)];
          x[size_t(b0)] = x0 * sn[size_t(i)] + x1 * cs[size_t(i)];
        }
      for (int64_t p = 0; p < hd; ++p) qs[size_t((b * n_heads + h) * hd + p)] = x[size_t(c.storage[size_t(p)])];
    }
  }
  std::vector<float> qp(qs.size());
  for (size_t r = 0; r < qs.size(); r += size_t(hd))
    for (int64_t p = 0; p < hd; ++p) qp[r + size_t(p)] = p % 16 < 8 ? qs[r + size_t(p + 8)] : -qs[r + size_t(p - 8)];
  j.q = qs.data();
  j.q_partner = qp.data();
  run_and_merge(j, lengths, options.split_tokens, options.threads, out);
}

void decode_attention_bf16(const LayerCache& cache, std::span<const int> seqs, const uint16_t* q, int64_t n_heads,
                           uint16_t* out, const AttentionOptions& options) {
  NUQ_CHECK(q != nullptr && out != nullptr, Errc::invalid_argument, "KV attention: query or output is null");
  const int64_t n = int64_t(seqs.size()) * n_heads * cache.head_dim();
  std::vector<float> qf(static_cast<size_t>(std::max<int64_t>(n, 0))), of(qf.size());
  for (int64_t i = 0; i < n; ++i) qf[size_t(i)] = bf16_to_float(q[i]);
  decode_attention(cache, seqs, qf.data(), n_heads, of.data(), options);
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(of[size_t(i)]);
}

void dense_decode_attention(const DenseKv& kv, std::span<const int64_t> lengths, const float* q, int64_t n_heads,
                            float* out, const AttentionOptions& options) {
  NUQ_CHECK(kv.k != nullptr && kv.v != nullptr && q != nullptr && out != nullptr, Errc::invalid_argument,
            "dense attention: a null pointer among k, v, q, out");
  NUQ_CHECK(kv.head_dim == 64 || kv.head_dim == 80 || kv.head_dim == 96 || kv.head_dim == 128, Errc::invalid_argument,
            "dense attention: head_dim {} is not supported (64, 80, 96, 128)", kv.head_dim);
  NUQ_CHECK(kv.n_kv_heads > 0 && n_heads > 0 && n_heads % kv.n_kv_heads == 0, Errc::invalid_argument,
            "dense attention: {} query heads are not a multiple of {} kv heads", n_heads, kv.n_kv_heads);
  NUQ_CHECK(!lengths.empty(), Errc::invalid_argument, "dense attention: empty batch");
  NUQ_CHECK(options.lengths.empty(), Errc::invalid_argument,
            "dense attention: AttentionOptions::lengths is for the quantized cache; pass the lengths argument");
  for (size_t b = 0; b < lengths.size(); ++b) {
    NUQ_CHECK(lengths[b] > 0, Errc::invalid_argument, "dense attention: batch row {} has length {}", b, lengths[b]);
    NUQ_CHECK(kv.head_stride >= lengths[b] * kv.head_dim, Errc::invalid_argument,
              "dense attention: head_stride {} cannot hold {} tokens", kv.head_stride, lengths[b]);
  }
  const cpu::Isa isa = resolve(options);
  const int64_t hd = kv.head_dim, group = n_heads / kv.n_kv_heads;
  const float scale = options.scale > 0 ? options.scale : float(1.0 / std::sqrt(double(hd)));
  if (isa == cpu::Isa::scalar) {
    // Plain two-pass softmax in double: the fp32 attention the quantized kernels are measured against.
    auto at = [&](const void* base, int64_t i) {
      return kv.bf16 ? double(bf16_to_float(static_cast<const uint16_t*>(base)[i]))
                     : double(static_cast<const float*>(base)[i]);
    };
    for (size_t b = 0; b < lengths.size(); ++b)
      for (int64_t h = 0; h < n_heads; ++h) {
        const int64_t base = int64_t(b) * kv.seq_stride + (h / group) * kv.head_stride, len = lengths[b];
        const float* qh = q + (int64_t(b) * n_heads + h) * hd;
        std::vector<double> s(static_cast<size_t>(len));
        double mx = -INFINITY, sum = 0;
        for (int64_t t = 0; t < len; ++t) {
          double d = 0;
          for (int64_t i = 0; i < hd; ++i) d += double(qh[i]) * at(kv.k, base + t * hd + i);
          s[size_t(t)] = d * scale;
          mx = std::max(mx, s[size_t(t)]);
        }
        for (auto& x : s) sum += x = std::exp(x - mx);
        for (int64_t i = 0; i < hd; ++i) {
          double o = 0;
          for (int64_t t = 0; t < len; ++t) o += s[size_t(t)] * at(kv.v, base + t * hd + i);
          out[(int64_t(b) * n_heads + h) * hd + i] = float(o / sum);
        }
      }
    return;
  }
  Job j;
  j.dense = &kv;
  j.isa = isa;
  j.n_heads = n_heads;
  j.hd = hd;
  j.scale = scale;
  j.chunk = 64;
  j.scratch_floats = kernel_scratch_floats(n_heads, hd, j.chunk);
  j.q = q;
  NUQ_CHECK(options.split_tokens > 0 && options.split_tokens % j.chunk == 0, Errc::invalid_argument,
            "dense attention: split_tokens {} must be a positive multiple of {}", options.split_tokens, j.chunk);
  run_and_merge(j, std::vector<int64_t>(lengths.begin(), lengths.end()), options.split_tokens, options.threads, out);
}

}  // namespace nuq::kv
