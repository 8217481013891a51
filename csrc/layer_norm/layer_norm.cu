// CUDA LayerNorm / RMSNorm, forward and backward, fp32 accumulation, 16-byte vectorised rows.
//
// Row kernels come in two shapes chosen by hidden size:
//   warp-per-row  (hidden <= kWarpMaxHidden, vectorisable): 4 rows per 128-thread block, reductions are
//                 pure shuffles, no shared memory or block barriers;
//   block-per-row (everything else, any hidden): one row per block, warp shuffles + one smem exchange.
// Both stream the row twice (statistics, then output); the second pass hits L1/L2, so DRAM sees each
// element read once and written once. Statistics use sums shifted by the row's first element, which
// keeps E[(x-K)^2] - E[x-K]^2 free of cancellation when |mean| >> std (one pass, no Welford divides).
// Weight/bias gradients are a separate column-parallel reduction over row splits, then a fixed-order
// sum over splits: deterministic, no atomics.
#include "layer_norm.h"

#include <algorithm>
#include <initializer_list>

#include "../common/cuda_utils.cuh"

namespace megatrain::layer_norm {
namespace {

using megatrain::cuda::ceil_div;
using megatrain::cuda::load_vec;
using megatrain::cuda::store_vec;
using megatrain::cuda::to_float;
using megatrain::cuda::warp_sum;

constexpr int kWarpRowsPerBlock = 4;
constexpr int kWarpMaxHidden = 1024;  // <= 4 16-byte vectors per lane for bf16, 8 for fp32
constexpr int kColTile = 32;          // param-grad kernel: 32 columns x 8 row lanes per block
constexpr int kRowLanes = 8;

// A "group" cooperates on one row: a warp or a whole block.
template <bool WARP>
struct Group;

template <>
struct Group<true> {  // blockDim = (32, kWarpRowsPerBlock)
  __device__ static int rank() { return threadIdx.x; }
  __device__ static int size() { return 32; }
  __device__ static int64_t first_row() { return static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; }
  __device__ static int64_t row_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.y; }
  __device__ static void sum2(float& a, float& b, float (*)[32]) {
    a = warp_sum(a);
    b = warp_sum(b);
  }
};

template <>
struct Group<false> {  // blockDim = (threads, 1), threads a multiple of 32
  __device__ static int rank() { return threadIdx.x; }
  __device__ static int size() { return blockDim.x; }
  __device__ static int64_t first_row() { return blockIdx.x; }
  __device__ static int64_t row_stride() { return gridDim.x; }
  __device__ static void sum2(float& a, float& b, float (*smem)[32]) {
    a = warp_sum(a);
    b = warp_sum(b);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    __syncthreads();  // the previous row's readers are done with smem
    if (lane == 0) {
      smem[0][warp] = a;
      smem[1][warp] = b;
    }
    __syncthreads();
    // every warp reduces the same per-warp partials, so all threads get the total without a 3rd barrier
    a = warp_sum(lane < num_warps ? smem[0][lane] : 0.f);
    b = warp_sum(lane < num_warps ? smem[1][lane] : 0.f);
  }
};

// Warp kernels launch 128 threads (min 4 blocks/SM keeps ptxas from spilling); block kernels up to 1024.
#define MT_ROW_BOUNDS __launch_bounds__(WARP ? 32 * kWarpRowsPerBlock : 1024, WARP ? 4 : 1)

template <typename T, bool RMS, bool HAS_BIAS, int VEC, bool WARP>
__global__ void MT_ROW_BOUNDS norm_fwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                         T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                         int64_t rows, int hidden, float eps) {
  using G = Group<WARP>;
  __shared__ float smem[2][32];
  const int num_vec = hidden / VEC;
  const float inv_h = 1.f / static_cast<float>(hidden);
  for (int64_t row = G::first_row(); row < rows; row += G::row_stride()) {
    const T* xr = x + row * hidden;
    const float shift = RMS ? 0.f : to_float(xr[0]);
    float s1 = 0.f, s2 = 0.f;  // sum (x - shift), sum (x - shift)^2
    for (int i = G::rank(); i < num_vec; i += G::size()) {
      float v[VEC];
      load_vec<T, VEC>(xr + i * VEC, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = v[k] - shift;
        s1 += d;
        s2 = fmaf(d, d, s2);
      }
    }
    G::sum2(s1, s2, smem);
    const float m1 = s1 * inv_h;
    const float mean = RMS ? 0.f : shift + m1;
    const float var = RMS ? s2 * inv_h : fmaxf(s2 * inv_h - m1 * m1, 0.f);
    const float rstd = rsqrtf(var + eps);
    if (G::rank() == 0) {
      if (!RMS) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    T* yr = y + row * hidden;
    for (int i = G::rank(); i < num_vec; i += G::size()) {
      float v[VEC], wv[VEC], bv[VEC];
      load_vec<T, VEC>(xr + i * VEC, v);
      load_vec<T, VEC>(w + i * VEC, wv);
      if (HAS_BIAS) load_vec<T, VEC>(b + i * VEC, bv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = (v[k] - mean) * rstd * wv[k] + (HAS_BIAS ? bv[k] : 0.f);
      store_vec<T, VEC>(yr + i * VEC, v);
    }
  }
}

// dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)); RMSNorm drops the mean(w*dy) term.
template <typename T, bool RMS, int VEC, bool WARP>
__global__ void MT_ROW_BOUNDS norm_bwd_dx(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                            const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                            T* __restrict__ dx, int64_t rows, int hidden) {
  using G = Group<WARP>;
  __shared__ float smem[2][32];
  const int num_vec = hidden / VEC;
  const float inv_h = 1.f / static_cast<float>(hidden);
  for (int64_t row = G::first_row(); row < rows; row += G::row_stride()) {
    const T* xr = x + row * hidden;
    const T* gr = dy + row * hidden;
    const float mean = RMS ? 0.f : mean_in[row];
    const float rstd = rstd_in[row];
    float sum_wdy = 0.f, sum_wdy_xhat = 0.f;
    for (int i = G::rank(); i < num_vec; i += G::size()) {
      float xv[VEC], gv[VEC], wv[VEC];
      load_vec<T, VEC>(xr + i * VEC, xv);
      load_vec<T, VEC>(gr + i * VEC, gv);
      load_vec<T, VEC>(w + i * VEC, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float wdy = wv[k] * gv[k];
        sum_wdy += wdy;
        sum_wdy_xhat = fmaf(wdy, (xv[k] - mean) * rstd, sum_wdy_xhat);
      }
    }
    G::sum2(sum_wdy, sum_wdy_xhat, smem);
    const float c1 = RMS ? 0.f : sum_wdy * inv_h;
    const float c2 = sum_wdy_xhat * inv_h;
    T* dxr = dx + row * hidden;
    for (int i = G::rank(); i < num_vec; i += G::size()) {
      float xv[VEC], gv[VEC], wv[VEC];
      load_vec<T, VEC>(xr + i * VEC, xv);
      load_vec<T, VEC>(gr + i * VEC, gv);
      load_vec<T, VEC>(w + i * VEC, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) xv[k] = rstd * (wv[k] * gv[k] - c1 - (xv[k] - mean) * rstd * c2);
      store_vec<T, VEC>(dxr + i * VEC, xv);
    }
  }
}

// Partial dweight/dbias over rows {split*8 + lane, += splits*8}: (splits, hidden) fp32.
template <typename T, bool RMS, bool HAS_BIAS>
__global__ void norm_bwd_params(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
                                const float* __restrict__ rstd, float* __restrict__ dw_part,
                                float* __restrict__ db_part, int64_t rows, int hidden) {
  __shared__ float s_dw[kRowLanes][kColTile + 1];
  __shared__ float s_db[kRowLanes][kColTile + 1];
  const int col = blockIdx.x * kColTile + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kRowLanes;
  float dw = 0.f, db = 0.f;
  if (col < hidden) {
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowLanes + threadIdx.y; r < rows; r += stride) {
      const float g = to_float(dy[r * hidden + col]);
      const float xhat = (to_float(x[r * hidden + col]) - (RMS ? 0.f : mean[r])) * rstd[r];
      dw = fmaf(g, xhat, dw);
      db += g;
    }
  }
  s_dw[threadIdx.y][threadIdx.x] = dw;
  s_db[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    float tw = 0.f, tb = 0.f;
#pragma unroll
    for (int k = 0; k < kRowLanes; ++k) {
      tw += s_dw[k][threadIdx.x];
      tb += s_db[k][threadIdx.x];
    }
    dw_part[static_cast<int64_t>(blockIdx.y) * hidden + col] = tw;
    if (HAS_BIAS) db_part[static_cast<int64_t>(blockIdx.y) * hidden + col] = tb;
  }
}

template <typename T, bool HAS_BIAS>
__global__ void sum_splits(const float* __restrict__ dw_part, const float* __restrict__ db_part, T* __restrict__ dw,
                           T* __restrict__ db, int hidden, int splits) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= hidden) return;
  float tw = 0.f, tb = 0.f;
  for (int s = 0; s < splits; ++s) {  // fixed order: bit-reproducible run to run
    tw += dw_part[static_cast<int64_t>(s) * hidden + col];
    if (HAS_BIAS) tb += db_part[static_cast<int64_t>(s) * hidden + col];
  }
  dw[col] = megatrain::cuda::from_float<T>(tw);
  if (HAS_BIAS) db[col] = megatrain::cuda::from_float<T>(tb);
}

int num_sms() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 132;
}

bool all_aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && !megatrain::cuda::aligned16(p)) return false;
  return true;
}

// Row-kernel launch shape: warp-per-row for small vectorisable rows, else a block per row with enough
// threads for <= 4 vectors each (128..1024 threads).
struct RowLaunch {
  bool warp;
  dim3 grid, block;
};

RowLaunch row_launch(int64_t rows, int hidden, int vec) {
  const int64_t max_grid = static_cast<int64_t>(num_sms()) * 32;  // grid-stride beyond this
  if (vec > 1 && hidden <= kWarpMaxHidden) {
    const int64_t blocks = std::min(ceil_div(rows, kWarpRowsPerBlock), max_grid);
    return {true, dim3(static_cast<unsigned>(blocks)), dim3(32, kWarpRowsPerBlock)};
  }
  const int64_t threads = std::min<int64_t>(1024, std::max<int64_t>(128, ceil_div(ceil_div(hidden / vec, 4), 32) * 32));
  return {false, dim3(static_cast<unsigned>(std::min(rows, max_grid))), dim3(static_cast<unsigned>(threads))};
}

template <typename T, bool RMS, bool HAS_BIAS>
cudaError_t forward_typed(const T* x, const T* w, const T* b, T* y, float* mean, float* rstd, int64_t rows,
                          int hidden, float eps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = hidden % kVec == 0 && all_aligned16({x, w, b, y});
  const RowLaunch l = row_launch(rows, hidden, vec ? kVec : 1);
  if (vec && l.warp)
    norm_fwd<T, RMS, HAS_BIAS, kVec, true><<<l.grid, l.block, 0, stream>>>(x, w, b, y, mean, rstd, rows, hidden, eps);
  else if (vec)
    norm_fwd<T, RMS, HAS_BIAS, kVec, false><<<l.grid, l.block, 0, stream>>>(x, w, b, y, mean, rstd, rows, hidden, eps);
  else
    norm_fwd<T, RMS, HAS_BIAS, 1, false><<<l.grid, l.block, 0, stream>>>(x, w, b, y, mean, rstd, rows, hidden, eps);
  return cudaGetLastError();
}

template <typename T, bool RMS, bool HAS_BIAS>
cudaError_t backward_typed(const T* dy, const T* x, const T* w, const float* mean, const float* rstd, T* dx,
                           float* dw_part, float* db_part, T* dw, T* db, int splits, int64_t rows, int hidden,
                           cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = hidden % kVec == 0 && all_aligned16({dy, x, w, dx});
  const RowLaunch l = row_launch(rows, hidden, vec ? kVec : 1);
  if (vec && l.warp)
    norm_bwd_dx<T, RMS, kVec, true><<<l.grid, l.block, 0, stream>>>(dy, x, w, mean, rstd, dx, rows, hidden);
  else if (vec)
    norm_bwd_dx<T, RMS, kVec, false><<<l.grid, l.block, 0, stream>>>(dy, x, w, mean, rstd, dx, rows, hidden);
  else
    norm_bwd_dx<T, RMS, 1, false><<<l.grid, l.block, 0, stream>>>(dy, x, w, mean, rstd, dx, rows, hidden);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(hidden, kColTile)), static_cast<unsigned>(splits));
  norm_bwd_params<T, RMS, HAS_BIAS><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(dy, x, mean, rstd, dw_part,
                                                                                    db_part, rows, hidden);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  sum_splits<T, HAS_BIAS><<<static_cast<unsigned>(ceil_div(hidden, 256)), 256, 0, stream>>>(dw_part, db_part, dw, db,
                                                                                            hidden, splits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_dispatch(const void* x, const void* w, const void* b, void* y, float* mean, float* rstd,
                             int64_t rows, int hidden, float eps, bool rms, cudaStream_t stream) {
  auto X = static_cast<const T*>(x);
  auto W = static_cast<const T*>(w);
  auto B = static_cast<const T*>(b);
  auto Y = static_cast<T*>(y);
  if (rms) return forward_typed<T, true, false>(X, W, nullptr, Y, nullptr, rstd, rows, hidden, eps, stream);
  if (b != nullptr) return forward_typed<T, false, true>(X, W, B, Y, mean, rstd, rows, hidden, eps, stream);
  return forward_typed<T, false, false>(X, W, nullptr, Y, mean, rstd, rows, hidden, eps, stream);
}

template <typename T>
cudaError_t backward_dispatch(const void* dy, const void* x, const void* w, const float* mean, const float* rstd,
                              void* dx, float* dw_part, float* db_part, void* dw, void* db, int splits, int64_t rows,
                              int hidden, bool rms, cudaStream_t stream) {
  auto DY = static_cast<const T*>(dy);
  auto X = static_cast<const T*>(x);
  auto W = static_cast<const T*>(w);
  auto DX = static_cast<T*>(dx);
  auto DW = static_cast<T*>(dw);
  auto DB = static_cast<T*>(db);
  if (rms)
    return backward_typed<T, true, false>(DY, X, W, nullptr, rstd, DX, dw_part, nullptr, DW, nullptr, splits, rows,
                                          hidden, stream);
  if (db != nullptr)
    return backward_typed<T, false, true>(DY, X, W, mean, rstd, DX, dw_part, db_part, DW, DB, splits, rows, hidden,
                                          stream);
  return backward_typed<T, false, false>(DY, X, W, mean, rstd, DX, dw_part, nullptr, DW, nullptr, splits, rows,
                                         hidden, stream);
}

}  // namespace

cudaError_t forward(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                    int64_t rows, int hidden, float eps, bool rms, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return forward_dispatch<float>(x, weight, bias, y, mean, rstd, rows, hidden, eps, rms, stream);
    case DType::kBFloat16:
      return forward_dispatch<__nv_bfloat16>(x, weight, bias, y, mean, rstd, rows, hidden, eps, rms, stream);
    case DType::kFloat16: return forward_dispatch<__half>(x, weight, bias, y, mean, rstd, rows, hidden, eps, rms, stream);
  }
  return cudaErrorInvalidValue;
}

int param_grad_splits(int64_t rows, int hidden) {
  // enough blocks for ~4 waves over the SMs, each split covering >= 8 rows
  const int64_t col_blocks = ceil_div(hidden, kColTile);
  const int64_t want = ceil_div(static_cast<int64_t>(num_sms()) * 4, col_blocks);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, ceil_div(rows, kRowLanes), 1024})));
}

cudaError_t backward(const void* dy, const void* x, const void* weight, const float* mean, const float* rstd,
                     void* dx, float* dweight_part, float* dbias_part, void* dweight, void* dbias, int splits,
                     int64_t rows, int hidden, bool rms, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_dispatch<float>(dy, x, weight, mean, rstd, dx, dweight_part, dbias_part, dweight, dbias, splits,
                                      rows, hidden, rms, stream);
    case DType::kBFloat16:
      return backward_dispatch<__nv_bfloat16>(dy, x, weight, mean, rstd, dx, dweight_part, dbias_part, dweight, dbias,
                                              splits, rows, hidden, rms, stream);
    case DType::kFloat16:
      return backward_dispatch<__half>(dy, x, weight, mean, rstd, dx, dweight_part, dbias_part, dweight, dbias, splits,
                                       rows, hidden, rms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace megatrain::layer_norm
