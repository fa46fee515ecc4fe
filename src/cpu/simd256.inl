// 8-lane (256-bit) SIMD traits for linear_kernel.inl; needs AVX2, FMA and F16C. Included inside an
// anonymous namespace by linear_avx2.cpp and linear_avx512.cpp (which runs it for group sizes that
// only 8-lane chunks divide).
struct S256 {
  static constexpr int W = 8;
  static constexpr int kMaxTile = max_tile(W);
  // One output row per pass (16 registers); steps rotate over 4 or 2 accumulators when there are 1 or
  // 2 batch rows, to keep 4 FMA chains in flight.
  static constexpr int rows(int /*bits*/, int /*tile*/) { return 1; }
  static constexpr int chains(int tile) { return tile == 1 ? 4 : tile == 2 ? 2 : 1; }
  using F = __m256;
  using I = __m256i;
  // vpermps on 8 lanes reads index bits 0-2: a 16-entry codebook needs two tables and a blend on bit 3.
  struct Table {
    F t0, t1;
  };

  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float reduce(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static I load_words(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  // 8 little-endian 16-bit units, zero-extended: lane l gets the top bits of columns 16l … 16l+15.
  static I load_hi16(const uint8_t* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  template <int N>
  static I srl(I v) {
    if constexpr (N == 0) return v; else return _mm256_srli_epi32(v, N);
  }
  template <int N>
  static I sll(I v) {
    if constexpr (N == 0) return v; else return _mm256_slli_epi32(v, N);
  }
  // Bits 0-1 from lo, bit 2 (and don't-care bits above) from hi.
  static I combine3(I lo, I hi) {
    const I m = _mm256_set1_epi32(3);
    return _mm256_or_si256(_mm256_and_si256(lo, m), _mm256_andnot_si256(m, hi));
  }
  template <int BITS>
  static Table table(const uint16_t* lut) {
    if constexpr (BITS == 4) {
      return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut))),
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + 8)))};
    } else if constexpr (BITS == 3) {
      const F t = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)));
      return {t, t};
    } else {
      // 4 entries repeated, so the next field's bit sitting at index bit 2 selects the same value.
      const __m128 t = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(lut)));
      const F t8 = _mm256_set_m128(t, t);
      return {t8, t8};
    }
  }
  template <int BITS>
  static F lookup(I idx, const Table& t) {
    if constexpr (BITS == 4) {
      const F lo = _mm256_permutevar8x32_ps(t.t0, idx);
      const F hi = _mm256_permutevar8x32_ps(t.t1, idx);
      return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    } else {
      return _mm256_permutevar8x32_ps(t.t0, idx);
    }
  }
};
