// CUDA LayerNorm / RMSNorm forward and backward over the last dim: plain-pointer host interface.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dtype.h"

namespace megatrain::layer_norm {

using megatrain::cuda::DType;

// x, y: (rows, hidden); weight, bias: (hidden), all of `dtype`. bias may be null (ignored when rms).
// mean, rstd: (rows,) fp32 saved for backward; mean may be null when rms.
cudaError_t forward(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                    int64_t rows, int hidden, float eps, bool rms, DType dtype, cudaStream_t stream);

// Row splits of the weight/bias-gradient reduction; the caller allocates (splits, hidden) fp32 partials.
int param_grad_splits(int64_t rows, int hidden);

// dy, x, dx: (rows, hidden); dweight, dbias: (hidden) in `dtype` (dbias/dbias_part null: no bias).
// dweight_part, dbias_part: (splits, hidden) fp32 scratch from param_grad_splits.
cudaError_t backward(const void* dy, const void* x, const void* weight, const float* mean, const float* rstd,
                     void* dx, float* dweight_part, float* dbias_part, void* dweight, void* dbias, int splits,
                     int64_t rows, int hidden, bool rms, DType dtype, cudaStream_t stream);

}  // namespace megatrain::layer_norm
