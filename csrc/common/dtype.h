// Host-side types shared by the CUDA extensions' kernels (.cu) and torch bindings (bind.cpp).
// Plain C++: bind.cpp is compiled by the host compiler and must not see device intrinsics.
#pragma once

#include <cstdint>

namespace megatrain::cuda {

// Element types as the kernels see them (bind.cpp maps torch dtypes onto these).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace megatrain::cuda
