// torch binding for the CUDA fused AdamW: torch.ops.megatrain_fused_adam.adamw_step
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "fused_adam.h"

namespace {

namespace fa = megatrain::fused_adam;
using megatrain::cuda::DType;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "fused_adam: params must be float32, bfloat16 or float16, got ", t);
  }
}

void check(const at::Tensor& t, const at::Tensor& like, at::ScalarType dtype, const char* what, size_t i) {
  TORCH_CHECK(t.device() == like.device(), "fused_adam: ", what, "[", i, "] is on ", t.device(), ", params[0] on ",
              like.device(), "; all tensors of one step must share a CUDA device");
  TORCH_CHECK(t.scalar_type() == dtype, "fused_adam: ", what, "[", i, "] is ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.is_contiguous(), "fused_adam: ", what, "[", i, "] is not contiguous; call .contiguous() first");
}

// params: one dtype (fp32/bf16/fp16), updated in place; grads: the params' dtype; moments: fp32.
void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "fused_adam: params, grads, exp_avgs, exp_avg_sqs must have the same length");
  TORCH_CHECK(step >= 1, "fused_adam: step counts from 1 (got ", step, ")");
  if (n == 0) return;
  const at::Tensor& first = params[0];
  TORCH_CHECK(first.is_cuda(), "fused_adam: params are on ", first.device(), "; use the CPU AdamW for CPU params");
  const at::ScalarType dtype = first.scalar_type();
  std::vector<fa::TensorPtrs> ptrs(n);
  for (size_t i = 0; i < n; ++i) {
    check(params[i], first, dtype, "params", i);
    check(grads[i], first, dtype, "grads", i);
    check(exp_avgs[i], first, at::kFloat, "exp_avgs", i);
    check(exp_avg_sqs[i], first, at::kFloat, "exp_avg_sqs", i);
    const int64_t numel = params[i].numel();
    TORCH_CHECK(grads[i].numel() == numel && exp_avgs[i].numel() == numel && exp_avg_sqs[i].numel() == numel,
                "fused_adam: tensors of param ", i, " differ in size");
    ptrs[i] = {params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr<float>(),
               exp_avg_sqs[i].data_ptr<float>(), numel};
  }
  const c10::cuda::CUDAGuard guard(first.device());
  const cudaError_t err = fa::launch(ptrs.data(), static_cast<int>(n), to_dtype(dtype),
                                     fa::make_hyper(lr, beta1, beta2, eps, weight_decay, step),
                                     c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fused_adam: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY(megatrain_fused_adam, m) {
  m.def(
      "adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()",
      &adamw_step);
}
