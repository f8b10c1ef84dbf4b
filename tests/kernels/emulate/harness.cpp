/* harness.cpp - runs rebuild.cu's kernels on CPU threads (see shim.h); loaded with ctypes. */
#include "shim.h"

#include <thread>
#include <vector>

#include "rebuild.cu"

thread_local tv_dim3 threadIdx;
thread_local tv_dim3 blockIdx;
std::barrier<> *tv_block_barrier;

typedef void (*tv_kernel)(const tv_segment *, uint32_t, const tv_term *, uint32_t, uint32_t);

/* Launch kernel tv_rebuild_p<prefetch> over `grid` blocks; returns -1 for an unknown kernel. */
extern "C" int tv_emulate(int prefetch, uint32_t grid, const tv_segment *segs, uint32_t nseg,
                          const tv_term *terms, uint32_t total_tiles, uint32_t tiles_per_block)
{
    tv_kernel kernel = prefetch == 2 ? tv_rebuild_p2 : prefetch == 4 ? tv_rebuild_p4
                     : prefetch == 10 ? tv_rebuild_p10 : nullptr;
    if (!kernel)
        return -1;
    std::barrier<> barrier(TV_BLOCK_THREADS);
    tv_block_barrier = &barrier;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < TV_BLOCK_THREADS; ++t) {
        threads.emplace_back([=, &barrier] {
            threadIdx = {t, 0, 0};
            for (uint32_t b = 0; b < grid; ++b) {
                blockIdx = {b, 0, 0};
                kernel(segs, nseg, terms, total_tiles, tiles_per_block);
                barrier.arrive_and_wait(); /* the block is done before the next one starts */
            }
        });
    }
    for (auto &th : threads)
        th.join();
    return 0;
}
