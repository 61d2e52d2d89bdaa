// The base of the CUDA kernels' device code: the parameter block every kernel receives, accumulation types and their
// math, and target classification. On top of it: xent_groups.cuh (statistics and their reductions), xent_vectors.cuh
// (16-byte access, class visits), xent_position.cuh (per-position helpers). The per-position algebra itself lives in
// common/xent_math.h.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/xent_math.h"

// Shared memory of the code a thread-block cluster runs: plain __shared__ on a GPU. The host emulation
// (tests/host/emulated_cuda.h) runs a cluster's blocks at once, so each needs a copy of its own there, where a
// __shared__ object is one static for blocks that run one at a time.
#ifdef FUSED_XENT_HOST_EMULATION
#define FUSED_XENT_BLOCK_SHARED(type, name, extents) \
  auto& name = ::fused_xent_emulation::block_shared<type extents>([] {})
#define FUSED_XENT_DYNAMIC_SHARED(type, name) type* const name = ::fused_xent_emulation::dynamic_shared<type>()
#else
#define FUSED_XENT_BLOCK_SHARED(type, name, extents) __shared__ type name extents
#define FUSED_XENT_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

// A GPU faults on a 16-byte access that is not 16-byte aligned; the host emulation checks each one, since the host
// itself would not notice.
#ifdef FUSED_XENT_HOST_EMULATION
#define FUSED_XENT_CHECK_VECTOR_ALIGNMENT(ptr) ::fused_xent_emulation::check_vector_alignment(ptr)
#else
#define FUSED_XENT_CHECK_VECTOR_ALIGNMENT(ptr)
#endif

namespace fused_xent {
namespace cuda {

// float32 statistics for every dtype except float64, which keeps float64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The parameter block of every kernel. Pointers a kernel does not need are null. Logits, gradient and probability
// targets share strides (make_problem / empty_like_logits guarantee it); grad may alias logits (in-place variant).
template <typename scalar_t>
struct XentParams {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* logits;
  scalar_t* grad;                // gradient output, or null (forward only)
  const int64_t* target_index;   // (N, S) contiguous, or null for probability targets
  const scalar_t* target_prob;   // same strides as logits, or null for class-index targets
  const acc_t* weight;           // (C,) contiguous, or null: every class weighs 1
  const acc_t* weight_sum;       // device scalar sum(weight), or null: C (only read with label smoothing)
  int64_t N, C, S;
  int64_t stride_n, stride_c, stride_s;  // logits strides in elements
  int64_t ignore_index;
  int64_t reduction;
  acc_t label_smoothing;
  bool vectorize;                // 16-byte loads: logits and prob target share their address modulo 16 bytes
  bool grad_in_phase;            // 16-byte stores: grad shares it too (a fresh gradient starts at phase 0)

  // Forward outputs.
  acc_t* lse;                    // (N, S, 2): each position's finite_max and log(sum) (saved_lse), or null
  acc_t* loss_rows;              // (N, S) per-position loss (reduction none), or null
  acc_t* loss_partials;          // one per thread block (reduction mean/sum), or null
  acc_t* weight_partials;        // one per thread block: sum of weight[target] (class-index targets), or null

  // Gradient scale: grad_loss (null = 1) over total_weight for reduction mean.
  const acc_t* total_weight;
  const acc_type<scalar_t>* grad_loss;  // in the accumulation dtype, as the CPU kernel reads it
  int64_t grad_loss_stride_n, grad_loss_stride_s;  // 0 for a 0-d grad_loss
  const acc_t* lse_in;           // lse as a forward wrote it, for the gradient-only kernels
};

// ---------------------------------------------------------------------------------------------------------------
// Math wrappers. Float exp uses the hardware approximation (ex2, ~2 ulp relative: it scales every probability
// alike). The log is taken once per position, of sum in [1, C], and its error is absolute: __logf's ~4e-7 near 1
// would be a large part of a confident position's loss lse - x[y] ~ 1e-5, so float goes through the double log,
// as PyTorch's accurate logf would (the build's --use_fast_math would turn logf itself into __logf).
__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return ::exp(x); }
__device__ __forceinline__ float log_acc(float x) { return static_cast<float>(::log(static_cast<double>(x))); }
__device__ __forceinline__ double log_acc(double x) { return ::log(x); }
// One FMNMX. It passes a NaN operand over: a NaN never becomes the max, and poisons the sum instead (RowStats).
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}
template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}
// isnan and isfinite of the device, and of the host in the emulation (tests/host/emulated_cuda.h).
template <typename acc_t>
__device__ __forceinline__ bool is_nan(acc_t v) {
#ifdef __CUDA_ARCH__
  return isnan(v);
#else
  return std::isnan(v);
#endif
}
template <typename acc_t>
__device__ __forceinline__ bool is_finite(acc_t v) {
#ifdef __CUDA_ARCH__
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Targets. Contract with the Python front end: it validates class indices before calling the op (raising a clear
// error) unless told not to, so the kernels never sync with the host to check them. A kernel that still meets an
// index outside [0, C) that is not ignore_index must neither read nor write out of bounds nor trap: it writes NaN
// for that position's loss (and its whole gradient row) and a NaN into total_weight, so a mean is NaN as well.
enum TargetKind : int { kTargetValid = 0, kTargetIgnored = 1, kTargetInvalid = 2 };

__device__ __forceinline__ int classify_target(int64_t y, int64_t ignore_index, int64_t num_classes) {
  if (y == ignore_index) return kTargetIgnored;  // ignore_index wins even when it is a valid class, like PyTorch
  return (y >= 0 && y < num_classes) ? kTargetValid : kTargetInvalid;
}

template <typename acc_t>
__device__ __forceinline__ acc_t class_weight(const acc_t* weight, int64_t c) {
  return weight ? weight[c] : acc_t(1);
}

// What a position that is not valid contributes wherever it counts (each element of its gradient row, its weight in
// the mean's denominator): 0 when ignored, NaN for a class index out of range.
template <typename acc_t>
__device__ __forceinline__ acc_t fill_value(int kind) {
  return kind == kTargetInvalid ? quiet_nan<acc_t>() : acc_t(0);
}

}  // namespace cuda
}  // namespace fused_xent
