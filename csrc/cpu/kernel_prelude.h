// Every header the kernels use, included by each kernels_<isa>.cpp before its target pragma: code from these
// headers is then compiled for the baseline instruction set, whatever the file's pragma says, so the linker can
// never pick an AVX-512 copy of a shared inline function for a CPU without AVX-512.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the _mm*_undefined_* placeholders inside its own AVX-512 intrinsics (e.g. _mm512_reduce_add_ps)
// as (maybe-)uninitialized once they are inlined; the warning is reported at the intrinsic's header line, so it
// has to be off before that header is read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cpu/denormal_mode.h"
#include "cpu/kernel_args.h"
#include "cpu/kernel_plan.h"
