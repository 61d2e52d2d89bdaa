// The library the host emulation of the CUDA kernels registers its ops in (csrc/cuda/xent_kernel.cu, built with
// FUSED_XENT_HOST_EMULATION, implements them for CPU tensors), and the sm_90 cluster kernel it leaves out: its plan
// declines, as on a GPU before sm_90, and the fused forward takes the block-per-row kernel instead.
#include <torch/library.h>

#include <stdexcept>

#include "common/xent_schemas.h"
#include "cuda/xent_launch.h"

TORCH_LIBRARY(fused_xent_emulated, m) {
  m.def(fused_xent::kForwardSchema);
  m.def(fused_xent::kBackwardSchema);
  m.def(fused_xent::kForwardGradSchema);
  m.def(fused_xent::kForwardGradInplaceSchema);
  m.def(fused_xent::kValueCheckSchema);
  m.def(fused_xent::kScaleUnitGradSchema);
}

namespace fused_xent {
namespace cuda {

template <typename scalar_t>
LaunchShape plan_rows_cluster(const XentParams<scalar_t>&, int) {
  LaunchShape none;
  none.grid = 0;
  return none;
}

template <typename scalar_t>
void launch_rows_cluster(const XentParams<scalar_t>&, const LaunchShape&, cudaStream_t) {
  throw std::logic_error("the cluster kernel is not emulated");
}

#define INSTANTIATE(T)                                                                         \
  template LaunchShape plan_rows_cluster<T>(const XentParams<T>&, int);                        \
  template void launch_rows_cluster<T>(const XentParams<T>&, const LaunchShape&, cudaStream_t);
FUSED_XENT_FOR_EACH_SCALAR(INSTANTIATE)
#undef INSTANTIATE

}  // namespace cuda
}  // namespace fused_xent
