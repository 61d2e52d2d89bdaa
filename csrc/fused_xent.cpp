// The operators of fused_xent: their arguments and outputs (below) and their registration (the schema strings are
// in common/xent_schemas.h). Kernels live in one directory per backend (cpu/, cuda/), each backend with its own
// TORCH_LIBRARY_IMPL block. The fake (meta) kernels of the four cross-entropy ops and their autograd are registered
// from Python (fused_xent/_ops.py); the two ops that write into an argument get C++ Autograd and ADInplaceOrView
// kernels at the end of this file.
//
// Every op sees logits as a 3-D view (N, C, S): N batch entries, C classes, S = d1*...*dk spatial positions
// (S = 1 for (N, C) inputs). Python builds that view without copying, so the class stride is 1 for row-major and
// channels_last inputs and the position stride is 1 for NCHW inputs; kernels accept any strides.
//   target: (N, S) int64 class indices, or (N, C, S) floating class probabilities (same dtype as logits).
//   weight: optional (C,) per-class weights.
//   reduction: 0 = none, 1 = mean, 2 = sum (PyTorch's at::Reduction values).
// Outputs:
//   loss: (N, S) for reduction none, else a 0-d tensor; float32 (float64 for float64 logits), as computed. The
//        caller rounds it to the logits' dtype, or keeps float32 under autocast (fused_xent/_autograd.py): one
//        kernel serves both without an upcast copy of half-precision logits.
//   lse: (N, S, 2), float32 (float64 for float64 logits): each position's log-sum-exp in two parts, [..., 0] the
//        reference its exps were taken against (the max; 0 when every logit is -inf) and [..., 1] the log of their
//        sum. All backward needs besides the inputs; kept apart because their float sum is rounded by |lse| 2^-24,
//        ~1e-3 at logits of 1e4, which p = exp(x - lse) would carry (see common/xent_math.h, split_lse). The two
//        side by side, addressed from one offset: two (N, S) planes cost the sm_90 forward kernels registers and
//        stack (the extra plane offset). A position whose target is ignore_index holds (0, -inf), the lse of no
//        classes: its gradient is 0 whatever its logits, so the kernels need not read them (a padded or
//        prompt-masked batch of token logits is read only where it counts).
//   total_weight: 0-d, float32 (float64): the mean's denominator. Class indices: the sum of weight[target] over
//        positions that are not ignored (their count without weights). Probabilities: N * S.
#include <Python.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/xent_schemas.h"

namespace fused_xent {
// The SIMD level the CPU kernels dispatch to: "avx512", "avx2" or "default" (defined in cpu/).
std::string cpu_capability();

// The GPU code the CUDA kernels were built as, e.g. "sm_80 compute_90 sm_90" (setup.py passes it with dashes,
// which need no quoting on a compiler command line); "" in a build without them.
std::string cuda_code() {
#ifdef FUSED_XENT_CUDA_CODE
#define FUSED_XENT_STRING(tokens) #tokens
#define FUSED_XENT_EXPANDED_STRING(macro) FUSED_XENT_STRING(macro)
  std::string code = FUSED_XENT_EXPANDED_STRING(FUSED_XENT_CUDA_CODE);
  std::replace(code.begin(), code.end(), '-', ' ');
  return code;
#else
  return "";
#endif
}

namespace {
std::vector<at::Tensor> written_arguments(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack.size() - arguments.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::AliasInfo* alias = arguments[i].alias_info();
    if (alias && alias->isWrite()) written.push_back(stack[first + i].toTensor());
  }
  return written;
}

// Runs an op that writes into arguments it does not return (PyTorch's boxed fallbacks for autograd count only the
// writes into returned arguments), then moves the version counter of each written argument. As the Autograd kernel
// it first refuses a leaf that requires grad (under grad mode), as PyTorch's in-place ops do.
template <bool kRefuseLeaves>
void count_writes_into_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const std::vector<at::Tensor> written = written_arguments(op, *stack);
  if (kRefuseLeaves) {
    for (const at::Tensor& tensor : written) torch::autograd::check_inplace(tensor, tensor.requires_grad());
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& tensor : written) torch::autograd::increment_version(tensor);
}
}  // namespace
}  // namespace fused_xent

// `import fused_xent._C` only has to load the library so that the static registrations below run.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fused_xent, m) {
  m.def("cpu_capability() -> str", &fused_xent::cpu_capability);
  m.def("cuda_code() -> str", &fused_xent::cuda_code);
  m.def(fused_xent::kForwardSchema);
  // grad_loss has the shape of loss (0-d unless reduction is none).
  m.def(fused_xent::kBackwardSchema);
  // Forward that also writes d(loss)/d(logits) for grad_loss = 1 (per position for reduction none) while each row
  // is on chip; backward then only scales it. The grad has the strides of logits (of the dense copy the op reads
  // when they are not dense).
  m.def(fused_xent::kForwardGradSchema);
  // Same, writing the gradient over the logits (opt-in, for logits that nothing else reads afterwards).
  m.def(fused_xent::kForwardGradInplaceSchema);
  // The front end's value check as one kernel, CUDA only (the CPU kernel checks its targets itself): int64 flags
  // [a target neither ignore_index nor in [0, num_classes), a NaN in weight] in pinned host memory, valid once the
  // current stream has passed the call. No fake kernel: the check is skipped while tracing.
  m.def(fused_xent::kValueCheckSchema);
  // The backward of cross_entropy_fwd_grad and cross_entropy_fwd_grad_ as the front end runs it on a GPU, CUDA only:
  // grad *= grad_loss (0-d, of grad's dtype) in place, skipped on the device when grad_loss is exactly 1, so that
  // loss.backward() needs no host sync and no pass over the gradient. Positions whose class-index target is
  // ignore_index stay exactly 0 (an infinite or NaN grad_loss would make them NaN). No fake kernel: not traced.
  m.def(fused_xent::kScaleUnitGradSchema);
}

// The two ops that write into a tensor, as PyTorch's own in-place ops do for their callers: the write moves the
// tensor's version counter, so an op that saved the tensor for its backward refuses to run on what it now holds, and
// autograd refuses a leaf that requires grad (outside no_grad). Neither op has a derivative. (The front end calls
// them below autograd: it refuses leaves itself.)
TORCH_LIBRARY_IMPL(fused_xent, ADInplaceOrView, m) {
  using fused_xent::count_writes_into_arguments;
  m.impl("cross_entropy_fwd_grad_", torch::CppFunction::makeFromBoxedFunction<&count_writes_into_arguments<false>>());
  m.impl("scale_unit_grad_", torch::CppFunction::makeFromBoxedFunction<&count_writes_into_arguments<false>>());
}

TORCH_LIBRARY_IMPL(fused_xent, Autograd, m) {
  using fused_xent::count_writes_into_arguments;
  m.impl("cross_entropy_fwd_grad_", torch::CppFunction::makeFromBoxedFunction<&count_writes_into_arguments<true>>());
  m.impl("scale_unit_grad_", torch::CppFunction::makeFromBoxedFunction<&count_writes_into_arguments<true>>());
}
