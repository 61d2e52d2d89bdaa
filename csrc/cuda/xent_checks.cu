// The value check of the front end (fused_xent/_value_check.py, ValueCheck) as one kernel: whether any class index is
// out of range (ignore_index aside) and whether the weight has a NaN, for the host to read from pinned memory while
// the loss kernels run. The same check as a handful of PyTorch ops costs a launch each: about 140 us of host time
// per call on the H200 machine of 2026-11-30 (benchmarks/RESULTS.md), which the GPU, idle before the call, waits out.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cuda/xent_launch.h"

namespace fused_xent {
namespace cuda {
namespace {

// At most this many blocks: a grid-stride loop over the targets reads them at close to full bandwidth well below it.
constexpr int64_t kMaxCheckBlocks = 512;

// flags[0] = 1 if a target is neither ignore_index nor a class of [0, classes); flags[1] = 1 if a weight is NaN.
// flags start at 0 and are only ever set to 1, so the threads that find something need no atomics and the usual
// call, which finds nothing, writes nothing.
template <typename target_t, typename weight_t>
__global__ void __launch_bounds__(kPerPositionThreads)
    value_check_kernel(const target_t* target, int64_t targets, int64_t ignore_index, int64_t classes,
                       const weight_t* weight, int64_t weights, int64_t* flags) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  bool bad_target = false;
  for (int64_t i = first; i < targets; i += stride) {
    bad_target |= classify_target(static_cast<int64_t>(target[i]), ignore_index, classes) == kTargetInvalid;
  }
  if (bad_target) flags[0] = 1;
  bool nan_weight = false;
  for (int64_t c = first; c < weights; c += stride) nan_weight |= is_nan(static_cast<acc_type<weight_t>>(weight[c]));
  if (nan_weight) flags[1] = 1;
}

template <typename target_t, typename weight_t>
void launch_value_check(const at::Tensor& target, int64_t ignore_index, int64_t classes, const at::Tensor& weight,
                        const at::Tensor& flags) {
  const int64_t targets = target.defined() ? target.numel() : 0;
  const int64_t weights = weight.defined() ? weight.numel() : 0;
  const int64_t work = std::max<int64_t>(std::max(targets, weights), 1);
  const int64_t grid = std::min(ceil_div(work, kPerPositionThreads), kMaxCheckBlocks);
  launch_kernel(value_check_kernel<target_t, weight_t>, grid, kPerPositionThreads,
                c10::cuda::getCurrentCUDAStream(), target.defined() ? target.data_ptr<target_t>() : nullptr,
                targets, ignore_index, classes, weight.defined() ? weight.data_ptr<weight_t>() : nullptr, weights,
                flags.data_ptr<int64_t>());
}

template <typename target_t>
void dispatch_weight(const at::Tensor& target, int64_t ignore_index, int64_t classes, const at::Tensor& weight,
                     const at::Tensor& flags) {
  switch (weight.defined() ? weight.scalar_type() : at::kFloat) {
    case at::kFloat: return launch_value_check<target_t, float>(target, ignore_index, classes, weight, flags);
    case at::kDouble: return launch_value_check<target_t, double>(target, ignore_index, classes, weight, flags);
    case at::kHalf: return launch_value_check<target_t, c10::Half>(target, ignore_index, classes, weight, flags);
    case at::kBFloat16:
      return launch_value_check<target_t, c10::BFloat16>(target, ignore_index, classes, weight, flags);
    default: TORCH_CHECK_VALUE(false, "fused_xent: weight must be floating point, got ", weight.scalar_type());
  }
}

at::Tensor value_check_cuda(const std::optional<at::Tensor>& target_arg, const std::optional<at::Tensor>& weight_arg,
                            int64_t ignore_index, int64_t classes) {
  const at::Tensor target = target_arg ? target_arg->contiguous() : at::Tensor();
  const at::Tensor weight = weight_arg ? weight_arg->contiguous() : at::Tensor();
  TORCH_CHECK_VALUE(target.defined() || weight.defined(), "fused_xent: value_check needs a target or a weight");
  const at::Tensor& any = target.defined() ? target : weight;
  TORCH_CHECK_VALUE(!target.defined() || !weight.defined() || target.device() == weight.device(),
                    "fused_xent: value_check: target and weight on different devices");
  const c10::cuda::CUDAGuard guard(any.device());
  const at::Tensor flags = at::zeros({2}, any.options().dtype(at::kLong));
  switch (target.defined() ? target.scalar_type() : at::kLong) {
    case at::kLong: dispatch_weight<int64_t>(target, ignore_index, classes, weight, flags); break;
    case at::kByte: dispatch_weight<uint8_t>(target, ignore_index, classes, weight, flags); break;
    default:
      TORCH_CHECK_VALUE(false, "fused_xent: class-index target must be int64 or uint8, got ", target.scalar_type());
  }
#ifdef FUSED_XENT_HOST_EMULATION
  return flags;  // already on the host
#else
  // Pinned, so that the copy is queued behind the kernel rather than waited for; the caching host allocator keeps
  // the buffer from reuse until the copy is done.
  at::Tensor on_host = at::empty({2}, flags.options().device(at::kCPU).pinned_memory(true));
  on_host.copy_(flags, /*non_blocking=*/true);
  return on_host;
#endif
}

}  // namespace
}  // namespace cuda
}  // namespace fused_xent

TORCH_LIBRARY_IMPL(FUSED_XENT_CUDA_LIBRARY, FUSED_XENT_CUDA_KEY, m) {
  m.impl("value_check", &fused_xent::cuda::value_check_cuda);
}
