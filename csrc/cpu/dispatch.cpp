// Picks the instruction set of the CPU kernels once, at first use: the widest the CPU supports, capped by the
// ATEN_CPU_CAPABILITY environment variable ("default", "avx2" or "avx512") the way ATen's DispatchStub caps its own.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/kernel_args.h"

namespace fused_xent {
namespace cpu {
namespace {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

Isa widest_supported() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kDefault;
}

Isa requested_cap() {
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  if (env == nullptr) return Isa::kAvx512;
  if (std::strcmp(env, "default") == 0) return Isa::kDefault;
  if (std::strcmp(env, "avx2") == 0) return Isa::kAvx2;
  return Isa::kAvx512;  // "avx512" and values meant for other architectures leave the hardware's choice alone
}

Isa selected_isa() {
  static const Isa isa = static_cast<Isa>(std::min(static_cast<int>(widest_supported()),
                                                   static_cast<int>(requested_cap())));
  return isa;
}

}  // namespace

void run_kernel(const KernelArgs& args) {
  switch (selected_isa()) {
#if defined(__x86_64__) || defined(__i386__)
    case Isa::kAvx512:
      return avx512::run_kernel(args);
    case Isa::kAvx2:
      return avx2::run_kernel(args);
#endif
    default:
      return scalar::run_kernel(args);
  }
}

}  // namespace cpu

std::string cpu_capability() {
  switch (cpu::selected_isa()) {
    case cpu::Isa::kAvx512:
      return "avx512";
    case cpu::Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace fused_xent
