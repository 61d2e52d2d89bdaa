// Every header the kernels use, included by each kernels_<isa>.cpp before its target pragma: code from these
// headers is then compiled for the baseline instruction set, whatever the file's pragma says, so the linker can
// never pick an AVX-512 copy of a shared inline function for a CPU without AVX-512.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cpu/kernel_args.h"
