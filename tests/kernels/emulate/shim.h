/*
 * shim.h - just enough of CUDA for kernels/rebuild.cu to compile as host C++ and run on
 * CPU threads: one std::thread per CUDA thread of a block, blocks one after another,
 * __syncthreads() a std::barrier, __shared__ variables function statics (shared by the
 * block's threads, reused by the next block).  Arithmetic stays that of the host compiler
 * (-ffp-contract=off), and the GPU-only instructions of rebuild.cu (the half conversions)
 * fall back to decode.h's functions, so the emulation checks the kernel's indexing,
 * prefetching, alignment and tail paths, not the GPU's rounding.
 */
#ifndef TVSWITCH_EMULATE_SHIM_H
#define TVSWITCH_EMULATE_SHIM_H

#include <barrier>
#include <cstdint>

struct tv_dim3 {
    unsigned x, y, z;
};
extern thread_local tv_dim3 threadIdx;
extern thread_local tv_dim3 blockIdx;
extern std::barrier<> *tv_block_barrier;

/* The GPU's alignment of the vector types: built with -fsanitize=alignment, an access
 * through a pointer that is not 16 (float4) or 8 (uint2) bytes aligned stops the run, as a
 * misaligned vector access faults on the GPU. */
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};

#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __launch_bounds__(...)

inline void __syncthreads() { tv_block_barrier->arrive_and_wait(); }

inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

#endif
