// A one-lane "vector" with the interface of the SIMD types (simd_avx2.h, simd_avx512.h), so the kernels in
// xent_kernels.h are written once. It is the whole default build, and the float64 path of every build.
//
// Included by kernels_<isa>.cpp inside that instruction set's namespace, after every system header; it must not
// include anything itself.

template <typename acc_t>
struct ScalarVec {
  using value_type = acc_t;
  using Mask = bool;
  static constexpr int kWidth = 1;

  // The class index of each lane (-1 for a lane that is ignored).
  struct Lanes {
    int32_t v;
    static Lanes load(const int32_t* p) { return {*p}; }
    // The class index *y if valid, -1 if it is ignore_index; false if it is neither.
    static bool load_classes(const int64_t* y, int64_t ignore_index, int64_t num_classes, Lanes& classes) {
      if (*y == ignore_index) {
        classes.v = -1;
        return true;
      }
      classes.v = static_cast<int32_t>(*y);
      return *y >= 0 && *y < num_classes;
    }
    Mask equals(int32_t c) const { return v == c; }
    Mask valid() const { return v >= 0; }
    Lanes offsets(int32_t stride) const { return {v * stride}; }
  };

  acc_t v;

  ScalarVec() = default;
  ScalarVec(acc_t s) : v(s) {}  // NOLINT: implicit broadcast, like the SIMD types

  static Mask prefix(int n) { return n > 0; }

  template <typename T>
  static ScalarVec load(const T* p) {
    return static_cast<acc_t>(*p);
  }
  template <typename T>
  static ScalarVec load_partial(const T* p, int n, acc_t fill) {
    return n > 0 ? load(p) : ScalarVec(fill);
  }
  static ScalarVec gather(const acc_t* base, Lanes index, Mask mask) { return mask ? base[index.v] : acc_t(0); }
  static void transpose(ScalarVec (&)[kWidth]) {}

  template <typename T>
  static void store(T* p, ScalarVec x) {
    *p = static_cast<T>(x.v);
  }
  template <typename T>
  static void stream(T* p, ScalarVec x) {
    store(p, x);
  }
  static void stream_fence() {}

  template <typename T>
  static void store_partial(T* p, ScalarVec x, int n) {
    if (n > 0) store(p, x);
  }

  // Hidden friends, so that a plain number converts to ScalarVec as it does to the SIMD types.
  friend ScalarVec operator+(ScalarVec a, ScalarVec b) { return a.v + b.v; }
  friend ScalarVec operator-(ScalarVec a, ScalarVec b) { return a.v - b.v; }
  friend ScalarVec operator*(ScalarVec a, ScalarVec b) { return a.v * b.v; }
  friend ScalarVec operator/(ScalarVec a, ScalarVec b) { return a.v / b.v; }
  friend ScalarVec fmadd(ScalarVec a, ScalarVec b, ScalarVec c) { return a.v * b.v + c.v; }
  // b when either is NaN, like the SIMD max instructions (NaNs then reach the sum of exps, which propagates them).
  friend ScalarVec vmax(ScalarVec a, ScalarVec b) { return a.v > b.v ? a.v : b.v; }
  friend ScalarVec vexp(ScalarVec a) { return std::exp(a.v); }
  friend ScalarVec vlog(ScalarVec a) { return std::log(a.v); }
  friend Mask equal(ScalarVec a, ScalarVec b) { return a.v == b.v; }
  friend ScalarVec select(Mask m, ScalarVec a, ScalarVec b) { return m ? a : b; }
  friend ScalarVec add_where(Mask m, ScalarVec a, ScalarVec b) { return m ? a.v + b.v : a.v; }
  friend ScalarVec add_unless(Mask m, ScalarVec a, ScalarVec b) { return m ? a.v : a.v + b.v; }
  friend acc_t reduce_add(ScalarVec a) { return a.v; }
  friend acc_t reduce_max(ScalarVec a) { return a.v; }
};
