// C++ (CPU) masking-noise kernel, bound as megatron_nbdiff._noise_cpu.
//
// One pass over the tokens: for every group of four tokens, one Philox call gives the four
// token words, the block's t comes from its own Philox call, and the noisy id, mask flag, t
// and weight are written at once (noise_core.h). Work items are (row, chunk of a row), spread
// over OpenMP threads; the number of threads follows torch.get_num_threads().
#include <omp.h>

#include <algorithm>
#include <vector>

#include "noise_binding.h"
#include "noise_core.h"
#include "philox.h"

namespace nbdiff {
namespace {

constexpr int64_t kGroupsPerChunk = 1024;  // 4096 tokens per work item

template <typename T>
void noise_cpu_kernel(const NoiseParams& p, const T* tokens, const uint8_t* loss_mask,
                      const int64_t* sample_index, T* ids, uint8_t* masked, float* t, float* w) {
  const int64_t cols = p.cols;
  const int64_t groups_per_row = (cols + 3) / 4;
  const int64_t chunks_per_row = (groups_per_row + kGroupsPerChunk - 1) / kGroupsPerChunk;
  const int64_t items = p.rows * chunks_per_row;
  const int threads = std::max(1, at::get_num_threads());
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t row = item / chunks_per_row;
    const int64_t chunk = item - row * chunks_per_row;
    const uint64_t g = static_cast<uint64_t>(sample_index[row]);
    const int64_t first = chunk * kGroupsPerChunk;
    const int64_t last = std::min(groups_per_row, first + kGroupsPerChunk);
    const int64_t base = row * cols;
    TCache cache = empty_t_cache();
    int64_t block = (first * 4) / p.block_size;  // block and offset of pos0, advanced below
    int64_t offset = first * 4 - block * p.block_size;
    for (int64_t group = first; group < last; ++group) {
      const int64_t pos0 = group * 4;
      const int n = static_cast<int>(std::min<int64_t>(4, cols - pos0));
      const int64_t at = base + pos0;
      T tok[4] = {0, 0, 0, 0};
      uint8_t has_loss[4] = {1, 1, 1, 1};
      for (int i = 0; i < n; ++i) {
        tok[i] = tokens[at + i];
        if (loss_mask != nullptr) has_loss[i] = loss_mask[at + i];
      }
      T out_ids[4];
      uint8_t out_masked[4];
      float out_t[4];
      float out_w[4];
      noise_group<T>(p, cache, g, pos0, block, offset, n, tok, has_loss, out_ids, out_masked,
                     out_t, out_w);
      for (offset += 4; offset >= p.block_size; offset -= p.block_size) ++block;
      for (int i = 0; i < n; ++i) {
        ids[at + i] = out_ids[i];
        masked[at + i] = out_masked[i];
        t[at + i] = out_t[i];
        w[at + i] = out_w[i];
      }
    }
  }
}

NoiseResult mask_tokens_cpu(const at::Tensor& tokens, const std::optional<at::Tensor>& loss_mask,
                            const at::Tensor& sample_index, int64_t block_size, int64_t mask_id,
                            uint64_t seed, int64_t step, double eps, double scale, int64_t t_mode,
                            int64_t t_sampling, int64_t strata, int64_t weight_mode,
                            bool keep_block_first) {
  TORCH_CHECK(tokens.device().is_cpu(), "the C++ noise kernel needs CPU tensors");
  const NoiseParams p = make_params(tokens, loss_mask, sample_index, block_size, mask_id, seed,
                                    step, eps, scale, t_mode, t_sampling, strata, weight_mode,
                                    keep_block_first);
  NoiseResult out = make_outputs(tokens);
  if (tokens.numel() == 0) return out;
  const uint8_t* lm =
      loss_mask.has_value() ? reinterpret_cast<const uint8_t*>(loss_mask->data_ptr<bool>()) : nullptr;
  const int64_t* sidx = sample_index.data_ptr<int64_t>();
  uint8_t* masked = reinterpret_cast<uint8_t*>(std::get<1>(out).data_ptr<bool>());
  float* t = std::get<2>(out).data_ptr<float>();
  float* w = std::get<3>(out).data_ptr<float>();
  if (tokens.scalar_type() == at::kInt) {
    noise_cpu_kernel<int32_t>(p, tokens.data_ptr<int32_t>(), lm, sidx,
                              std::get<0>(out).data_ptr<int32_t>(), masked, t, w);
  } else {
    noise_cpu_kernel<int64_t>(p, tokens.data_ptr<int64_t>(), lm, sidx,
                              std::get<0>(out).data_ptr<int64_t>(), masked, t, w);
  }
  return out;
}

std::vector<uint32_t> philox_words(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                   uint32_t k1) {
  const PhiloxWords r = philox4x32_10(c0, c1, c2, c3, k0, k1);
  return {r.w[0], r.w[1], r.w[2], r.w[3]};
}

}  // namespace
}  // namespace nbdiff

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "C++ (CPU, OpenMP) masking-noise kernel of megatron_nbdiff; see megatron_nbdiff.noise";
  m.def("mask_tokens", &nbdiff::mask_tokens_cpu, pybind11::arg("tokens"), pybind11::arg("loss_mask"),
        pybind11::arg("sample_index"), pybind11::arg("block_size"), pybind11::arg("mask_id"),
        pybind11::arg("seed"), pybind11::arg("step"), pybind11::arg("eps"), pybind11::arg("scale"),
        pybind11::arg("t_mode"), pybind11::arg("t_sampling"), pybind11::arg("strata"),
        pybind11::arg("weight_mode"), pybind11::arg("keep_block_first"),
        "Fused masking noise on CPU tensors: returns (noisy_ids, is_masked, t, weight).");
  m.def("philox4x32_10", &nbdiff::philox_words, pybind11::arg("c0"), pybind11::arg("c1"),
        pybind11::arg("c2"), pybind11::arg("c3"), pybind11::arg("k0"), pybind11::arg("k1"),
        "The four Philox-4x32-10 words for counter (c0, c1, c2, c3) and key (k0, k1).");
}
