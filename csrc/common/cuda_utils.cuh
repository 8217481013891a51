// Small device helpers shared by the CUDA extensions. Header-only, no torch: the .cu files compile
// standalone with nvcc (tests/kernels/test_csrc_compile.py) and torch only sees host entry points.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace megatrain::cuda {

// Explicit conversions: torch builds with __CUDA_NO_BFLOAT16_CONVERSIONS__ / __CUDA_NO_HALF_CONVERSIONS__,
// which remove the implicit ones.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// VEC elements moved as one aligned access: 16 B when VEC * sizeof(T) == 16 (ld/st.global.v4).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[VEC]) {
  const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(ptr);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(p.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[VEC]) {
  Pack<T, VEC> p;
#pragma unroll
  for (int k = 0; k < VEC; ++k) p.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = p;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace megatrain::cuda
