// The kernels for any CPU: one lane at a time (ATEN_CPU_CAPABILITY=default, or no AVX2).
#include "cpu/kernel_prelude.h"

#include "common/xent_math.h"

namespace fused_xent::cpu::scalar {
#include "cpu/simd_scalar.h"
using FloatVec = ScalarVec<float>;
#include "cpu/xent_kernels.h"
}  // namespace fused_xent::cpu::scalar
