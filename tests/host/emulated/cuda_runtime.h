// What the kernels include for the CUDA runtime, in the host emulation: tests/host/emulated_cuda.h.
#pragma once
#include "../emulated_cuda.h"
