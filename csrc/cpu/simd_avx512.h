// 16 floats in an AVX-512 register, with the interface of ScalarVec (simd_scalar.h): loads and stores that
// convert float16 / bfloat16 storage, masks, and the exp and log the kernels need.
//
// Included by kernels_avx512.cpp inside its namespace and target pragma, after every system header; it must not
// include anything itself.

struct FloatVec {
  using value_type = float;
  using Mask = __mmask16;
  static constexpr int kWidth = 16;

  struct Lanes {
    __m512i v;
    static Lanes load(const int32_t* p) { return {_mm512_loadu_si512(p)}; }
    // The class indices y[0..15] where valid, -1 where y is ignore_index; false if some y is neither.
    static bool load_classes(const int64_t* y, int64_t ignore_index, int64_t num_classes, Lanes& classes) {
      const __m512i ignore = _mm512_set1_epi64(ignore_index), limit = _mm512_set1_epi64(num_classes);
      const __m512i low = _mm512_loadu_si512(y), high = _mm512_loadu_si512(y + 8);
      const Mask ignored = static_cast<Mask>(_mm512_cmpeq_epi64_mask(low, ignore) |
                                             (_mm512_cmpeq_epi64_mask(high, ignore) << 8));
      // Unsigned compare: negative indices are out of range too.
      const Mask in_range = static_cast<Mask>(_mm512_cmplt_epu64_mask(low, limit) |
                                              (_mm512_cmplt_epu64_mask(high, limit) << 8));
      if (static_cast<Mask>(ignored | in_range) != 0xffff) return false;
      const __m512i all = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(low)),
                                             _mm512_cvtepi64_epi32(high), 1);
      classes.v = _mm512_mask_blend_epi32(static_cast<Mask>(in_range & ~ignored), _mm512_set1_epi32(-1), all);
      return true;
    }
    Mask equals(int32_t c) const { return _mm512_cmpeq_epi32_mask(v, _mm512_set1_epi32(c)); }
    Mask valid() const { return _mm512_cmpge_epi32_mask(v, _mm512_setzero_si512()); }
    // v * stride + lane number: where each lane's class sits in a buffer with classes `stride` apart.
    Lanes offsets(int32_t stride) const {
      const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      return {_mm512_add_epi32(_mm512_mullo_epi32(v, _mm512_set1_epi32(stride)), lane)};
    }
  };

  __m512 v;

  FloatVec() = default;
  FloatVec(__m512 x) : v(x) {}                 // NOLINT
  FloatVec(float s) : v(_mm512_set1_ps(s)) {}  // NOLINT: implicit broadcast

  static Mask prefix(int n) { return static_cast<Mask>((1u << n) - 1u); }

  static FloatVec load(const float* p) { return _mm512_loadu_ps(p); }
  static FloatVec load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static FloatVec load(const c10::BFloat16* p) {
    return bf16_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static FloatVec load_partial(const float* p, int n, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), prefix(n), p);
  }
  static FloatVec load_partial(const c10::Half* p, int n, float fill) {
    return _mm512_mask_blend_ps(prefix(n), _mm512_set1_ps(fill), _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(prefix(n), p)));
  }
  static FloatVec load_partial(const c10::BFloat16* p, int n, float fill) {
    return _mm512_mask_blend_ps(prefix(n), _mm512_set1_ps(fill), bf16_to_float(_mm256_maskz_loadu_epi16(prefix(n), p)));
  }

  // base[index] in the lanes of mask, 0 elsewhere.
  static FloatVec gather(const float* base, Lanes index, Mask mask) {
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, index.v, base, 4);
  }

  // rows[i] lane j <-> rows[j] lane i. Unpacks interleave pairs of rows, then quads, within each 128-bit lane;
  // the 4x4 blocks of 128-bit lanes are then transposed with lane shuffles.
  static void transpose(FloatVec (&rows)[kWidth]) {
    __m512 pairs[kWidth], quads[kWidth];
    for (int i = 0; i < kWidth; i += 2) {
      pairs[i] = _mm512_unpacklo_ps(rows[i].v, rows[i + 1].v);
      pairs[i + 1] = _mm512_unpackhi_ps(rows[i].v, rows[i + 1].v);
    }
    // quads[4 m + j], 128-bit lane L: column 4 L + j of rows 4 m .. 4 m + 3.
    for (int m = 0; m < 4; ++m) {
      const __m512d a = _mm512_castps_pd(pairs[4 * m]), b = _mm512_castps_pd(pairs[4 * m + 1]);
      const __m512d c = _mm512_castps_pd(pairs[4 * m + 2]), d = _mm512_castps_pd(pairs[4 * m + 3]);
      quads[4 * m] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
      quads[4 * m + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      quads[4 * m + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
      quads[4 * m + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int j = 0; j < 4; ++j) {
      const __m512 low01 = _mm512_shuffle_f32x4(quads[j], quads[4 + j], 0x44);
      const __m512 high01 = _mm512_shuffle_f32x4(quads[j], quads[4 + j], 0xee);
      const __m512 low23 = _mm512_shuffle_f32x4(quads[8 + j], quads[12 + j], 0x44);
      const __m512 high23 = _mm512_shuffle_f32x4(quads[8 + j], quads[12 + j], 0xee);
      rows[j] = _mm512_shuffle_f32x4(low01, low23, 0x88);
      rows[4 + j] = _mm512_shuffle_f32x4(low01, low23, 0xdd);
      rows[8 + j] = _mm512_shuffle_f32x4(high01, high23, 0x88);
      rows[12 + j] = _mm512_shuffle_f32x4(high01, high23, 0xdd);
    }
  }

  static void store(float* p, FloatVec x) { _mm512_storeu_ps(p, x.v); }
  static void store(c10::Half* p, FloatVec x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store(c10::BFloat16* p, FloatVec x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), float_to_bf16(x.v));
  }
  // Non-temporal stores, which skip the read-for-ownership of lines the cache does not hold. p must be aligned
  // to the stored size (64 bytes for float, 32 for float16 / bfloat16).
  static void stream(float* p, FloatVec x) { _mm512_stream_ps(p, x.v); }
  static void stream(c10::Half* p, FloatVec x) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void stream(c10::BFloat16* p, FloatVec x) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), float_to_bf16(x.v)); }
  // Orders the non-temporal stores before whatever follows.
  static void stream_fence() { _mm_sfence(); }

  static void store_partial(float* p, FloatVec x, int n) { _mm512_mask_storeu_ps(p, prefix(n), x.v); }
  static void store_partial(c10::Half* p, FloatVec x, int n) {
    _mm256_mask_storeu_epi16(p, prefix(n), _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store_partial(c10::BFloat16* p, FloatVec x, int n) {
    _mm256_mask_storeu_epi16(p, prefix(n), float_to_bf16(x.v));
  }

 private:
  // bfloat16 is the top half of a float32.
  static __m512 bf16_to_float(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  // Round to nearest even, NaN to the quiet NaN 0x7fc0: what c10::BFloat16's constructor does.
  static __m256i float_to_bf16(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    rounded = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(rounded);
  }
};

inline FloatVec operator+(FloatVec a, FloatVec b) { return _mm512_add_ps(a.v, b.v); }
inline FloatVec operator-(FloatVec a, FloatVec b) { return _mm512_sub_ps(a.v, b.v); }
inline FloatVec operator*(FloatVec a, FloatVec b) { return _mm512_mul_ps(a.v, b.v); }
inline FloatVec operator/(FloatVec a, FloatVec b) { return _mm512_div_ps(a.v, b.v); }
inline FloatVec fmadd(FloatVec a, FloatVec b, FloatVec c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
// b where either is NaN (the instruction's rule); NaNs still reach the sum of exps, which propagates them.
inline FloatVec vmax(FloatVec a, FloatVec b) { return _mm512_max_ps(a.v, b.v); }
inline __mmask16 equal(FloatVec a, FloatVec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
inline FloatVec select(__mmask16 m, FloatVec a, FloatVec b) { return _mm512_mask_blend_ps(m, b.v, a.v); }
// a + b in the lanes of m (add_where) or in the others (add_unless), a elsewhere: one masked add each.
inline FloatVec add_where(__mmask16 m, FloatVec a, FloatVec b) { return _mm512_mask_add_ps(a.v, m, a.v, b.v); }
inline FloatVec add_unless(__mmask16 m, FloatVec a, FloatVec b) {
  return _mm512_mask_add_ps(a.v, static_cast<__mmask16>(~m), a.v, b.v);
}
inline float reduce_add(FloatVec a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(FloatVec a) { return _mm512_reduce_max_ps(a.v); }

// exp(x) for x <= 0 or NaN (the kernels only take exps of x - max and x - lse): 2^(k/16) * exp(r) with
// k = round(16 x / ln 2) and |r| <= ln(2) / 32. 2^(k/16) = 2^floor(k/16) * 2^(j/16), j = k mod 16: the second
// factor comes from a 16-entry table in a register (one permute), the first from scalef. On so short an interval
// exp(r) needs only 1 + r + r^2/2 + r^3/6 (error below 1e-8), three fmas instead of the seven of a polynomial over
// |r| <= ln(2) / 2: the forward is bound by this function. About 1 ulp in all. x is clamped at -150 first
// (NaN-preserving: max returns its second operand for NaN), where scalef already gives exactly 0, so
// exp(-inf) = 0. Positive x also works, up to overflow to +inf; x = +inf gives NaN.
inline FloatVec vexp(FloatVec xv) {
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-150.f), xv.v);
  // k = round(16 x / ln 2) by adding 1.5 * 2^23 (the float spacing is 1 there): the low mantissa bits of the sum
  // are then those of k, and the permute reads only the low 4 bits of each index.
  const __m512 magic = _mm512_set1_ps(12582912.f);
  const __m512 shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(23.0831206542234f), magic);
  const __m512 k = _mm512_sub_ps(shifted, magic);
  // r = x - k ln2/16 in two steps (Cody-Waite): k * 0.693359375/16 is exact for |k| < 2^15.
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f / 16), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f / 16), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 6), r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512 two_to_j16 = _mm512_setr_ps(  // 2^(j/16), j = 0..15, rounded to float
      1.000000000e+00f, 1.044273734e+00f, 1.090507746e+00f, 1.138788581e+00f, 1.189207077e+00f, 1.241857767e+00f,
      1.296839595e+00f, 1.354255557e+00f, 1.414213538e+00f, 1.476826191e+00f, 1.542210817e+00f, 1.610490322e+00f,
      1.681792855e+00f, 1.756252170e+00f, 1.834008098e+00f, 1.915206552e+00f);
  const __m512 table = _mm512_permutexvar_ps(_mm512_castps_si512(shifted), two_to_j16);
  // scalef multiplies by 2^floor(k/16); k/16 is exact.
  return _mm512_scalef_ps(_mm512_mul_ps(table, p), _mm512_mul_ps(k, _mm512_set1_ps(1.f / 16)));
}

// log(x) = k ln2 + log(m), x = m 2^k with m in [sqrt(1/2), sqrt(2)) (the polynomial is in simd_log.h). Zero,
// negative, infinite and NaN inputs are patched at the end.
inline FloatVec vlog(FloatVec xv) {
  const __m512 x = xv.v;
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_src);  // [0.5, 1)
  __m512 k = _mm512_add_ps(_mm512_getexp_ps(x), _mm512_set1_ps(1.f));
  const __mmask16 small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  k = _mm512_mask_sub_ps(k, small, k, _mm512_set1_ps(1.f));
  m = _mm512_mask_add_ps(m, small, m, m);
  __m512 result = log_from_mantissa<FloatVec>(_mm512_sub_ps(m, _mm512_set1_ps(1.f)), k).v;
  const float inf = std::numeric_limits<float>::infinity();
  result = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(inf), _CMP_EQ_OQ), result, _mm512_set1_ps(inf));
  result = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ), result, _mm512_set1_ps(-inf));
  result = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NGE_UQ), result,
                                _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
  return result;
}
