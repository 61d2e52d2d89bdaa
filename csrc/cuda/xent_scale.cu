// The backward of a gradient made in the forward (grad_mode in_forward and inplace, fused_xent/_autograd.py): the
// buffer holds d(loss)/d(logits) for an upstream gradient of 1, and is scaled in place by the upstream gradient g,
// a 0-d tensor on the device. Usually g is exactly 1 (loss.backward()): every block then reads it and returns, and
// the gradient is neither read nor written. Asking the host instead (g.item() == 1) would stop it at every backward
// until the forward is done, and leave the GPU idle while the host then launches what follows.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "cuda/xent_launch.h"
#include "cuda/xent_vectors.cuh"

namespace fused_xent {
namespace cuda {
namespace {

// 16-byte packs per thread and loop step, loaded before any is used: enough loads in flight to stream the gradient.
constexpr int kPacksPerStep = 4;

// Where a gradient element lies: the gradient is dense in some order of its (N, C, S) dimensions, so the coordinate
// of an element at storage offset o along a dimension of stride t and size n is (o / t) % n.
struct PositionOf {
  int64_t stride_n, size_n, stride_s, size_s;
  __device__ __forceinline__ int64_t operator()(int64_t offset) const {
    return (offset / stride_n) % size_n * size_s + (offset / stride_s) % size_s;
  }
};

// x * scale; with keep_zeros, an exact zero stays as it is (+0: the scale's sign would make it -0).
template <typename T>
__device__ __forceinline__ T scaled(T x, acc_type<T> value, acc_type<T> scale, bool keep_zeros) {
  return keep_zeros && value == acc_type<T>(0) ? x : static_cast<T>(value * scale);
}

// grad[i] *= scale for i in [0, numel), grad + head 16-byte aligned. Ignored positions hold +0, as PyTorch's
// gradient does (and so do classes whose probability underflowed). A finite scale keeps every exact zero as it is.
// An infinite or NaN one (an overflowed loss scale) leaves the ignored positions alone, into which PyTorch sends
// nothing, and makes the other zeros NaN as PyTorch does: each element then looks up its position's target (rare:
// slow). Probability targets ignore nothing: their zeros become NaN.
template <typename T>
__global__ void __launch_bounds__(kPerPositionThreads)
    scale_unit_grad_kernel(T* grad, int64_t numel, int64_t head, const T* grad_loss, const int64_t* target,
                           int64_t ignore_index, PositionOf position_of) {
  using acc_t = acc_type<T>;
  const acc_t scale = static_cast<acc_t>(*grad_loss);
  if (scale == acc_t(1)) return;
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = int64_t(gridDim.x) * blockDim.x;
  const bool keep_zeros = is_finite(scale);
  if (target != nullptr && !keep_zeros) {
    for (int64_t i = thread; i < numel; i += threads) {
      if (target[position_of(i)] != ignore_index) grad[i] = static_cast<T>(static_cast<acc_t>(grad[i]) * scale);
    }
    return;
  }
  constexpr int W = kVecWidth<T>;
  const int64_t packs = (numel - head) / W;
  const int64_t tail = head + packs * W;
  // The elements before the first aligned pack and after the last: fewer than W each, one thread apiece.
  if (thread < head) grad[thread] = scaled(grad[thread], static_cast<acc_t>(grad[thread]), scale, keep_zeros);
  if (thread < numel - tail) {
    T& x = grad[tail + thread];
    x = scaled(x, static_cast<acc_t>(x), scale, keep_zeros);
  }
  T* aligned = grad + head;
  const int64_t step = threads * kPacksPerStep;
  for (int64_t first = thread; first < packs; first += step) {
    Pack<W, T> data[kPacksPerStep];
#pragma unroll
    for (int k = 0; k < kPacksPerStep; ++k) {
      if (first + k * threads < packs) data[k] = load_pack<W>(aligned + (first + k * threads) * W);
    }
#pragma unroll
    for (int k = 0; k < kPacksPerStep; ++k) {
      if (first + k * threads >= packs) break;
      acc_t values[W];
      to_acc(data[k], values);
#pragma unroll
      for (int e = 0; e < W; ++e) data[k].v[e] = scaled(data[k].v[e], values[e], scale, keep_zeros);
      store_pack<W>(aligned + (first + k * threads) * W, data[k]);
    }
  }
}

// grad (N, C, S), dense in any order of its dimensions; grad_loss 0-d of grad's dtype; target (N, S) int64 class
// indices, or none for probability targets (nothing is ignored then).
void scale_unit_grad_cuda(const at::Tensor& grad, const at::Tensor& grad_loss, const std::optional<at::Tensor>& target,
                          int64_t ignore_index) {
  TORCH_CHECK_VALUE(grad.dim() == 3 && grad.is_non_overlapping_and_dense(),
                    "fused_xent: scale_unit_grad_ needs a dense (N, C, S) gradient, got sizes ", grad.sizes(),
                    " strides ", grad.strides());
  TORCH_CHECK_VALUE(grad_loss.dim() == 0 && grad_loss.scalar_type() == grad.scalar_type() &&
                        grad_loss.device() == grad.device(),
                    "fused_xent: scale_unit_grad_ needs a 0-d grad_loss of the gradient's dtype and device, got ",
                    grad_loss.scalar_type(), " ", grad_loss.sizes(), " on ", grad_loss.device());
  const int64_t N = grad.size(0), S = grad.size(2);
  TORCH_CHECK_VALUE(!target || (target->scalar_type() == at::kLong && target->sizes() == at::IntArrayRef({N, S}) &&
                                target->device() == grad.device()),
                    "fused_xent: scale_unit_grad_ needs an int64 (", N, ", ", S, ") target on the gradient's device");
  if (grad.numel() == 0) return;
  const at::Tensor class_target = target ? target->contiguous() : at::Tensor();
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t resident_blocks = gpu_capacity(grad.get_device()).resident_blocks(kPerPositionThreads);
  // A size-1 dimension's stride may be anything: take 1, under which (o / 1) % 1 is its only coordinate, 0.
  const PositionOf position_of{N > 1 ? grad.stride(0) : 1, N, S > 1 ? grad.stride(2) : 1, S};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_unit_grad_", [&] {
    constexpr int64_t kBytes = 16;
    const int64_t misalignment = reinterpret_cast<uintptr_t>(grad.data_ptr()) % kBytes;
    const int64_t head = std::min<int64_t>(misalignment ? (kBytes - misalignment) / int64_t(sizeof(scalar_t)) : 0,
                                           grad.numel());
    const int64_t packs = (grad.numel() - head) / kVecWidth<scalar_t>;
    const int64_t blocks = std::max<int64_t>(ceil_div(packs, int64_t(kPerPositionThreads) * kPacksPerStep), 1);
    launch_kernel(scale_unit_grad_kernel<scalar_t>, std::min(blocks, resident_blocks), kPerPositionThreads,
                  c10::cuda::getCurrentCUDAStream(), grad.data_ptr<scalar_t>(), grad.numel(), head,
                  grad_loss.data_ptr<scalar_t>(), class_target.defined() ? class_target.data_ptr<int64_t>() : nullptr,
                  ignore_index, position_of);
  });
}

}  // namespace
}  // namespace cuda
}  // namespace fused_xent

TORCH_LIBRARY_IMPL(FUSED_XENT_CUDA_LIBRARY, FUSED_XENT_CUDA_KEY, m) {
  m.impl("scale_unit_grad_", &fused_xent::cuda::scale_unit_grad_cuda);
}
