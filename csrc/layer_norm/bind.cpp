// torch binding for the CUDA LayerNorm/RMSNorm: torch.ops.megatrain_layer_norm.{forward,backward}
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "layer_norm.h"

namespace {

namespace ln = megatrain::layer_norm;
using megatrain::cuda::DType;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "layer_norm: x must be float32, bfloat16 or float16, got ", t);
  }
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.device() == x.device(), "layer_norm: ", what, " is on ", t.device(), ", x on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "layer_norm: ", what, " is ", t.scalar_type(), ", x is ",
              x.scalar_type(), "; cast it to x's dtype first");
  TORCH_CHECK(t.is_contiguous(), "layer_norm: ", what, " is not contiguous");
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(),
              "layer_norm: x must be a contiguous (rows, hidden) CUDA tensor, got ", x.sizes(), " on ", x.device());
  TORCH_CHECK(x.size(1) > 0 && x.size(1) <= std::numeric_limits<int>::max(), "layer_norm: bad hidden size ", x.size(1));
}

// x: (rows, H); weight, bias: (H,) in x's dtype. Returns y (rows, H), mean (rows,) fp32 (empty for RMS),
// rstd (rows,) fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, double eps, bool rms) {
  check_x(x);
  check_like(weight, x, "weight");
  TORCH_CHECK(weight.numel() == x.size(1), "layer_norm: weight has ", weight.numel(), " elements, hidden is ", x.size(1));
  const bool has_bias = bias.has_value() && bias->defined() && !rms;
  if (has_bias) {
    check_like(*bias, x, "bias");
    TORCH_CHECK(bias->numel() == x.size(1), "layer_norm: bias has ", bias->numel(), " elements, hidden is ", x.size(1));
  }
  const int64_t rows = x.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rms ? 0 : rows}, f32);
  at::Tensor rstd = at::empty({rows}, f32);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = ln::forward(x.data_ptr(), weight.data_ptr(), has_bias ? bias->data_ptr() : nullptr,
                                      y.data_ptr(), rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                      rows, static_cast<int>(x.size(1)), static_cast<float>(eps), rms,
                                      to_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "layer_norm: forward launch failed: ", cudaGetErrorString(err));
  return {y, mean, rstd};
}

// Returns dx (rows, H), dweight (H,), dbias (H,) (empty without bias), in x's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x,
                                                        const at::Tensor& weight, const at::Tensor& mean,
                                                        const at::Tensor& rstd, bool rms, bool has_bias) {
  check_x(x);
  check_like(dy, x, "dy");
  check_like(weight, x, "weight");
  TORCH_CHECK(dy.sizes() == x.sizes(), "layer_norm: dy ", dy.sizes(), " and x ", x.sizes(), " differ");
  const int64_t rows = x.size(0);
  const int hidden = static_cast<int>(x.size(1));
  TORCH_CHECK(rstd.numel() == rows && (rms || mean.numel() == rows), "layer_norm: saved mean/rstd do not match x");
  has_bias = has_bias && !rms;
  const c10::cuda::CUDAGuard guard(x.device());
  const int splits = ln::param_grad_splits(rows, hidden);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw_part = at::empty({splits, hidden}, f32);
  at::Tensor db_part = at::empty({has_bias ? splits : 0, hidden}, f32);
  at::Tensor dw = at::empty_like(weight);
  at::Tensor db = has_bias ? at::empty_like(weight) : at::empty({0}, weight.options());
  const cudaError_t err = ln::backward(
      dy.data_ptr(), x.data_ptr(), weight.data_ptr(), rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
      dx.data_ptr(), dw_part.data_ptr<float>(), has_bias ? db_part.data_ptr<float>() : nullptr, dw.data_ptr(),
      has_bias ? db.data_ptr() : nullptr, splits, rows, hidden, rms, to_dtype(x.scalar_type()),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "layer_norm: backward launch failed: ", cudaGetErrorString(err));
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY(megatrain_layer_norm, m) {
  m.def("forward(Tensor x, Tensor weight, Tensor? bias, float eps, bool rms) -> (Tensor, Tensor, Tensor)", &forward);
  m.def(
      "backward(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, bool rms, bool has_bias) "
      "-> (Tensor, Tensor, Tensor)",
      &backward);
}
