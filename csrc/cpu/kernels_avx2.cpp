// The kernels for CPUs with AVX2, FMA and F16C: 8 float lanes. Compiled for that instruction set by the pragma
// below (no per-file compiler flags); dispatch.cpp only calls them on a CPU that has it.
#include "cpu/kernel_prelude.h"

#if defined(__x86_64__) || defined(__i386__)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

// After the pragma, so that the shared algebra is compiled for AVX2 where the kernels use it (with types of the
// namespace below only, see xent_kernels.h).
#include "common/xent_math.h"

namespace fused_xent::cpu::avx2 {
#include "cpu/simd_scalar.h"
#include "cpu/simd_log.h"
#include "cpu/simd_avx2.h"
#include "cpu/xent_kernels.h"
}  // namespace fused_xent::cpu::avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // x86
