// Kernel bodies shared by the per-ISA translation units. Included inside an anonymous namespace after
// the including unit has defined:
//   float h2f(uint16_t)  fp16 bits -> fp32, exact
//   struct S256 / S512   SIMD traits (see linear_avx2.cpp)
// It includes nothing itself, so that every function it defines gets internal linkage in that unit
// (see linear_kernel.hpp for why that matters).
//
// Decode strategy (docs/cpu-kernels.md): a 32-bit lane holds per_word consecutive fields of the low
// plane; shifting the whole vector right by bits·s puts field s of every lane at the bottom, so one
// shift and one vpermps table look-up decode `lanes` weights. Lane l at step s is column
// l·per_word + s of the chunk, which is why the activations are reordered once per call (xr).

// Calls f(std::integral_constant<int, bits>) for a supported width; the one place widths become
// template arguments.
template <class F>
inline void with_bits(int bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); return;
    case 3: f(std::integral_constant<int, 3>{}); return;
    case 4: f(std::integral_constant<int, 4>{}); return;
    default: ::nuq::cpu::detail::kernel_unsupported("bits", bits);
  }
}

inline int64_t sparse_column(const ::nuq::cpu::detail::KernelArgs& a, int64_t k) {
  return a.col16 ? int64_t(static_cast<const uint16_t*>(a.col_idx)[k]) : int64_t(static_cast<const int32_t*>(a.col_idx)[k]);
}

// Row r of W in natural column order (cols floats), bit-identical to nuq::dequantize_reference: the
// codebook value, then the sparse residual added in fp32.
template <int BITS>
inline void decode_row_t(const ::nuq::cpu::detail::KernelArgs& a, int64_t r, float* out) {
  constexpr int E = 1 << BITS;
  const uint8_t* row = a.qweight + r * a.stride;
  const uint8_t* hi = row + a.padded / 4;
  const uint16_t* lut = a.lut + r * a.groups * E;
  float t[E];
  for (int64_t g = 0; g < a.groups; ++g) {
    for (int e = 0; e < E; ++e) t[e] = h2f(lut[g * E + e]);
    const int64_t end = (g + 1) * a.group_size;
    for (int64_t c = g * a.group_size; c < end; ++c) {
      int i;
      if constexpr (BITS == 4) {
        i = (row[c >> 1] >> ((c & 1) << 2)) & 15;
      } else {
        i = (row[c >> 2] >> ((c & 3) << 1)) & 3;
        if constexpr (BITS == 3) i |= ((hi[c >> 3] >> (c & 7)) & 1) << 2;
      }
      out[c] = t[i];
    }
  }
  if (a.nnz > 0)
    for (int64_t k = a.row_ptr[r]; k < a.row_ptr[r + 1]; ++k) out[sparse_column(a, k)] += h2f(a.values[k]);
}

inline void decode_row(const ::nuq::cpu::detail::KernelArgs& a, int64_t r, float* out) {
  with_bits(a.bits, [&](auto b) { decode_row_t<decltype(b)::value>(a, r, out); });
}

#ifdef NUQ_KERNEL_SIMD

#ifndef NUQ_PREFETCH_BYTES
#define NUQ_PREFETCH_BYTES 16384
#endif

template <int... I, class F>
inline void unroll(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}

// Rows [r, r + R) for batch rows [b0, b0 + BT), the codebook groups aligned with the chunks. R·BT
// accumulator sets stay in registers for the whole row: each decoded weight vector feeds BT FMAs and
// each activation vector fetched from L2 feeds R rows (the kernel is otherwise bound by reloading
// activations from L2). With few batch rows, steps rotate over S::chains(BT) accumulators per row to
// hide FMA latency. The summation order of a row does not depend on R.
template <class S, int BITS, int BT, int R>
inline void gemv_rows_aligned(const ::nuq::cpu::detail::KernelArgs& a, int64_t r, int64_t b0, float* out_sum) {
  using F = typename S::F;
  using I = typename S::I;
  constexpr int W = S::W;
  constexpr int K = BITS == 4 ? 8 : 16;  // fields per 32-bit word of the low plane
  constexpr int64_t C = int64_t(W) * K;  // columns per chunk
  constexpr int E = 1 << BITS;
  constexpr int A = S::chains(BT);
  constexpr int LO = W * 4;  // low-plane bytes per chunk
  constexpr int HI = W * 2;  // top-bit-plane bytes per chunk (3 bits)
  const int64_t chunks = (a.cols + C - 1) / C;
  const int64_t lo_bytes = a.padded * (BITS == 4 ? 4 : 2) / 8;
  const int64_t hi_bytes = a.padded / 8;
  // This tile's slice of xr: [chunk][step][BT][W], so every offset below is a compile-time constant.
  const float* xt = a.xr + b0 * chunks * C;

  F acc[R][BT][A];
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < BT; ++b)
      for (int j = 0; j < A; ++j) acc[i][b][j] = S::zero();
  int64_t group = -1;
  typename S::Table table[R]{};
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t g = a.groups == 1 ? 0 : k * C / a.group_size;
    if (g != group) {
      for (int i = 0; i < R; ++i) table[i] = S::template table<BITS>(a.lut + ((r + i) * a.groups + g) * E);
      group = g;
    }
    I wlo[R], whi[R];
    // The last chunk may extend past the row (rows are padded to 64 columns, chunks are wider): copy
    // what is there and decode zeros (index 0) beyond, which meet zero activations.
    const bool tail = (k + 1) * LO > lo_bytes;
    for (int i = 0; i < R; ++i) {
      const uint8_t* row = a.qweight + (r + i) * a.stride;
      const uint8_t* lo = row + k * LO;
      const uint8_t* hi = row + a.padded / 4 + k * HI;
      alignas(64) uint8_t tail_lo[LO];
      alignas(64) uint8_t tail_hi[HI];
      if (tail) {
        const int64_t n = lo_bytes - k * LO;
        for (int j = 0; j < LO; ++j) tail_lo[j] = j < n ? lo[j] : 0;
        lo = tail_lo;
        if constexpr (BITS == 3) {
          const int64_t m = hi_bytes - k * HI;
          for (int j = 0; j < HI; ++j) tail_hi[j] = j < m ? hi[j] : 0;
          hi = tail_hi;
        }
      }
      // The hardware prefetchers alone leave the loads waiting on DRAM (measured: about a quarter of
      // the read bandwidth at batch 1); asking for the data 16 KiB ahead (best of 1-64 KiB tried,
      // docs/cpu-kernels.md) keeps enough misses in flight. The distance counts from the end of the R
      // rows of this pass (16 KiB past row i itself lands in rows the pass is already reading), so
      // this fetches the rows of the next passes. Both 3-bit planes use the same distance, so that
      // over consecutive passes the prefetched windows tile the matrix; half the distance for the
      // 1-bit plane left a third of every row's lines to demand misses.
      const int64_t ahead = R * a.stride + NUQ_PREFETCH_BYTES;
      if (!tail) {
        __builtin_prefetch(lo + ahead, 0, 3);
        if constexpr (BITS == 3) __builtin_prefetch(hi + ahead, 0, 3);
      }
      wlo[i] = S::load_words(lo);
      if constexpr (BITS == 3) whi[i] = S::template sll<2>(S::load_hi16(hi));  // top bit of step 0 at bit 2
    }
    const float* xs = xt + k * K * BT * W;
    unroll(std::make_integer_sequence<int, K>{}, [&](auto sc) {
      constexpr int s = decltype(sc)::value;
      // Row by row, so that one decoded vector is live at a time; the first row brings the step's
      // activations into L1 for the others.
      for (int i = 0; i < R; ++i) {
        I idx;
        if constexpr (BITS == 3)
          idx = S::combine3(S::template srl<2 * s>(wlo[i]), S::template srl<s>(whi[i]));
        else
          idx = S::template srl<BITS * s>(wlo[i]);
        const F v = S::template lookup<BITS>(idx, table[i]);
        for (int b = 0; b < BT; ++b) acc[i][b][s % A] = S::fmadd(v, S::load(xs + (s * BT + b) * W), acc[i][b][s % A]);
      }
    });
  }
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < BT; ++b) {
      F t = acc[i][b][0];
      if constexpr (A == 2) t = S::add(acc[i][b][0], acc[i][b][1]);
      if constexpr (A == 4) t = S::add(S::add(acc[i][b][0], acc[i][b][1]), S::add(acc[i][b][2], acc[i][b][3]));
      out_sum[i * BT + b] = S::reduce(t);
    }
}

// One row whose chunks straddle codebook groups: decoded (sparse part included) in natural order,
// then gathered into lane order. Slower; for group sizes that no chunk width divides.
template <class S, int BITS, int BT>
inline void gemv_row_unaligned(const ::nuq::cpu::detail::KernelArgs& a, int64_t r, int64_t b0, float* scratch,
                               float* out_sum) {
  using F = typename S::F;
  constexpr int W = S::W;
  constexpr int K = BITS == 4 ? 8 : 16;
  constexpr int64_t C = int64_t(W) * K;
  constexpr int A = S::chains(BT);
  const int64_t chunks = (a.cols + C - 1) / C;
  const float* xt = a.xr + b0 * chunks * C;
  F acc[BT][A];
  for (int b = 0; b < BT; ++b)
    for (int j = 0; j < A; ++j) acc[b][j] = S::zero();
  decode_row_t<BITS>(a, r, scratch);
  alignas(64) float wv[W];
  for (int64_t k = 0; k < chunks; ++k) {
    const float* xs = xt + k * K * BT * W;
    for (int s = 0; s < K; ++s) {
      for (int l = 0; l < W; ++l) {
        const int64_t c = k * C + int64_t(l) * K + s;
        wv[l] = c < a.cols ? scratch[c] : 0.0f;
      }
      const F v = S::load(wv);
      for (int b = 0; b < BT; ++b) acc[b][s % A] = S::fmadd(v, S::load(xs + (s * BT + b) * W), acc[b][s % A]);
    }
  }
  for (int b = 0; b < BT; ++b) {
    F t = acc[b][0];
    if constexpr (A == 2) t = S::add(acc[b][0], acc[b][1]);
    if constexpr (A == 4) t = S::add(S::add(acc[b][0], acc[b][1]), S::add(acc[b][2], acc[b][3]));
    out_sum[b] = S::reduce(t);
  }
}

// Rows [r0, r1) for batch rows [b0, b0 + BT): rows in groups of S::rows(BITS, BT) (a row's group depends only
// on r0, which is fixed by the task split, never on the thread count), the sparse part added last.
template <class S, int BITS, int BT>
void gemv_tile(const ::nuq::cpu::detail::KernelArgs& a, int64_t r0, int64_t r1, int64_t b0, float* scratch) {
  constexpr int R = S::rows(BITS, BT);
  float sum[R * BT];
  for (int64_t r = r0; r < r1;) {
    int n = 1;
    if (!a.aligned) {
      gemv_row_unaligned<S, BITS, BT>(a, r, b0, scratch, sum);
    } else if (R > 1 && r + R <= r1) {
      gemv_rows_aligned<S, BITS, BT, R>(a, r, b0, sum);
      n = R;
    } else {
      gemv_rows_aligned<S, BITS, BT, 1>(a, r, b0, sum);
    }
    for (int i = 0; i < n; ++i) {
      float* s = sum + i * BT;
      if (a.aligned && a.nnz > 0) {
        for (int64_t k = a.row_ptr[r + i]; k < a.row_ptr[r + i + 1]; ++k) {
          const float v = h2f(a.values[k]);
          const int64_t c = sparse_column(a, k);
          for (int b = 0; b < BT; ++b) s[b] += v * a.x[(b0 + b) * a.ldx + c];
        }
      }
      for (int b = 0; b < BT; ++b) a.y[(b0 + b) * a.ldy + r + i] = s[b];
    }
    r += n;
  }
}

template <class S, int BITS, int... T>
inline void tile_switch(int bt, std::integer_sequence<int, T...>, const ::nuq::cpu::detail::KernelArgs& a,
                        int64_t r0, int64_t r1, int64_t b0, float* scratch) {
  const bool done = ((bt == T + 1 ? (gemv_tile<S, BITS, T + 1>(a, r0, r1, b0, scratch), true) : false) || ...);
  if (!done) ::nuq::cpu::detail::kernel_unsupported("batch tile", bt);
}

// Batch rows beyond what fits in registers are done in further passes over the same rows, which are
// then in L1/L2: the weights still come from memory once.
template <class S>
void gemv_rows(const ::nuq::cpu::detail::KernelArgs& a, int64_t r0, int64_t r1, float* scratch) {
  with_bits(a.bits, [&](auto bc) {
    constexpr int BITS = decltype(bc)::value;
    for (int64_t b0 = 0; b0 < a.batch; b0 += S::kMaxTile) {
      const int bt = int(a.batch - b0 < S::kMaxTile ? a.batch - b0 : S::kMaxTile);
      tile_switch<S, BITS>(bt, std::make_integer_sequence<int, S::kMaxTile>{}, a, r0, r1, b0, scratch);
    }
  });
}

#endif  // NUQ_KERNEL_SIMD
