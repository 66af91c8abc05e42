// Torch binding of the CUDA masking-noise kernel, bound as megatron_nbdiff._noise_cuda.
// The kernel itself (noise_cuda.cu) knows nothing of torch; this file checks the tensors,
// allocates the outputs and launches on the current CUDA stream of the tokens' device.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "noise_binding.h"
#include "noise_cuda.h"

namespace nbdiff {
namespace {

NoiseResult mask_tokens_cuda(const at::Tensor& tokens, const std::optional<at::Tensor>& loss_mask,
                             const at::Tensor& sample_index, int64_t block_size, int64_t mask_id,
                             uint64_t seed, int64_t step, double eps, double scale, int64_t t_mode,
                             int64_t t_sampling, int64_t strata, int64_t weight_mode,
                             bool keep_block_first) {
  TORCH_CHECK(tokens.is_cuda(), "the CUDA noise kernel needs CUDA tensors");
  const NoiseParams p = make_params(tokens, loss_mask, sample_index, block_size, mask_id, seed,
                                    step, eps, scale, t_mode, t_sampling, strata, weight_mode,
                                    keep_block_first);
  const c10::cuda::CUDAGuard guard(tokens.device());
  NoiseResult out = make_outputs(tokens);
  if (tokens.numel() == 0) return out;
  const uint8_t* lm =
      loss_mask.has_value() ? reinterpret_cast<const uint8_t*>(loss_mask->data_ptr<bool>()) : nullptr;
  const cudaError_t status = launch_noise_cuda(
      p, static_cast<int>(tokens.element_size()), tokens.data_ptr(), lm,
      sample_index.data_ptr<int64_t>(), std::get<0>(out).data_ptr(),
      reinterpret_cast<uint8_t*>(std::get<1>(out).data_ptr<bool>()), std::get<2>(out).data_ptr<float>(),
      std::get<3>(out).data_ptr<float>(), c10::cuda::getCurrentCUDAStream(tokens.device().index()).stream());
  TORCH_CHECK(status == cudaSuccess, "masking-noise kernel launch failed: ", cudaGetErrorString(status));
  return out;
}

}  // namespace
}  // namespace nbdiff

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA masking-noise kernel of megatron_nbdiff; see megatron_nbdiff.noise";
  m.def("mask_tokens", &nbdiff::mask_tokens_cuda, pybind11::arg("tokens"), pybind11::arg("loss_mask"),
        pybind11::arg("sample_index"), pybind11::arg("block_size"), pybind11::arg("mask_id"),
        pybind11::arg("seed"), pybind11::arg("step"), pybind11::arg("eps"), pybind11::arg("scale"),
        pybind11::arg("t_mode"), pybind11::arg("t_sampling"), pybind11::arg("strata"),
        pybind11::arg("weight_mode"), pybind11::arg("keep_block_first"),
        "Fused masking noise on CUDA tensors: returns (noisy_ids, is_masked, t, weight).");
}
