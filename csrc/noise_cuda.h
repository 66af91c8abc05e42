// Plain C++ interface of the CUDA masking-noise kernel (noise_cuda.cu): raw pointers and a
// stream, no torch types, so that the kernel compiles with nvcc alone. The torch-facing binding
// is noise_cuda_binding.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "noise_core.h"

namespace nbdiff {

// Launches the fused kernel on `stream`. All pointers are device pointers to contiguous
// [rows, cols] arrays (sample_index: [rows]); token_bytes is 4 (int32) or 8 (int64) and applies
// to both `tokens` and `noisy_ids`; `loss_mask` (bytes 0/1) may be null, meaning every token
// carries loss. Returns the launch status (cudaSuccess, or the error of the launch).
cudaError_t launch_noise_cuda(const NoiseParams& params, int token_bytes, const void* tokens,
                              const uint8_t* loss_mask, const int64_t* sample_index,
                              void* noisy_ids, uint8_t* is_masked, float* t, float* weight,
                              cudaStream_t stream);

}  // namespace nbdiff
