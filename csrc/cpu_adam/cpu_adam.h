// CPU AdamW over fp32 master weights: plain-pointer interface.
// No torch headers here so this translation unit compiles in about a second; bind.cpp adapts tensors.
#pragma once

#include <cstdint>

namespace megatrain::cpu_adam {

// One tensor's worth of state; all arrays hold `numel` elements, contiguous.
struct Slot {
  float* param;          // fp32 master weights, updated in place
  const float* grad;     // fp32 gradient
  float* exp_avg;        // first moment (fp32)
  float* exp_avg_sq;     // second moment (fp32)
  uint16_t* bf16_out;    // optional bf16 copy of the updated param (nullptr: none)
  int64_t numel;
};

// Scalars shared by every element of one step; derived once on the host in double.
struct Hyper {
  float decay;         // 1 - lr * weight_decay (decoupled weight decay)
  float one_minus_b1;  // 1 - beta1
  float beta2;
  float one_minus_b2;  // 1 - beta2
  float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^step)
  float eps;
  float neg_step_size; // -lr / (1 - beta1^step)
};

Hyper make_hyper(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step);

// Instruction sets this build can run on this CPU, best first ("avx512", "avx2", "scalar").
const char* best_isa();
bool isa_supported(const char* isa);

// Updates every slot. Work is cut into fixed chunks (a multiple of every vector width) and each element
// goes through the same instructions whatever the thread count, so results are bit-identical for any
// num_threads. isa: nullptr or "auto" picks best_isa(). Returns false for an unknown/unsupported isa.
bool step(const Slot* slots, int64_t num_slots, const Hyper& h, int num_threads, const char* isa);

// Zeroed fp32 buffer for optimizer state, 2 MiB aligned and marked for transparent huge pages:
// fewer TLB misses on the 4-stream sweep (7.4 vs 8.6 ms per 10M-param step on one core here).
// Zero-filled by num_threads threads (first touch). Release with free_state.
float* alloc_state(int64_t numel, int num_threads);
void free_state(void* ptr);

}  // namespace megatrain::cpu_adam
