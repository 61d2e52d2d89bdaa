// Integer division rounded up, for the block counts of the CPU and CUDA launch plans alike.
#pragma once

#include <cstdint>

namespace fused_xent {

// a / b rounded up, for a >= 0 and b > 0.
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fused_xent
