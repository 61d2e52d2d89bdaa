#include "cpu/gradient_memory.h"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_xent::cpu {
namespace {

constexpr uintptr_t kHugePage = uintptr_t{2} << 20;

// Asks for huge pages on the 2 MiB-aligned part of [data, data + bytes). Harmless if the pages are already backed,
// and a no-op where transparent huge pages are off or unknown: failures are ignored.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace

at::Tensor new_gradient(const Problem& problem) {
  at::Tensor grad = empty_like_logits(problem);
  const size_t bytes = grad.storage().nbytes();
  if (bytes >= 2 * kHugePage) advise_huge_pages(grad.storage().mutable_data(), bytes);
  return grad;
}

}  // namespace fused_xent::cpu
