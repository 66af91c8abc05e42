// The masking-noise function for one group of four consecutive tokens of a row, shared by the
// C++ (host, OpenMP) kernel in noise_cpu.cpp and the CUDA kernel in noise_cuda.cu.
//
// Everything the two kernels compute goes through the functions below, so the two backends
// differ only in how they load and store a group. The exact definitions (Philox counters,
// stream ids, the 24-bit uniforms, t, antithetic and stratified sampling, the mask decision and
// the weight) are documented in megatron_nbdiff/noise/__init__.py, and the pure-torch reference
// megatron_nbdiff/noise/reference.py reproduces them bit for bit.
//
// Floating point: the only float operations are the exact conversion of a 24-bit integer to
// float, multiplications by 2^-24 (exact), t = eps + scale * u (one rounded multiply, one
// rounded add, never fused into an FMA) and, for weight_mode inv_t, 1 / t (IEEE division).
// On the device they use __fmul_rn / __fadd_rn / __fdiv_rn, which stay IEEE round-to-nearest
// and are never contracted, even under --use_fast_math. On the host the product goes through a
// volatile, so no compiler can contract it into an FMA whatever the -ffp-contract setting.
// The Python face keeps float32(eps) in [1e-30, 1), so t, 1 / t and every intermediate are
// normal numbers and --use_fast_math's flush-to-zero cannot change a result either.
#pragma once

#include <cstdint>

#include "philox.h"

namespace nbdiff {

// t_mode
constexpr int32_t kTPerBlock = 0;
constexpr int32_t kTPerSequence = 1;
// t_sampling
constexpr int32_t kSampleUniform = 0;
constexpr int32_t kSampleAntithetic = 1;
constexpr int32_t kSampleStratified = 2;
// weight_mode
constexpr int32_t kWeightOne = 0;
constexpr int32_t kWeightInvT = 1;

// Philox stream ids (low 8 bits of counter word c1).
constexpr uint32_t kStreamToken = 0u;
constexpr uint32_t kStreamTUniform = 1u;
constexpr uint32_t kStreamTAntithetic = 2u;
constexpr uint32_t kStreamTStratified = 3u;   // per-sample offset inside the stratum
constexpr uint32_t kStreamTStrataShift = 4u;  // per-group rotation of the strata

constexpr uint32_t kU24Max = 0xFFFFFFu;                    // 2^24 - 1
constexpr float kTwoPowMinus24 = 5.9604644775390625e-08f;  // 2^-24, exact in float32

// Everything the kernel needs besides the tensors. Filled by the bindings from the arguments
// the Python face has already validated.
struct NoiseParams {
  int64_t rows;        // batch size
  int64_t cols;        // sequence length L
  int64_t block_size;  // B, divides L
  int64_t mask_id;     // mask token id m
  uint32_t key0;       // seed & 0xffffffff
  uint32_t key1;       // seed >> 32
  uint32_t step;       // training step, counter word c3
  float eps;           // float32(eps)
  float scale;         // float32(1 - float32(eps)), rounded once in float32
  int32_t t_mode;      // kTPerBlock or kTPerSequence
  int32_t t_sampling;  // kSampleUniform, kSampleAntithetic or kSampleStratified
  uint32_t strata;     // G, the stratified group size (1 <= G <= 65536)
  int32_t weight_mode; // kWeightOne or kWeightInvT
  bool keep_block_first;
};

NBD_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float product = a * b;  // a rounded product that no later add can fuse with
  return product;
#endif
}

// x * 2^-24 for a 24-bit integer x: exact (no rounding), so plain code suffices on the host.
NBD_HOST_DEVICE float u24_to_float(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__uint2float_rn(x), kTwoPowMinus24);
#else
  return static_cast<float>(x) * kTwoPowMinus24;
#endif
}

NBD_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

NBD_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Philox words for (counter word c0, stream, 64-bit index idx) at this step and seed:
// counter = (c0, stream | (idx >> 32) << 8, idx & 0xffffffff, step), key = (key0, key1).
NBD_HOST_DEVICE PhiloxWords noise_words(const NoiseParams& p, uint32_t c0, uint32_t stream,
                                        uint64_t idx) {
  const uint32_t c1 = stream | (static_cast<uint32_t>(idx >> 32) << 8);
  return philox4x32_10(c0, c1, static_cast<uint32_t>(idx), p.step, p.key0, p.key1);
}

// The 24-bit uniform integer behind t for global sample g and t slot `slot` (the block index
// for per_block, 0 for per_sequence), after antithetic or stratified sampling.
NBD_HOST_DEVICE uint32_t t_uniform24(const NoiseParams& p, uint64_t g, uint32_t slot) {
  if (p.t_sampling == kSampleAntithetic) {
    const PhiloxWords r = noise_words(p, slot, kStreamTAntithetic, g >> 1);
    const uint32_t u = r.w[0] >> 8;
    return (g & 1u) ? kU24Max - u : u;
  }
  if (p.t_sampling == kSampleStratified) {
    const uint64_t groups = p.strata;
    const uint32_t rotation = noise_words(p, slot, kStreamTStrataShift, g / groups).w[0];
    const uint64_t shift = (static_cast<uint64_t>(rotation) * groups) >> 32;  // in [0, G)
    const uint64_t stratum = (g % groups + shift) % groups;
    const uint32_t offset = noise_words(p, slot, kStreamTStratified, g).w[0] >> 8;
    return static_cast<uint32_t>(((stratum << 24) + offset) / groups);
  }
  const PhiloxWords r = noise_words(p, slot, kStreamTUniform, g);
  return r.w[0] >> 8;
}

// t = eps + scale * (u24 * 2^-24), two IEEE float32 roundings in this order.
NBD_HOST_DEVICE float t_from_uniform24(const NoiseParams& p, uint32_t u24) {
  return add_rn(p.eps, mul_rn(p.scale, u24_to_float(u24)));
}

NBD_HOST_DEVICE float t_for(const NoiseParams& p, uint64_t g, uint32_t slot) {
  return t_from_uniform24(p, t_uniform24(p, g, slot));
}

// The last t a thread computed, keyed by (sample, slot): consecutive groups of a block reuse it
// instead of recomputing the same Philox call.
struct TCache {
  uint64_t g;
  int64_t slot;  // -1: empty
  float t;
};

NBD_HOST_DEVICE TCache empty_t_cache() {
  TCache cache;
  cache.g = 0;
  cache.slot = -1;
  cache.t = 0.0f;
  return cache;
}

NBD_HOST_DEVICE float t_cached(const NoiseParams& p, TCache& cache, uint64_t g, int64_t slot) {
  if (cache.slot != slot || cache.g != g) {
    cache.g = g;
    cache.slot = slot;
    cache.t = t_for(p, g, static_cast<uint32_t>(slot));
  }
  return cache.t;
}

// The loss weight of a masked token whose block has noise level t.
NBD_HOST_DEVICE float masked_weight(const NoiseParams& p, float t) {
  return p.weight_mode == kWeightInvT ? div_rn(1.0f, t) : 1.0f;
}

// One token: masked iff eligible and its 24-bit uniform (word >> 8) * 2^-24 is below t.
template <typename T>
NBD_HOST_DEVICE void token_noise(const NoiseParams& p, bool eligible, uint32_t word, float t_block,
                                 float weight_if_masked, T token, T& id, uint8_t& masked,
                                 float& t, float& w) {
  const bool m = eligible && u24_to_float(word >> 8) < t_block;
  id = m ? static_cast<T>(p.mask_id) : token;
  masked = m ? 1u : 0u;
  t = t_block;
  w = m ? weight_if_masked : 0.0f;
}

// Noise for the tokens pos0 .. pos0 + n - 1 (pos0 a multiple of 4, 1 <= n <= 4) of the row
// whose global sample index is g. The caller passes block = pos0 / B and offset = pos0 % B
// (the C++ kernel advances them without dividing). `has_loss[i]` is 0 for tokens that carry
// no loss. `cache` carries t from one call to the next.
template <typename T>
NBD_HOST_DEVICE void noise_group(const NoiseParams& p, TCache& cache, uint64_t g, int64_t pos0,
                                 int64_t block, int64_t offset, int n, const T (&tok)[4],
                                 const uint8_t (&has_loss)[4], T (&ids)[4], uint8_t (&masked)[4],
                                 float (&t)[4], float (&w)[4]) {
  const PhiloxWords r = noise_words(p, static_cast<uint32_t>(pos0 >> 2), kStreamToken, g);
  const bool per_block = p.t_mode == kTPerBlock;
  float tb = t_cached(p, cache, g, per_block ? block : 0);
  float wm = masked_weight(p, tb);
  if (n == 4 && offset + 3 < p.block_size) {  // the common case: four tokens of one block
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int i = 0; i < 4; ++i) {
      const bool eligible = has_loss[i] != 0 && !(p.keep_block_first && offset + i == 0);
      token_noise<T>(p, eligible, r.w[i], tb, wm, tok[i], ids[i], masked[i], t[i], w[i]);
    }
    return;
  }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 4; ++i) {  // constant trip count: r.w[i] stays in registers on the GPU
    if (i < n) {
      if (i > 0 && ++offset == p.block_size) {  // the group crosses into the next block
        offset = 0;
        ++block;
        if (per_block) {
          tb = t_cached(p, cache, g, block);
          wm = masked_weight(p, tb);
        }
      }
      const bool eligible = has_loss[i] != 0 && !(p.keep_block_first && offset == 0);
      token_noise<T>(p, eligible, r.w[i], tb, wm, tok[i], ids[i], masked[i], t[i], w[i]);
    }
  }
}

}  // namespace nbdiff
