// The part of a vector log that the SIMD levels share: with x = (1 + f) 2^k and 1 + f in [sqrt(1/2), sqrt(2)),
// log(x) = k ln2 + log(1 + f) by the Cephes logf polynomial, ln2 taken in two parts so that k ln2 adds no rounding.
// Each level finds f and k and patches zero, negative, infinite and NaN inputs with its own instructions (vlog).
//
// Included by the kernel files inside their namespace and target pragma, before the SIMD header whose vlog calls it;
// V is that header's FloatVec, whose fmadd is found when vlog instantiates this.

template <class V>
inline V log_from_mantissa(V f, V k) {
  const V z = f * f;
  V y(7.0376836292e-2f);
  y = fmadd(y, f, V(-1.1514610310e-1f));
  y = fmadd(y, f, V(1.1676998740e-1f));
  y = fmadd(y, f, V(-1.2420140846e-1f));
  y = fmadd(y, f, V(1.4249322787e-1f));
  y = fmadd(y, f, V(-1.6668057665e-1f));
  y = fmadd(y, f, V(2.0000714765e-1f));
  y = fmadd(y, f, V(-2.4999993993e-1f));
  y = fmadd(y, f, V(3.3333331174e-1f));
  y = (y * f) * z;
  y = fmadd(k, V(-2.12194440e-4f), y);
  y = y - z * V(0.5f);  // z * 0.5 is exact: the same bits as a fused multiply-subtract
  return fmadd(k, V(0.693359375f), f + y);
}
