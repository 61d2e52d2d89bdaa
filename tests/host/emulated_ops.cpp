// The library the host emulation of the CUDA kernels registers its ops in (csrc/cuda/xent_kernel.cu, built with
// FUSED_XENT_HOST_EMULATION, implements them for CPU tensors).
#include <torch/library.h>

#include "common/xent_schemas.h"

TORCH_LIBRARY(fused_xent_emulated, m) {
  m.def(fused_xent::kForwardSchema);
  m.def(fused_xent::kBackwardSchema);
  m.def(fused_xent::kForwardGradSchema);
  m.def(fused_xent::kForwardGradInplaceSchema);
  m.def(fused_xent::kValueCheckSchema);
  m.def(fused_xent::kScaleUnitGradSchema);
}
