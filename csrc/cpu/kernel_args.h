// The plain-data interface between the CPU op wrappers (ops.cpp) and the kernels, which are compiled once per
// instruction set (kernels_<isa>.cpp). Pointers are typed by the caller's dtype (the logits' dtype, or the
// accumulation dtype for statistics), counts are elements, and nothing here depends on the instruction set.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/xent_problem.h"

namespace fused_xent::cpu {

// What one block of positions produced. Blocks have a fixed size that depends only on the problem, so summing
// their results in block order gives the same bits for any number of threads.
struct BlockResult {
  double loss_sum = 0;          // sum of the block's per-position losses
  double weight_sum = 0;        // sum of weight[target] over its non-ignored positions (class-index targets)
  int64_t first_bad_position = -1;  // first position whose class index is out of range, or -1
};

// One call of a kernel. Which kernel runs follows from the pointers:
//   forward:          grad == nullptr, lse_in == nullptr (writes lse and loss)
//   forward + grad:   grad != nullptr, lse_in == nullptr (grad for grad_loss = grad_loss_scalar)
//   backward:         grad != nullptr, lse_in != nullptr
struct KernelArgs {
  at::ScalarType dtype;  // of logits, probability targets and grad
  Layout layout;
  int64_t N, C, S;
  int64_t stride_n, stride_c, stride_s;  // of logits, and of probability targets and grad, which share them

  const void* logits;
  const int64_t* target_index;  // (N, S) contiguous class indices, or nullptr for probability targets
  const void* target_prob;      // probabilities with the strides of logits, or nullptr
  const void* weight;           // (C,) in the accumulation dtype, or nullptr
  double weight_sum;            // W, read by label smoothing of class indices (C otherwise: smoothing_weight_sum)
  int64_t reduction;
  int64_t ignore_index;
  double label_smoothing;

  void* loss;  // (N, S) contiguous per-position losses (reduction none), accumulation dtype; or nullptr
  void* lse;   // (N, S, 2) contiguous, accumulation dtype: each position's reference and log_sum; or nullptr
  void* grad;  // strides of logits; may be the logits themselves (in place)

  const void* lse_in;        // backward: lse as a forward wrote it
  const void* grad_loss;     // backward with reduction none: (N, S) contiguous, accumulation dtype; else nullptr
  double grad_loss_scalar;   // the upstream gradient when grad_loss is nullptr
  double total_weight;       // the mean's denominator (read only for reduction mean)

  int64_t positions_per_block;
  int64_t num_blocks;
  BlockResult* blocks;  // num_blocks results, written by the kernel
};

// One definition per instruction set; dispatch.cpp picks the one to call.
namespace scalar {
void run_kernel(const KernelArgs& args);
}
namespace avx2 {
void run_kernel(const KernelArgs& args);
}
namespace avx512 {
void run_kernel(const KernelArgs& args);
}

// Runs the kernel of the instruction set chosen at load time (see dispatch.cpp).
void run_kernel(const KernelArgs& args);

}  // namespace fused_xent::cpu
