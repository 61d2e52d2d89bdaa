// The calling thread's treatment of subnormal floats, carried into ATen's pool workers. torch.set_flush_denormal
// sets flush-to-zero and denormals-are-zero (two MXCSR bits on x86) on the calling thread only, and any worker may
// claim any block (run_typed in xent_kernels.h): without this, which blocks flush subnormals would depend on timing,
// and so would the loss and gradient.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fused_xent::cpu {

#if defined(__x86_64__) || defined(__i386__)
constexpr unsigned kDenormalModeBits = 0x8040;  // MXCSR: FTZ (bit 15) and DAZ (bit 6)

inline unsigned denormal_mode() { return _mm_getcsr() & kDenormalModeBits; }

// Puts this thread in `mode` (a denormal_mode() of another thread) until the guard goes out of scope.
class DenormalModeGuard {
 public:
  explicit DenormalModeGuard(unsigned mode) : own_(_mm_getcsr()) {
    _mm_setcsr((own_ & ~kDenormalModeBits) | mode);
  }
  ~DenormalModeGuard() { _mm_setcsr(own_); }
  DenormalModeGuard(const DenormalModeGuard&) = delete;
  DenormalModeGuard& operator=(const DenormalModeGuard&) = delete;

 private:
  unsigned own_;
};
#else
// Elsewhere torch.set_flush_denormal changes nothing (it returns False).
inline unsigned denormal_mode() { return 0; }

class DenormalModeGuard {
 public:
  explicit DenormalModeGuard(unsigned) {}
};
#endif

}  // namespace fused_xent::cpu
