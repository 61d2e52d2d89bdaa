// 8 floats in an AVX2 register, with the interface of ScalarVec (simd_scalar.h): loads and stores that convert
// float16 (F16C) / bfloat16 storage, masks, and the exp and log the kernels need.
//
// Included by kernels_avx2.cpp inside its namespace and target pragma, after every system header; it must not
// include anything itself.

struct FloatVec {
  using value_type = float;
  using Mask = __m256;  // all-ones lanes are true
  static constexpr int kWidth = 8;

  struct Lanes {
    __m256i v;
    static Lanes load(const int32_t* p) { return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))}; }
    // The class indices y[0..7] where valid, -1 where y is ignore_index; false if some y is neither.
    static bool load_classes(const int64_t* y, int64_t ignore_index, int64_t num_classes, Lanes& classes) {
      const __m256i ignore = _mm256_set1_epi64x(ignore_index), limit = _mm256_set1_epi64x(num_classes);
      const __m256i minus_one = _mm256_set1_epi64x(-1);
      __m256i half_classes[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + 4 * h));
        const __m256i ignored = _mm256_cmpeq_epi64(q, ignore);
        const __m256i in_range = _mm256_and_si256(_mm256_cmpgt_epi64(q, minus_one), _mm256_cmpgt_epi64(limit, q));
        if (_mm256_movemask_epi8(_mm256_or_si256(ignored, in_range)) != -1) return false;
        half_classes[h] = _mm256_blendv_epi8(minus_one, q, _mm256_andnot_si256(ignored, in_range));
      }
      // Keep the low 32 bits of each 64-bit lane (the indices fit).
      const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
      classes.v = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(half_classes[0], even),
                                            _mm256_permutevar8x32_epi32(half_classes[1], even), 0x20);
      return true;
    }
    Mask equals(int32_t c) const { return _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, _mm256_set1_epi32(c))); }
    Mask valid() const { return _mm256_castsi256_ps(_mm256_cmpgt_epi32(v, _mm256_set1_epi32(-1))); }
    // v * stride + lane number: where each lane's class sits in a buffer with classes `stride` apart.
    Lanes offsets(int32_t stride) const {
      return {_mm256_add_epi32(_mm256_mullo_epi32(v, _mm256_set1_epi32(stride)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))};
    }
  };

  __m256 v;

  FloatVec() = default;
  FloatVec(__m256 x) : v(x) {}                 // NOLINT
  FloatVec(float s) : v(_mm256_set1_ps(s)) {}  // NOLINT: implicit broadcast

  static Mask prefix(int n) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }

  static FloatVec load(const float* p) { return _mm256_loadu_ps(p); }
  static FloatVec load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static FloatVec load(const c10::BFloat16* p) {
    const __m256i widened = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(widened, 16));  // bfloat16 is the top half of a float32
  }
  // Partial loads and stores go through a small buffer: they only run at the end of a row or of a run of positions.
  template <typename T>
  static FloatVec load_partial(const T* p, int n, float fill) {
    alignas(32) float lanes[kWidth];
    for (int i = 0; i < kWidth; ++i) lanes[i] = i < n ? static_cast<float>(p[i]) : fill;
    return _mm256_load_ps(lanes);
  }

  // rows[i] lane j <-> rows[j] lane i. Unpacks interleave pairs of rows, then quads, within each 128-bit lane;
  // the 2x2 blocks of 128-bit lanes are then swapped with lane permutes.
  static void transpose(FloatVec (&rows)[kWidth]) {
    __m256 pairs[kWidth], quads[kWidth];
    for (int i = 0; i < kWidth; i += 2) {
      pairs[i] = _mm256_unpacklo_ps(rows[i].v, rows[i + 1].v);
      pairs[i + 1] = _mm256_unpackhi_ps(rows[i].v, rows[i + 1].v);
    }
    // quads[4 m + j], 128-bit lane L: column 4 L + j of rows 4 m .. 4 m + 3.
    for (int m = 0; m < 2; ++m) {
      const __m256d a = _mm256_castps_pd(pairs[4 * m]), b = _mm256_castps_pd(pairs[4 * m + 1]);
      const __m256d c = _mm256_castps_pd(pairs[4 * m + 2]), d = _mm256_castps_pd(pairs[4 * m + 3]);
      quads[4 * m] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, c));
      quads[4 * m + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, c));
      quads[4 * m + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
      quads[4 * m + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
    }
    for (int j = 0; j < 4; ++j) {
      rows[j] = _mm256_permute2f128_ps(quads[j], quads[4 + j], 0x20);
      rows[4 + j] = _mm256_permute2f128_ps(quads[j], quads[4 + j], 0x31);
    }
  }

  // base[index] in the lanes of mask, 0 elsewhere.
  static FloatVec gather(const float* base, Lanes index, Mask mask) {
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, index.v, mask, 4);
  }

  static void store(float* p, FloatVec x) { _mm256_storeu_ps(p, x.v); }
  static void store(c10::Half* p, FloatVec x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Round to nearest even, NaN to the quiet NaN 0x7fc0: what c10::BFloat16's constructor does.
  static void store(c10::BFloat16* p, FloatVec x) {
    const __m256i bits = _mm256_castps_si256(x.v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    // Pack the eight 32-bit lanes (all < 2^16) to 16 bits: packus works within 128-bit halves, then gather the
    // two useful 64-bit pieces.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  // Non-temporal stores, which skip the read-for-ownership of lines the cache does not hold. p must be aligned
  // to the stored size (32 bytes for float, 16 for float16 / bfloat16).
  static void stream(float* p, FloatVec x) { _mm256_stream_ps(p, x.v); }
  static void stream(c10::Half* p, FloatVec x) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void stream(c10::BFloat16* p, FloatVec x) {
    alignas(16) c10::BFloat16 converted[kWidth];
    store(converted, x);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm_load_si128(reinterpret_cast<const __m128i*>(converted)));
  }
  // Orders the non-temporal stores before whatever follows.
  static void stream_fence() { _mm_sfence(); }

  template <typename T>
  static void store_partial(T* p, FloatVec x, int n) {
    alignas(32) float lanes[kWidth];
    _mm256_store_ps(lanes, x.v);
    for (int i = 0; i < n; ++i) p[i] = static_cast<T>(lanes[i]);
  }
};

inline FloatVec operator+(FloatVec a, FloatVec b) { return _mm256_add_ps(a.v, b.v); }
inline FloatVec operator-(FloatVec a, FloatVec b) { return _mm256_sub_ps(a.v, b.v); }
inline FloatVec operator*(FloatVec a, FloatVec b) { return _mm256_mul_ps(a.v, b.v); }
inline FloatVec operator/(FloatVec a, FloatVec b) { return _mm256_div_ps(a.v, b.v); }
inline FloatVec fmadd(FloatVec a, FloatVec b, FloatVec c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
// b where either is NaN (the instruction's rule); NaNs still reach the sum of exps, which propagates them.
inline FloatVec vmax(FloatVec a, FloatVec b) { return _mm256_max_ps(a.v, b.v); }
inline __m256 equal(FloatVec a, FloatVec b) { return _mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ); }
inline FloatVec select(__m256 m, FloatVec a, FloatVec b) { return _mm256_blendv_ps(b.v, a.v, m); }
// a + b in the lanes of m (add_where) or in the others (add_unless), a elsewhere.
inline FloatVec add_where(__m256 m, FloatVec a, FloatVec b) { return _mm256_add_ps(a.v, _mm256_and_ps(m, b.v)); }
inline FloatVec add_unless(__m256 m, FloatVec a, FloatVec b) { return _mm256_add_ps(a.v, _mm256_andnot_ps(m, b.v)); }
inline float reduce_add(FloatVec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_max(FloatVec a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// exp(x) for x <= 0 or NaN (the kernels only take exps of x - max and x - lse): 2^n * exp(r) with
// n = round(x / ln 2) and |r| <= ln(2) / 2, exp(r) by the Cephes expf polynomial (about 1 ulp). 2^n is applied as
// two factors 2^(n/2) built in the exponent field, so subnormal results come out right; below the smallest
// subnormal the result is exactly 0 (so exp(-inf) = 0). NaN survives the clamp because max returns its second
// operand for NaN. Positive x also works up to log(FLT_MAX).
inline FloatVec vexp(FloatVec xv) {
  constexpr float kMinArg = -103.972077f;  // log of half the smallest subnormal
  const __m256 x = _mm256_max_ps(_mm256_set1_ps(kMinArg), xv.v);
  // n = round(x / ln 2) by adding 1.5 * 2^23 (the float spacing is 1 there): one fma and a subtraction.
  const __m256 magic = _mm256_set1_ps(12582912.f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic), magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i n_int = _mm256_cvtps_epi32(n);
  const __m256i n_low = _mm256_srai_epi32(n_int, 1);
  const __m256i n_high = _mm256_sub_epi32(n_int, n_low);
  const __m256i bias = _mm256_set1_epi32(127);
  __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n_low, bias), 23)));
  result = _mm256_mul_ps(result, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n_high, bias), 23)));
  return _mm256_andnot_ps(_mm256_cmp_ps(xv.v, _mm256_set1_ps(kMinArg), _CMP_LT_OQ), result);
}

// log(x) = k ln2 + log(m), x = m 2^k with m in [sqrt(1/2), sqrt(2)) (the polynomial is in simd_log.h). Zero,
// negative, infinite and NaN inputs are patched at the end (subnormal inputs are not needed here: the kernels take
// the log of a sum of exps that is at least 1).
inline FloatVec vlog(FloatVec xv) {
  const __m256 x = xv.v;
  const __m256i bits = _mm256_castps_si256(x);
  __m256 k = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f000000)));  // [0.5, 1)
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  k = _mm256_sub_ps(k, _mm256_and_ps(small, _mm256_set1_ps(1.f)));
  m = _mm256_add_ps(m, _mm256_and_ps(small, m));
  __m256 result = log_from_mantissa<FloatVec>(_mm256_sub_ps(m, _mm256_set1_ps(1.f)), k).v;
  const float inf = std::numeric_limits<float>::infinity();
  result = _mm256_blendv_ps(result, _mm256_set1_ps(inf), _mm256_cmp_ps(x, _mm256_set1_ps(inf), _CMP_EQ_OQ));
  result = _mm256_blendv_ps(result, _mm256_set1_ps(-inf), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ));
  result = _mm256_blendv_ps(result, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()),
                            _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NGE_UQ));
  return result;
}
