// CUDA fused multi-tensor AdamW: plain-pointer host interface (no torch headers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dtype.h"

namespace megatrain::fused_adam {

// One tensor: param/grad in the launch's dtype, moments always fp32; all `numel` long, contiguous.
struct TensorPtrs {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t numel;
};

// Per-step scalars, derived on the host in double (same meaning as the CPU AdamW's).
struct Hyper {
  float decay;          // 1 - lr * weight_decay
  float one_minus_b1;   // 1 - beta1
  float beta2;
  float one_minus_b2;   // 1 - beta2
  float inv_bc2_sqrt;   // 1 / sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
};

Hyper make_hyper(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step);

// Updates every tensor in as few launches as the kernel-argument table allows (one for up to
// kMaxTensors tensors and kMaxBlocks chunks of kChunk elements). Returns the first launch error.
cudaError_t launch(const TensorPtrs* tensors, int num_tensors, megatrain::cuda::DType dtype, const Hyper& h,
                   cudaStream_t stream);

}  // namespace megatrain::fused_adam
