// Decode attention over one page-sized chunk, written once over a SIMD trait S and included by the
// AVX2 and AVX-512 translation units inside an anonymous namespace (kv_attention_kernel.hpp says why).
// The AVX-512 unit uses the dense baseline and the softmax/accumulation helpers only: its quantized
// kernel is token-parallel (kv_attention_avx512.cpp).
//
// S provides: L (lanes), V (vector type), Cb (codebook registers), load/store/set1/zero/fmadd/mul/max,
// hsum, exp (vector, relative error < 2e-7 over the range softmax uses), codebook(const float*),
// decode<B>(indices, vector j, Cb) -> the codebook values of indices j*L .. j*L + L - 1,
// rotate_block(registers, b, cos8, sin8) for the 16-channel storage block b (8 first members of pairs,
// then their 8 partners), load_fp16, load_bf16.

inline float fp16_scalar(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Folds the scaled scores sc[0 .. n) of query head hg into its running state and leaves the softmax
// weights exp(score - new max) in sc.
template <class S>
void softmax_update(const ChunkArgs& a, int64_t hg, float* sc, int64_t n) {
  using V = typename S::V;
  float mx = sc[0];
  for (int64_t i = 1; i < n; ++i) mx = sc[i] > mx ? sc[i] : mx;
  const float m_old = a.m[hg];
  const float m_new = m_old > mx ? m_old : mx;
  const int64_t padded = (n + S::L - 1) / S::L * S::L;
  for (int64_t i = n; i < padded; ++i) sc[i] = -1e30f;
  const V mv = S::set1(m_new);
  V sum = S::zero();
  for (int64_t i = 0; i < padded; i += S::L) {
    const V p = S::exp(S::sub(S::load(sc + i), mv));
    S::store(sc + i, p);
    sum = S::add(sum, p);
  }
  float total = S::hsum(sum);
  for (int64_t i = n; i < padded; ++i) total -= sc[i];  // the padding's (underflowed) weights
  // The first chunk has m_old = -inf and nothing accumulated: the correction is irrelevant but must
  // not turn 0 * inf into NaN.
  const float corr = m_old == -__builtin_inff() ? 0.0f : S::exp1(m_old - m_new);
  a.l[hg] = a.l[hg] * corr + total;
  a.m[hg] = m_new;
  float* acc = a.acc + hg * a.head_dim;
  const V cv = S::set1(corr);
  for (int64_t j = 0; j < a.head_dim; j += S::L) S::store(acc + j, S::mul(S::load(acc + j), cv));
}

// Largest divisor of nv that is at most 8: the V accumulators of one pass stay in registers.
constexpr int acc_block(int nv) {
  for (int w = 8; w > 1; --w)
    if (nv % w == 0) return w;
  return 1;
}

// acc[g] += sum_i p[g][i] * rows[i] for the group's query heads, with the accumulators in registers
// (row i at rows + i * row_stride, fp32 or bf16).
template <class S, int NV, bool Bf16 = false, class T = float>
void accumulate_rows(const ChunkArgs& a, int64_t h, int64_t group, const T* rows, int64_t row_stride,
                     const float* sc, int64_t n) {
  using V = typename S::V;
  constexpr int W = acc_block(NV);
  for (int64_t g = 0; g < group; ++g) {
    float* acc = a.acc + (h * group + g) * a.head_dim;
    const float* p = sc + g * kMaxChunkTokens;
    for (int j0 = 0; j0 < NV; j0 += W) {
      V r[W];
      for (int j = 0; j < W; ++j) r[j] = S::load(acc + (j0 + j) * S::L);
      for (int64_t i = 0; i < n; ++i) {
        const V pv = S::set1(p[i]);
        const T* row = rows + i * row_stride + j0 * S::L;
        for (int j = 0; j < W; ++j) {
          if constexpr (Bf16)
            r[j] = S::fmadd(pv, S::load_bf16(row + j * S::L), r[j]);
          else
            r[j] = S::fmadd(pv, S::load(row + j * S::L), r[j]);
        }
      }
      for (int j = 0; j < W; ++j) S::store(acc + (j0 + j) * S::L, r[j]);
    }
  }
}

// Always inlined: the key registers must not be spilled to pass them by pointer.
template <class S, int NV, class KV>
__attribute__((always_inline)) inline void scores_from(const ChunkArgs& a, int64_t h, int64_t group, const KV* kr, float* sc, int64_t i) {
  using V = typename S::V;
  int64_t g = 0;
  for (; g + 4 <= group; g += 4) {
    const float* q = a.q + (h * group + g) * a.head_dim;
    const int64_t hd = a.head_dim;
    V s0 = S::zero(), s1 = S::zero(), s2 = S::zero(), s3 = S::zero();
    for (int j = 0; j < NV; ++j) {
      s0 = S::fmadd(kr[j], S::load(q + j * S::L), s0);
      s1 = S::fmadd(kr[j], S::load(q + hd + j * S::L), s1);
      s2 = S::fmadd(kr[j], S::load(q + 2 * hd + j * S::L), s2);
      s3 = S::fmadd(kr[j], S::load(q + 3 * hd + j * S::L), s3);
    }
    float sums[4];
    S::hsum4(s0, s1, s2, s3, sums);
    for (int k = 0; k < 4; ++k) sc[(g + k) * kMaxChunkTokens + i] = sums[k] * a.scale;
  }
  for (; g < group; ++g) {
    const float* q = a.q + (h * group + g) * a.head_dim;
    V s0 = S::zero(), s1 = S::zero();
    for (int j = 0; j + 1 < NV; j += 2) {
      s0 = S::fmadd(kr[j], S::load(q + j * S::L), s0);
      s1 = S::fmadd(kr[j + 1], S::load(q + (j + 1) * S::L), s1);
    }
    if (NV % 2) s0 = S::fmadd(kr[NV - 1], S::load(q + (NV - 1) * S::L), s0);
    sc[g * kMaxChunkTokens + i] = S::hsum(S::add(s0, s1)) * a.scale;
  }
}

// Decodes K in registers (dequantize, RoPE), scores it against the group's queries, folds the outlier
// residuals into the scores (a residual d at storage channel p moves the rotated key by d times the
// rotation's column p), then decodes V rows once into a buffer that every query head accumulates from.
template <class S, int BK, int BV, int NV>
void chunk_impl(const ChunkArgs& a) {
  using V = typename S::V;
  constexpr int64_t L = S::L;
  constexpr int64_t hd = NV * L;
  const int64_t group = a.n_heads / a.n_kv, n = a.n;
  constexpr int64_t hp = (hd / 2 + 15) / 16 * 16;
  float* cosv = a.scratch;                   // [n][hp]
  float* sinv = cosv + a.block_tokens * hp;
  float* vbuf = sinv + a.block_tokens * hp;  // [block_tokens][hd]
  float* sc = vbuf + a.block_tokens * hd;    // [group][kMaxChunkTokens]
  float* sp = sc + group * kMaxChunkTokens;  // [group][hd] outlier parts of the V sums
  const typename S::Cb kcb = S::codebook(a.k_cb), vcb = S::codebook(a.v_cb);
  // cos/sin of every position of the chunk, shared by all kv heads: (bc + i bs)(step_c + i step_s).
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < hp; p += L) {
      const V bc = S::load(a.base_cos + p), bs = S::load(a.base_sin + p);
      const V sc_ = S::load(a.step_cos + i * hp + p), ss = S::load(a.step_sin + i * hp + p);
      S::store(cosv + i * hp + p, S::fmsub(bc, sc_, S::mul(bs, ss)));
      S::store(sinv + i * hp + p, S::fmadd(bs, sc_, S::mul(bc, ss)));
    }
  for (int64_t h = 0; h < a.n_kv; ++h) {
    const uint8_t* krec = a.page + (h * a.block_tokens + a.t_in_page) * a.k_bytes;
    const uint8_t* vrec = a.page + a.v_region + (h * a.block_tokens + a.t_in_page) * a.v_bytes;
    const float* ks = a.k_scale + h * hd;
    const float* ko = a.k_offset + h * hd;
    for (int64_t i = 0; i < n; ++i, krec += a.k_bytes) {
      const int64_t pos = a.t0 + i;
      const bool sink = pos < a.sink_len;
      V kr[NV];
      if (sink) {
        const uint16_t* src = a.sink_k + (pos * a.n_kv + h) * hd;
        for (int j = 0; j < NV; ++j) kr[j] = S::load_fp16(src + j * L);
      } else {
        for (int j = 0; j < NV; ++j)
          kr[j] = S::fmadd(S::template decode<BK>(krec, j, kcb), S::load(ks + j * L), S::load(ko + j * L));
      }
      const float* c = cosv + i * hp;
      const float* sn = sinv + i * hp;
      for (int b = 0; b < int(hd / 16); ++b) S::rotate_block(kr, b, c + 8 * b, sn + 8 * b);
      scores_from<S, NV>(a, h, group, kr, sc, i);
      if (!sink) {
        const uint8_t* chan = krec + a.k_index_bytes;
        for (int s = 0; s < a.slots; ++s) {
          const int p = chan[s];
          const float d = fp16_scalar(chan + a.slots + 2 * s) * a.scale;
          const int pair = p / 16 * 8 + p % 8;
          const bool first = p % 16 < 8;
          const float cp = c[pair], sp_ = first ? sn[pair] : -sn[pair];
          const int partner = first ? p + 8 : p - 8;
          for (int64_t g = 0; g < group; ++g) {
            const float* q = a.q + (h * group + g) * hd;
            sc[g * kMaxChunkTokens + i] += d * (cp * q[p] + sp_ * q[partner]);
          }
        }
      }
    }
    for (int64_t g = 0; g < group; ++g) softmax_update<S>(a, h * group + g, sc + g * kMaxChunkTokens, n);
    for (int64_t g = 0; g < group * hd; ++g) sp[g] = 0;
    for (int64_t i = 0; i < n; ++i, vrec += a.v_bytes) {
      const int64_t pos = a.t0 + i;
      float* row = vbuf + i * hd;
      if (pos < a.sink_len) {
        const uint16_t* src = a.sink_v + (pos * a.n_kv + h) * hd;
        for (int j = 0; j < NV; ++j) S::store(row + j * L, S::load_fp16(src + j * L));
      } else {
        const V vs = S::set1(fp16_scalar(vrec)), vo = S::set1(fp16_scalar(vrec + 2));
        const uint8_t* idx = vrec + 4;
        for (int j = 0; j < NV; ++j) S::store(row + j * L, S::fmadd(S::template decode<BV>(idx, j, vcb), vs, vo));
        const uint8_t* chan = idx + a.v_index_bytes;
        for (int s = 0; s < a.slots; ++s) {
          const float d = fp16_scalar(chan + a.slots + 2 * s);
          for (int64_t g = 0; g < group; ++g) sp[g * hd + chan[s]] += sc[g * kMaxChunkTokens + i] * d;
        }
      }
    }
    accumulate_rows<S, NV>(a, h, group, vbuf, hd, sc, n);
    for (int64_t g = 0; g < group; ++g) {
      float* acc = a.acc + (h * group + g) * hd;
      for (int64_t j = 0; j < hd; j += L) S::store(acc + j, S::add(S::load(acc + j), S::load(sp + g * hd + j)));
    }
  }
}

// The unquantized baseline: keys already rotated, model order; the same softmax and accumulation.
template <class S, int NV>
void dense_chunk_impl(const ChunkArgs& a) {
  using V = typename S::V;
  constexpr int64_t L = S::L;
  constexpr int64_t hd = NV * L;
  const int64_t group = a.n_heads / a.n_kv, n = a.n;
  float* sc = a.scratch;
  for (int64_t h = 0; h < a.n_kv; ++h) {
    const int64_t base = h * a.dense_head_stride;
    for (int64_t i = 0; i < n; ++i) {
      V kr[NV];
      if (a.dense_bf16) {
        const uint16_t* k = static_cast<const uint16_t*>(a.dense_k) + base + i * hd;
        for (int j = 0; j < NV; ++j) kr[j] = S::load_bf16(k + j * L);
      } else {
        const float* k = static_cast<const float*>(a.dense_k) + base + i * hd;
        for (int j = 0; j < NV; ++j) kr[j] = S::load(k + j * L);
      }
      scores_from<S, NV>(a, h, group, kr, sc, i);
    }
    for (int64_t g = 0; g < group; ++g) softmax_update<S>(a, h * group + g, sc + g * kMaxChunkTokens, n);
    if (a.dense_bf16)
      accumulate_rows<S, NV, true>(a, h, group, static_cast<const uint16_t*>(a.dense_v) + base, hd, sc, n);
    else
      accumulate_rows<S, NV>(a, h, group, static_cast<const float*>(a.dense_v) + base, hd, sc, n);
  }
}

template <class S, int NV>
void chunk_bits(const ChunkArgs& a) {
#define NUQ_KV_CASE(bk, bv) \
  case bk * 8 + bv: return chunk_impl<S, bk, bv, NV>(a);
  switch (a.bits_k * 8 + a.bits_v) {
    NUQ_KV_CASE(2, 2) NUQ_KV_CASE(2, 3) NUQ_KV_CASE(2, 4)
    NUQ_KV_CASE(3, 2) NUQ_KV_CASE(3, 3) NUQ_KV_CASE(3, 4)
    NUQ_KV_CASE(4, 2) NUQ_KV_CASE(4, 3) NUQ_KV_CASE(4, 4)
    default: break;
  }
#undef NUQ_KV_CASE
}

// Head dims 64, 80, 96, 128 (the dispatcher refuses others).
template <class S>
void chunk_dispatch(const ChunkArgs& a) {
  switch (a.head_dim) {
    case 64: return chunk_bits<S, int(64 / S::L)>(a);
    case 80: return chunk_bits<S, int(80 / S::L)>(a);
    case 96: return chunk_bits<S, int(96 / S::L)>(a);
    case 128: return chunk_bits<S, int(128 / S::L)>(a);
    default: break;
  }
}

template <class S>
void dense_dispatch(const ChunkArgs& a) {
  switch (a.head_dim) {
    case 64: return dense_chunk_impl<S, int(64 / S::L)>(a);
    case 80: return dense_chunk_impl<S, int(80 / S::L)>(a);
    case 96: return dense_chunk_impl<S, int(96 / S::L)>(a);
    case 128: return dense_chunk_impl<S, int(128 / S::L)>(a);
    default: break;
  }
}
