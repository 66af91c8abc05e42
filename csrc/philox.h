// Philox-4x32-10 counter-based random number generator (Salmon, Moraes, Dror and Shaw,
// "Parallel random numbers: as easy as 1, 2, 3", SC 2011), written for this project.
//
// One call maps a 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) to four
// independent-looking 32-bit words. There is no state: the same (counter, key) gives the same
// words on every thread, every device and every backend, which is what makes the masking noise
// a pure function of (seed, step, sample, position).
//
// The header is shared by the C++ (host) and CUDA (device) kernels; the PyTorch reference in
// megatron_nbdiff/noise/reference.py implements the same rounds on int64 tensors.
// Known-answer vectors (Random123 kat_vectors) are checked in tests/test_noise.py.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NBD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NBD_HOST_DEVICE inline
#endif

namespace nbdiff {

// Round multipliers and Weyl key increments of Philox-4x32.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// The four output words of one Philox call.
struct PhiloxWords {
  uint32_t w[4];
};

// One Philox round on the counter (c0, c1, c2, c3) with round key (k0, k1).
NBD_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                  uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;  // 32 x 32 -> 64 bit
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32);
  const uint32_t lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32);
  const uint32_t lo1 = static_cast<uint32_t>(p1);
  const uint32_t n0 = hi1 ^ c1 ^ k0;
  const uint32_t n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

// Philox-4x32-10: ten rounds, the key bumped by the Weyl constants between rounds.
NBD_HOST_DEVICE PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                          uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  PhiloxWords out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

}  // namespace nbdiff
