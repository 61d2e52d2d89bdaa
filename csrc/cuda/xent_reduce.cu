// Deterministic reductions: the main kernels leave one partial per thread block (no floating-point atomics); these
// kernels sum them in a fixed order. Also the cheap pass over the targets that gives a fused forward its mean
// denominator before the gradient is written.
#include "cuda/xent_launch.h"

namespace fused_xent {
namespace cuda {
namespace {

constexpr int kFinalizeThreads = 1024;

template <typename acc_t>
__global__ void __launch_bounds__(kPerPositionThreads)
    target_weight_kernel(const int64_t* target, int64_t positions, int64_t ignore_index, int64_t num_classes,
                         const acc_t* weight, acc_t* partials) {
  acc_t total = 0, unused = 0;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < positions;
       r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t y = target[r];
    const int kind = classify_target(y, ignore_index, num_classes);
    total += kind == kTargetValid ? class_weight(weight, y) : fill_value<acc_t>(kind);
  }
  block_sum_pair(total, unused);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const acc_t* loss_partials, const acc_t* weight_partials, int64_t count, acc_t* total_weight,
                    acc_t* loss, int64_t reduction, bool smoothed) {
  acc_t loss_sum = 0, weight_sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    if (loss_partials) loss_sum += loss_partials[i];
    if (weight_partials) weight_sum += weight_partials[i];
  }
  block_sum_pair(loss_sum, weight_sum);
  if (threadIdx.x != 0) return;
  acc_t denominator = acc_t(1);
  if (weight_partials) {
    *total_weight = weight_sum;
    denominator = weight_sum;
  } else if (total_weight && reduction == kReductionMean) {  // unwritten (and unused) for a sum
    denominator = *total_weight;
  }
  if (loss) {
    // Divided as PyTorch divides, but NaN over zero target weight with label smoothing (reference.py's _mean_of).
    const acc_t mean = smoothed && denominator == acc_t(0) ? quiet_nan<acc_t>() : loss_sum / denominator;
    *loss = reduction == kReductionMean ? mean : loss_sum;
  }
}

}  // namespace

template <typename acc_t>
void launch_target_weight(const int64_t* target, int64_t positions, int64_t ignore_index, int64_t num_classes,
                          const acc_t* weight, acc_t* partials, const LaunchShape& shape, cudaStream_t stream) {
  launch_kernel(target_weight_kernel<acc_t>, shape.grid, shape.threads, stream, target, positions, ignore_index,
                num_classes, weight, partials);
}

template <typename acc_t>
void launch_finalize(const acc_t* loss_partials, const acc_t* weight_partials, int64_t count, acc_t* total_weight,
                     acc_t* loss, int64_t reduction, bool smoothed, cudaStream_t stream) {
  launch_kernel(finalize_kernel<acc_t>, 1, kFinalizeThreads, stream, loss_partials, weight_partials, count,
                total_weight, loss, reduction, smoothed);
}

template void launch_target_weight<float>(const int64_t*, int64_t, int64_t, int64_t, const float*, float*,
                                          const LaunchShape&, cudaStream_t);
template void launch_target_weight<double>(const int64_t*, int64_t, int64_t, int64_t, const double*, double*,
                                           const LaunchShape&, cudaStream_t);
template void launch_finalize<float>(const float*, const float*, int64_t, float*, float*, int64_t, bool,
                                     cudaStream_t);
template void launch_finalize<double>(const double*, const double*, int64_t, double*, double*, int64_t, bool,
                                      cudaStream_t);

}  // namespace cuda
}  // namespace fused_xent
