// CUDA fused multi-tensor AdamW: one launch updates many tensors. The tensor list travels as a kernel
// argument (a pointer table under the 4 KiB parameter limit), each block takes one kChunk-element
// chunk of one tensor, and every thread moves kVec elements per iteration with 16-byte accesses.
//
// Memory-bound: 28 B/param for fp32 params (read p, g, m, v; write p, m, v), 20 B/param for 16-bit
// params with fp32 moments. Math is fp32 throughout; 16-bit params are rounded once at the store.
// Per element it is the CPU AdamW's sequence of IEEE-rounded operations (csrc/cpu_adam), so an
// offloaded and an on-GPU run of the same fp32 step should give the same bits.
#include "fused_adam.h"

#include "../common/cuda_utils.cuh"

#include <cmath>

namespace megatrain::fused_adam {
namespace {

using megatrain::cuda::DType;
using megatrain::cuda::from_float;
using megatrain::cuda::load_vec;
using megatrain::cuda::store_vec;
using megatrain::cuda::to_float;

constexpr int kMaxTensors = 36;   // 5 x 8 B x 36 = 1440 B of pointers/sizes
constexpr int kMaxBlocks = 320;   // 320 x 5 B of block -> (tensor, chunk); the table totals ~3 KiB
constexpr int kChunk = 65536;     // elements per block: 16 iterations of 512 threads x 8
constexpr int kThreads = 512;
constexpr int kVec = 8;           // fp32 arrays: 2 x 16 B; 16-bit arrays: 1 x 16 B

struct Table {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_tensor[kMaxBlocks];
};
static_assert(sizeof(Table) + sizeof(Hyper) <= 4096, "kernel arguments must fit the 4 KiB limit");

// 8 consecutive elements with 16-byte accesses: one for 16-bit types, two for fp32 (a 32-byte Pack
// would claim 32-byte alignment, which a 16-byte-aligned view does not have).
template <typename T>
__device__ __forceinline__ void load8(const T* ptr, float (&out)[kVec]) {
  if constexpr (sizeof(T) == 4) {
    load_vec<T, 4>(ptr, *reinterpret_cast<float(*)[4]>(out));
    load_vec<T, 4>(ptr + 4, *reinterpret_cast<float(*)[4]>(out + 4));
  } else {
    load_vec<T, 8>(ptr, out);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* ptr, const float (&in)[kVec]) {
  if constexpr (sizeof(T) == 4) {
    store_vec<T, 4>(ptr, *reinterpret_cast<const float(*)[4]>(in));
    store_vec<T, 4>(ptr + 4, *reinterpret_cast<const float(*)[4]>(in + 4));
  } else {
    store_vec<T, 8>(ptr, in);
  }
}

__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, const Hyper& h) {
  p = __fmul_rn(p, h.decay);
  m = __fmaf_rn(h.one_minus_b1, g - m, m);
  v = __fadd_rn(__fmul_rn(v, h.beta2), __fmul_rn(__fmul_rn(h.one_minus_b2, g), g));  // no contraction
  const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), h.inv_bc2_sqrt), h.eps);
  p = __fmaf_rn(h.neg_step_size, __fdiv_rn(m, denom), p);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const __grid_constant__ Table tab, const Hyper h) {
  const int t = tab.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(tab.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(static_cast<int64_t>(kChunk), tab.numel[t] - start);
  T* __restrict__ P = static_cast<T*>(tab.param[t]) + start;
  const T* __restrict__ G = static_cast<const T*>(tab.grad[t]) + start;
  float* __restrict__ M = tab.exp_avg[t] + start;
  float* __restrict__ V = tab.exp_avg_sq[t] + start;

  // chunk starts are multiples of kChunk, so the base pointers decide alignment for the whole tensor
  const bool vec_ok = ((reinterpret_cast<uintptr_t>(P) | reinterpret_cast<uintptr_t>(G) |
                        reinterpret_cast<uintptr_t>(M) | reinterpret_cast<uintptr_t>(V)) & 15u) == 0;
  int64_t done = 0;
  if (vec_ok) {
    const int64_t n_vec = n / kVec * kVec;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < n_vec; i += kThreads * kVec) {
      float p[kVec], g[kVec], m[kVec], v[kVec];
      load8(P + i, p);
      load8(G + i, g);
      load8(M + i, m);
      load8(V + i, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) adamw_element(p[k], g[k], m[k], v[k], h);
      store8(P + i, p);
      store8(M + i, m);
      store8(V + i, v);
    }
    done = n_vec;
  }
  // tail of the last chunk, or a whole unaligned tensor (a view at an odd offset): one element at a time
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    float p = to_float(P[i]), m = M[i], v = V[i];
    adamw_element(p, to_float(G[i]), m, v, h);
    P[i] = from_float<T>(p);
    M[i] = m;
    V[i] = v;
  }
}

template <typename T>
cudaError_t launch_typed(const TensorPtrs* tensors, int num_tensors, const Hyper& h, cudaStream_t stream) {
  Table tab;
  int nt = 0, nb = 0;
  auto flush = [&]() -> cudaError_t {
    adamw_kernel<T><<<nb, kThreads, 0, stream>>>(tab, h);
    return cudaGetLastError();
  };
  for (int i = 0; i < num_tensors; ++i) {
    if (tensors[i].numel == 0) continue;
    tab.param[nt] = tensors[i].param;
    tab.grad[nt] = tensors[i].grad;
    tab.exp_avg[nt] = tensors[i].exp_avg;
    tab.exp_avg_sq[nt] = tensors[i].exp_avg_sq;
    tab.numel[nt] = tensors[i].numel;
    ++nt;
    const int64_t chunks = megatrain::cuda::ceil_div(tensors[i].numel, kChunk);
    for (int64_t c = 0; c < chunks; ++c) {
      tab.block_tensor[nb] = static_cast<uint8_t>(nt - 1);
      tab.block_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (nt == kMaxTensors && last_chunk)) {
        if (cudaError_t err = flush(); err != cudaSuccess) return err;
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {  // the current tensor still has chunks: it becomes slot 0 of the next table
          tab.param[0] = tab.param[nt - 1];
          tab.grad[0] = tab.grad[nt - 1];
          tab.exp_avg[0] = tab.exp_avg[nt - 1];
          tab.exp_avg_sq[0] = tab.exp_avg_sq[nt - 1];
          tab.numel[0] = tab.numel[nt - 1];
          nt = 1;
        }
      }
    }
  }
  return nb > 0 ? flush() : cudaSuccess;
}

}  // namespace

Hyper make_hyper(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return Hyper{static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
               static_cast<float>(beta2),                      static_cast<float>(1.0 - beta2),
               static_cast<float>(1.0 / std::sqrt(bc2)),       static_cast<float>(eps),
               static_cast<float>(-lr / bc1)};
}

cudaError_t launch(const TensorPtrs* tensors, int num_tensors, DType dtype, const Hyper& h, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(tensors, num_tensors, h, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(tensors, num_tensors, h, stream);
    case DType::kFloat16: return launch_typed<__half>(tensors, num_tensors, h, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace megatrain::fused_adam
