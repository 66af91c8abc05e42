// CUDA masking-noise kernel. No torch headers: raw pointers and a plain C++ launcher
// (noise_cuda.h), so that `nvcc -c` compiles this file on a machine with a CPU-only torch.
//
// Layout for bandwidth: one thread handles a group of four consecutive tokens of a row per
// iteration of a grid-stride loop (a few hundred thousand resident threads cover any batch).
// When the length is a multiple of 4 and the pointers are aligned, a group is read and written
// with vector accesses (16-byte token loads and float4 stores of t and weight, 4-byte loss-mask
// loads and mask stores) and streaming cache hints, since every byte is touched exactly once.
// The four token words come from one Philox call; each thread recomputes the t of its block
// from the block's own counter, so threads never communicate. The arithmetic is the shared
// noise_group() of noise_core.h, identical to the C++ kernel and the torch reference.
#include "noise_cuda.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "noise_core.h"

namespace nbdiff {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int64_t kMaxThreadsPerSm = 2048;  // upper bound on resident threads per SM (sm_70+)
constexpr int kMinBlocksPerSm = 4;  // at most 64 registers: 1024 resident threads per SM or more

// Vector load and store of four consecutive tokens (16-byte aligned).
template <typename T>
struct TokenVec;

template <>
struct TokenVec<int32_t> {
  __device__ __forceinline__ static void load(const int32_t* src, int32_t (&v)[4]) {
    const int4 x = __ldcs(reinterpret_cast<const int4*>(src));
    v[0] = x.x;
    v[1] = x.y;
    v[2] = x.z;
    v[3] = x.w;
  }
  __device__ __forceinline__ static void store(int32_t* dst, const int32_t (&v)[4]) {
    __stcs(reinterpret_cast<int4*>(dst), make_int4(v[0], v[1], v[2], v[3]));
  }
};

template <>
struct TokenVec<int64_t> {
  __device__ __forceinline__ static void load(const int64_t* src, int64_t (&v)[4]) {
    const longlong2 a = __ldcs(reinterpret_cast<const longlong2*>(src));
    const longlong2 b = __ldcs(reinterpret_cast<const longlong2*>(src + 2));
    v[0] = a.x;
    v[1] = a.y;
    v[2] = b.x;
    v[3] = b.y;
  }
  __device__ __forceinline__ static void store(int64_t* dst, const int64_t (&v)[4]) {
    __stcs(reinterpret_cast<longlong2*>(dst), make_longlong2(v[0], v[1]));
    __stcs(reinterpret_cast<longlong2*>(dst + 2), make_longlong2(v[2], v[3]));
  }
};

// Index: uint32_t when every flat index fits (cheaper division), else int64_t.
// kVector: cols % 4 == 0 and the pointers are aligned for the vector accesses.
template <typename T, typename Index, bool kVector>
__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocksPerSm)
    noise_kernel(const NoiseParams p, const T* __restrict__ tokens,
                 const uint8_t* __restrict__ loss_mask, const int64_t* __restrict__ sample_index,
                 T* __restrict__ ids, uint8_t* __restrict__ masked, float* __restrict__ t,
                 float* __restrict__ w) {
  const Index cols = static_cast<Index>(p.cols);
  const Index block_size = static_cast<Index>(p.block_size);
  const Index groups_per_row = (cols + 3) / 4;
  const Index total = static_cast<Index>(p.rows) * groups_per_row;
  const Index stride = static_cast<Index>(gridDim.x) * static_cast<Index>(blockDim.x);
  for (Index group = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; group < total;
       group += stride) {
    const Index row = group / groups_per_row;
    const Index pos0 = (group - row * groups_per_row) * 4;
    const Index at = row * cols + pos0;
    const uint64_t g = static_cast<uint64_t>(__ldg(sample_index + row));
    T tok[4];
    uint8_t has_loss[4];
    int n = 4;
    if (kVector) {
      TokenVec<T>::load(tokens + at, tok);
      if (loss_mask != nullptr) {
        const uchar4 l = __ldcs(reinterpret_cast<const uchar4*>(loss_mask + at));
        has_loss[0] = l.x;
        has_loss[1] = l.y;
        has_loss[2] = l.z;
        has_loss[3] = l.w;
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) has_loss[i] = 1u;
      }
    } else {
      n = static_cast<int>(cols - pos0 < 4 ? cols - pos0 : 4);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        tok[i] = i < n ? tokens[at + i] : T(0);
        has_loss[i] = i < n ? (loss_mask != nullptr ? loss_mask[at + i] : uint8_t(1)) : uint8_t(0);
      }
    }
    TCache cache = empty_t_cache();  // grid-stride steps land in other blocks: start empty
    T out_ids[4];
    uint8_t out_masked[4];
    float out_t[4];
    float out_w[4];
    const Index block = pos0 / block_size;
    noise_group<T>(p, cache, g, static_cast<int64_t>(pos0), static_cast<int64_t>(block),
                   static_cast<int64_t>(pos0 - block * block_size), n, tok, has_loss, out_ids,
                   out_masked, out_t, out_w);
    if (kVector) {
      TokenVec<T>::store(ids + at, out_ids);
      __stcs(reinterpret_cast<uchar4*>(masked + at),
             make_uchar4(out_masked[0], out_masked[1], out_masked[2], out_masked[3]));
      __stcs(reinterpret_cast<float4*>(t + at), make_float4(out_t[0], out_t[1], out_t[2], out_t[3]));
      __stcs(reinterpret_cast<float4*>(w + at), make_float4(out_w[0], out_w[1], out_w[2], out_w[3]));
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (i < n) {
          ids[at + i] = out_ids[i];
          masked[at + i] = out_masked[i];
          t[at + i] = out_t[i];
          w[at + i] = out_w[i];
        }
      }
    }
  }
}

inline bool aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Launches one instantiation with a grid of at most one wave of resident blocks (the
// occupancy calculator's answer times the SM count): the grid-stride loop covers the rest.
template <typename T, typename Index, bool kVector>
cudaError_t launch_one(int sms, int64_t groups, const NoiseParams& p, const T* tokens,
                       const uint8_t* loss_mask, const int64_t* sample_index, T* ids,
                       uint8_t* masked, float* t, float* w, cudaStream_t stream) {
  auto* kernel = noise_kernel<T, Index, kVector>;
  int per_sm = 0;
  const cudaError_t status =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreadsPerBlock, 0);
  if (status != cudaSuccess) return status;
  const int64_t wanted = (groups + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const int blocks = static_cast<int>(wanted < resident ? wanted : resident);
  kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(p, tokens, loss_mask, sample_index, ids, masked,
                                                   t, w);
  return cudaGetLastError();
}

template <typename T, typename Index>
cudaError_t launch_indexed(bool vector, int sms, int64_t groups, const NoiseParams& p,
                           const T* tokens, const uint8_t* loss_mask, const int64_t* sample_index,
                           T* ids, uint8_t* masked, float* t, float* w, cudaStream_t stream) {
  if (vector) {
    return launch_one<T, Index, true>(sms, groups, p, tokens, loss_mask, sample_index, ids, masked,
                                      t, w, stream);
  }
  return launch_one<T, Index, false>(sms, groups, p, tokens, loss_mask, sample_index, ids, masked,
                                     t, w, stream);
}

template <typename T>
cudaError_t launch_typed(const NoiseParams& p, const T* tokens, const uint8_t* loss_mask,
                         const int64_t* sample_index, T* ids, uint8_t* masked, float* t, float* w,
                         cudaStream_t stream) {
  const int64_t groups = p.rows * ((p.cols + 3) / 4);
  if (groups == 0) return cudaSuccess;
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  int sms = 0;
  status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  const bool vector = p.cols % 4 == 0 && aligned(tokens, 16) && aligned(ids, 16) &&
                      aligned(t, 16) && aligned(w, 16) && aligned(masked, 4) &&
                      (loss_mask == nullptr || aligned(loss_mask, 4));
  // Largest flat index the kernel forms: the last element, or one grid stride past the last
  // group, for a grid of at most kMaxThreadsPerSm resident threads per SM.
  const int64_t span = p.rows * p.cols + static_cast<int64_t>(sms) * kMaxThreadsPerSm + 4;
  if (span < (int64_t{1} << 32)) {
    return launch_indexed<T, uint32_t>(vector, sms, groups, p, tokens, loss_mask, sample_index,
                                       ids, masked, t, w, stream);
  }
  return launch_indexed<T, int64_t>(vector, sms, groups, p, tokens, loss_mask, sample_index, ids,
                                    masked, t, w, stream);
}

}  // namespace

cudaError_t launch_noise_cuda(const NoiseParams& params, int token_bytes, const void* tokens,
                              const uint8_t* loss_mask, const int64_t* sample_index,
                              void* noisy_ids, uint8_t* is_masked, float* t, float* weight,
                              cudaStream_t stream) {
  if (token_bytes == 4) {
    return launch_typed<int32_t>(params, static_cast<const int32_t*>(tokens), loss_mask,
                                 sample_index, static_cast<int32_t*>(noisy_ids), is_masked, t,
                                 weight, stream);
  }
  if (token_bytes == 8) {
    return launch_typed<int64_t>(params, static_cast<const int64_t*>(tokens), loss_mask,
                                 sample_index, static_cast<int64_t*>(noisy_ids), is_masked, t,
                                 weight, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace nbdiff
