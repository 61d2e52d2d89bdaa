// The gradient tensor of the CPU ops, set up so that filling it does not cost more than computing it.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/xent_problem.h"

namespace fused_xent::cpu {

// An uninitialized tensor shaped and strided like problem.logits. A fresh multi-megabyte allocation is untouched
// memory whose 4 KiB pages would each fault on first write (that costs more than the whole kernel); it is advised
// to use transparent huge pages instead, and the kernel's threads then fault it in, in parallel, as they write.
at::Tensor new_gradient(const Problem& problem);

}  // namespace fused_xent::cpu
