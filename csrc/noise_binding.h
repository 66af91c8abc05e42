// Torch-facing helpers shared by the CPU binding (noise_cpu.cpp) and the CUDA binding
// (noise_cuda_binding.cpp): internal checks, the kernel parameters and the output tensors.
//
// User-facing validation (clear ValueError / TypeError messages) happens in Python, in
// megatron_nbdiff/noise/masking.py; the checks here only guard the C++ boundary.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "noise_core.h"

namespace nbdiff {

using NoiseResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks the tensors and fills the kernel parameters.
inline NoiseParams make_params(const at::Tensor& tokens, const std::optional<at::Tensor>& loss_mask,
                               const at::Tensor& sample_index, int64_t block_size, int64_t mask_id,
                               uint64_t seed, int64_t step, double eps, double scale,
                               int64_t t_mode, int64_t t_sampling, int64_t strata,
                               int64_t weight_mode, bool keep_block_first) {
  TORCH_CHECK(tokens.dim() == 2, "tokens must be [batch, length], got ", tokens.sizes());
  TORCH_CHECK(tokens.scalar_type() == at::kInt || tokens.scalar_type() == at::kLong,
              "tokens must be int32 or int64, got ", tokens.scalar_type());
  TORCH_CHECK(tokens.is_contiguous(), "tokens must be contiguous");
  TORCH_CHECK(sample_index.scalar_type() == at::kLong && sample_index.dim() == 1 &&
                  sample_index.size(0) == tokens.size(0) && sample_index.is_contiguous(),
              "sample_index must be a contiguous int64 tensor [batch]");
  TORCH_CHECK(sample_index.device() == tokens.device(), "sample_index must be on the tokens' device");
  if (loss_mask.has_value()) {
    const at::Tensor& lm = *loss_mask;
    TORCH_CHECK(lm.scalar_type() == at::kBool && lm.sizes() == tokens.sizes() && lm.is_contiguous(),
                "loss_mask must be a contiguous bool tensor shaped like tokens");
    TORCH_CHECK(lm.device() == tokens.device(), "loss_mask must be on the tokens' device");
  }
  const int64_t cols = tokens.size(1);
  TORCH_CHECK(block_size >= 1 && cols % block_size == 0, "block_size must divide the length");
  TORCH_CHECK(step >= 0 && step <= 0xFFFFFFFFLL, "step must be in [0, 2^32)");
  TORCH_CHECK(t_mode == kTPerBlock || t_mode == kTPerSequence, "bad t_mode code");
  TORCH_CHECK(t_sampling >= kSampleUniform && t_sampling <= kSampleStratified, "bad t_sampling code");
  TORCH_CHECK(weight_mode == kWeightOne || weight_mode == kWeightInvT, "bad weight_mode code");
  TORCH_CHECK(strata >= 1 && strata <= 65536, "strata must be in [1, 65536]");
  NoiseParams p;
  p.rows = tokens.size(0);
  p.cols = cols;
  p.block_size = block_size;
  p.mask_id = mask_id;
  p.key0 = static_cast<uint32_t>(seed & 0xFFFFFFFFull);
  p.key1 = static_cast<uint32_t>(seed >> 32);
  p.step = static_cast<uint32_t>(step);
  p.eps = static_cast<float>(eps);
  p.scale = static_cast<float>(scale);
  TORCH_CHECK(static_cast<double>(p.eps) == eps && static_cast<double>(p.scale) == scale,
              "eps and scale must be float32 values");
  p.t_mode = static_cast<int32_t>(t_mode);
  p.t_sampling = static_cast<int32_t>(t_sampling);
  p.strata = static_cast<uint32_t>(strata);
  p.weight_mode = static_cast<int32_t>(weight_mode);
  p.keep_block_first = keep_block_first;
  return p;
}

// Empty outputs on the tokens' device: noisy ids (tokens' dtype), is_masked (bool), t, weight.
inline NoiseResult make_outputs(const at::Tensor& tokens) {
  const auto f32 = tokens.options().dtype(at::kFloat);
  return NoiseResult(at::empty_like(tokens), at::empty(tokens.sizes(), tokens.options().dtype(at::kBool)),
                     at::empty(tokens.sizes(), f32), at::empty(tokens.sizes(), f32));
}

}  // namespace nbdiff
