/*
 * rebuild.cu - the GPU rebuild: decode.h's tv_rebuild_element() for every element of every
 * segment of a plan, in one launch.
 *
 * Grid: one CUDA block per `tiles_per_block` consecutive tiles of TV_BLOCK_ELEMS elements
 * (the launch table of decode.h: segment s owns tiles [first_block, the next segment's
 * first_block), which are the tensor's blocks from block_offset on: all of them, ceil(n /
 * TV_BLOCK_ELEMS), for a whole tensor; a stretch of them where a switch writes part of it).  Thread t of a tile rebuilds elements 4t..4t+3 of it, so consecutive
 * threads touch consecutive elements and consecutive code bits: a warp reads 128 elements
 * of the base as 512 (fp32) or 256 (fp16) contiguous bytes and 4b contiguous code words.
 *
 * A switch moves far more bytes than it computes on, so the kernel is arranged to keep many
 * bytes in flight: each thread issues the loads of its base elements and of the code, mask
 * and parameter words of up to TV_PREFETCH_TERMS terms before it consumes any of them (an
 * 8-task mix otherwise waits out eight memory round trips one after another).
 *
 * Every value is computed with the operations of tv_rebuild_element(), in its order: the
 * fast path only unpacks four codes from one 64-bit window instead of four, and anything
 * unusual (a raw term, a code group that ends inside the thread's four elements, a width
 * outside 1..8) goes through decode.h's tv_term_value() itself.  Compile with
 * --fmad=false (NVRTC) / -fmad=false (nvcc) so that no multiply-add is contracted.
 *
 * Plain CUDA C that CUDA 10.2 compiles: no templates, no cuda_fp16.h.  The file also
 * compiles as host C++ under tests/kernels/emulate/shim.h, which runs it on CPU threads
 * so that its indexing is tested on machines with no GPU.
 */
#include "decode.h"

/* Terms of a segment held in shared memory; a segment with more reads the rest from global. */
#define TV_SHARED_TERMS 32
/* Most terms whose words a thread loads before it computes anything (see the kernels). */
#define TV_PREFETCH_MAX 10

/* What one thread has loaded for one term over its four elements. */
typedef struct tv_fetched {
    uint32_t lo, hi;     /* the code words holding the thread's four codes */
    uint32_t mask;       /* the mask word holding the four mask bits (all ones: no mask) */
    float scale, offset; /* the one (scale, offset) pair of the four elements */
    uint32_t fast;       /* 1: the four codes are decoded from lo/hi; 0: tv_term_value */
} tv_fetched;

/* binary16 <-> binary32.  On the GPU the conversion instructions: they round to nearest
 * even and keep subnormals exactly as decode.h's bit manipulation does, at a fraction of
 * its instruction count, and differ only in NaN payloads (GPU arithmetic makes every NaN
 * canonical anyway).  Elsewhere (the CPU emulation) decode.h's functions themselves. */
__device__ __forceinline__ float tv_h2f(uint32_t h)
{
#ifdef __CUDA_ARCH__
    float f;
    unsigned short hs = (unsigned short)h;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(hs));
    return f;
#else
    return tv_half_to_float((uint16_t)h);
#endif
}

__device__ __forceinline__ uint32_t tv_f2h(float f)
{
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    return tv_float_to_half(f);
#endif
}

__device__ __forceinline__ float tv_elem_load(uint64_t ptr, uint32_t dtype, uint32_t i)
{
    if (dtype == TV_F32)
        return ((const float *)ptr)[i];
    uint32_t u = ((const uint16_t *)ptr)[i];
    return dtype == TV_F16 ? tv_h2f(u) : tv_bf16_to_float((uint16_t)u);
}

__device__ __forceinline__ uint32_t tv_elem_16(uint32_t dtype, float v)
{
    return dtype == TV_F16 ? tv_f2h(v) : (uint32_t)tv_float_to_bf16(v);
}

/* Elements i0..i0+cnt-1 of a tensor as floats; one 16- or 8-byte load when `vec`. */
__device__ __forceinline__ void tv_load4(uint64_t ptr, uint32_t dtype, uint32_t i0, uint32_t cnt,
                                         int vec, float v[4])
{
    if (vec && dtype == TV_F32) {
        float4 f = *(const float4 *)((const float *)ptr + i0);
        v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    } else if (vec) {
        uint2 u = *(const uint2 *)((const uint16_t *)ptr + i0);
        uint32_t h[4] = {u.x & 0xffffu, u.x >> 16, u.y & 0xffffu, u.y >> 16};
        for (uint32_t k = 0; k < 4; ++k)
            v[k] = dtype == TV_F16 ? tv_h2f(h[k]) : tv_bf16_to_float((uint16_t)h[k]);
    } else {
        for (uint32_t k = 0; k < cnt; ++k)
            v[k] = tv_elem_load(ptr, dtype, i0 + k);
    }
}

__device__ __forceinline__ void tv_store4(uint64_t ptr, uint32_t dtype, uint32_t i0, uint32_t cnt,
                                          int vec, const float v[4])
{
    if (vec && dtype == TV_F32) {
        float4 f;
        f.x = v[0]; f.y = v[1]; f.z = v[2]; f.w = v[3];
        *(float4 *)((float *)ptr + i0) = f;
    } else if (vec) {
        uint2 u;
        u.x = tv_elem_16(dtype, v[0]) | (tv_elem_16(dtype, v[1]) << 16);
        u.y = tv_elem_16(dtype, v[2]) | (tv_elem_16(dtype, v[3]) << 16);
        *(uint2 *)((uint16_t *)ptr + i0) = u;
    } else {
        for (uint32_t k = 0; k < cnt; ++k) {
            if (dtype == TV_F32)
                ((float *)ptr)[i0 + k] = v[k];
            else
                ((uint16_t *)ptr)[i0 + k] = (uint16_t)tv_elem_16(dtype, v[k]);
        }
    }
}

/* Whether elements i0.. of a tensor at `ptr` can move as one 16-byte (fp32) or 8-byte
 * (16-bit) access: i0 is a multiple of 4, so only the tensor's own address matters. */
__device__ __forceinline__ int tv_aligned(uint64_t ptr, uint32_t dtype)
{
#ifdef TV_EMULATE_IGNORE_ALIGNMENT /* tests/kernels/emulate only: proves a misaligned vector access is caught */
    (void)ptr;
    (void)dtype;
    return 1;
#else
    return (ptr & (dtype == TV_F32 ? 15u : 7u)) == 0;
#endif
}

/* Issue the loads of term t for elements i0..i0+cnt-1 (cnt >= 1, i0 a multiple of 4) of an
 * n-element tensor: the words decode.h's tv_cut needs, found with tv_code_word/tv_code_shift. */
__device__ __forceinline__ void tv_fetch(const tv_term *t, uint32_t i0, uint32_t cnt, uint32_t n,
                                         tv_fetched *f)
{
    f->fast = 0;
    const int groups = t->kind == TV_KIND_GROUPS, sparse = t->kind == TV_KIND_SPARSE;
    if ((t->kind != TV_KIND_CODES && !groups && !sparse) || t->bits < 1u || t->bits > 8u)
        return;
    /* One (scale, offset) pair for the four elements: per-tensor scales need no divide. */
    const float *p = (const float *)t->params;
    if ((uint32_t)t->group < n) {
        p = tv_params(t, i0);
        if (i0 % (uint32_t)t->group + cnt > (uint32_t)t->group)
            return; /* a group ends inside these elements: the generic path */
    }
    f->scale = p[0];
    f->offset = p[1];
    f->fast = 1;
    if (groups) {
        /* The four elements are one group: its byte's code and keep nibbles go where a 1-bit
         * stream and its mask hold them (FORMAT.md 3.3), and tv_apply runs as for those. */
        const uint32_t byte = tv_group_byte(t, i0 >> 2), s = tv_code_shift(i0, 1u);
        f->lo = (byte >> 4) << s;
        f->hi = 0u;
        f->mask = (byte & 15u) << s;
        return;
    }
    const uint32_t b = t->bits;
    const uint32_t *codes = (const uint32_t *)t->codes;
    if (sparse) {
        /* One group, too: its four codes from the stream at its rank, or four fill codes,
         * placed where tv_window at i0's shift finds them; no mask. */
        const uint32_t g = i0 >> 2;
        const uint32_t field = tv_group_stored(t, g) ? tv_field(codes, b, 4u * tv_group_rank(t, g), 4u)
                                                     : tv_sparse_fill4(t, b);
        const uint64_t placed = (uint64_t)field << tv_code_shift(i0, b);
        f->lo = (uint32_t)placed;
        f->hi = (uint32_t)(placed >> 32);
        f->mask = 0xffffffffu;
        return;
    }
    const uint32_t w = tv_code_word(i0, b);
    const uint32_t s = tv_code_shift(i0, b);
    f->lo = codes[w];
    /* The four codes span 4b bits; the next word only when they cross into it (the
     * stream's trailing zero word keeps this read inside the stream). */
    f->hi = s + 4u * b > 32u ? codes[w + 1] : 0u;
    /* The four mask bits lie in one word (i0 is a multiple of 4). */
    f->mask = t->mask ? ((const uint32_t *)t->mask)[tv_code_word(i0, 1u)] : 0xffffffffu;
}

/* decode.h's element-by-element value, out of line: it serves the rare terms (raw values,
 * parameter groups smaller than four elements) and, inlined into every prefetch slot of every
 * kernel, it would triple the code and the compile time for nothing. */
__device__ __noinline__ float tv_value_slow(const tv_term *t, uint32_t i)
{
    return tv_term_value(t, i);
}

/* acc[k] = acc[k] + weight * value(i0 + k): tv_rebuild_element()'s loop body, made of
 * decode.h's functions on the words tv_fetch loaded. */
__device__ __forceinline__ void tv_apply(const tv_term *t, const tv_fetched *f, uint32_t i0,
                                         uint32_t cnt, float acc[4])
{
    const float weight = t->weight;
    if (f->fast) {
        const uint32_t b = t->bits;
        const uint32_t codes = tv_window(f->lo, f->hi, tv_code_shift(i0, b));
        const uint32_t keep = tv_mask_field(f->mask, i0);
        for (uint32_t k = 0; k < 4; ++k) {
            const float v = tv_keep(tv_dequant(tv_field_code(codes, b, k), f->scale, f->offset), tv_bit(keep, k));
            acc[k] = tv_accumulate(acc[k], weight, v);
        }
    } else {
        for (uint32_t k = 0; k < cnt; ++k)
            acc[k] = tv_accumulate(acc[k], weight, tv_value_slow(t, i0 + k));
    }
}

/* The four (or, at a tensor's end, fewer) elements of one thread in one tile. */
__device__ __forceinline__ void tv_rebuild4(const tv_segment *seg, const tv_term *terms,
                                            uint32_t i0, uint32_t n, const uint32_t prefetch)
{
    const uint32_t cnt = n - i0 < 4u ? n - i0 : 4u;
    const uint32_t count = seg->term_count;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int read_base = seg->base_coef != 0.0f;
    if (read_base)
        tv_load4(seg->base, seg->base_dtype, i0, cnt, cnt == 4u && tv_aligned(seg->base, seg->base_dtype), acc);

    tv_fetched f[TV_PREFETCH_MAX];
#pragma unroll
    for (uint32_t j = 0; j < prefetch; ++j)
        if (j < count)
            tv_fetch(&terms[j], i0, cnt, n, &f[j]);

    if (read_base)
        for (uint32_t k = 0; k < 4; ++k)
            acc[k] = seg->base_coef * acc[k];
#pragma unroll
    for (uint32_t j = 0; j < prefetch; ++j)
        if (j < count)
            tv_apply(&terms[j], &f[j], i0, cnt, acc);
    for (uint32_t j = prefetch; j < count; ++j) {
        tv_fetched g;
        tv_fetch(&terms[j], i0, cnt, n, &g);
        tv_apply(&terms[j], &g, i0, cnt, acc);
    }
    tv_store4(seg->out, seg->out_dtype, i0, cnt, cnt == 4u && tv_aligned(seg->out, seg->out_dtype), acc);
}

/* Rebuild tiles [blockIdx.x * tiles_per_block, ...) of the plan, stopping at total_tiles. */
__device__ __forceinline__ void tv_rebuild_tiles(const tv_segment *segs, uint32_t nseg, const tv_term *terms,
                                                 uint32_t total_tiles, uint32_t tiles_per_block,
                                                 const uint32_t prefetch)
{
    __shared__ tv_segment s_seg;
    __shared__ tv_term s_terms[TV_SHARED_TERMS];
    __shared__ uint32_t s_count;

    const uint32_t tid = threadIdx.x;
    uint32_t tile = blockIdx.x * tiles_per_block;
    if (tile >= total_tiles) /* uniform over the block */
        return;
    const uint32_t end = total_tiles - tile < tiles_per_block ? total_tiles : tile + tiles_per_block;

    /* The first tile's segment: the last one whose first_block <= tile.  Counting them
     * in parallel costs one round trip to memory, where a binary search costs log2(nseg)
     * dependent ones; tables are a few hundred entries. */
    if (tid == 0)
        s_count = 0;
    __syncthreads();
    uint32_t mine = 0;
    for (uint32_t s = tid; s < nseg; s += TV_BLOCK_THREADS)
        mine += segs[s].first_block <= tile ? 1u : 0u;
    if (mine)
        atomicAdd(&s_count, mine);
    __syncthreads();
    const uint32_t none = 0xffffffffu;
    uint32_t index = s_count - 1u; /* `none` when the tile lies before the first segment */
    uint32_t loaded = none;

    for (; tile < end; ++tile) {
        /* Later tiles of this block lie in the same segment or in one a little further on. */
        while (index + 1u < nseg && segs[index + 1u].first_block <= tile)
            ++index;
        if (index == none) /* uniform: a tile no segment owns (plan.py starts at 0; be safe) */
            continue;
        if (index != loaded) { /* uniform over the block: every thread takes this branch */
            const tv_segment *g = &segs[index];
            const uint32_t count = g->term_count;
            const uint32_t words = (uint32_t)(sizeof(tv_segment) / 8u) +
                                   (count <= TV_SHARED_TERMS ? count * (uint32_t)(sizeof(tv_term) / 8u) : 0u);
            __syncthreads(); /* every thread is done with the previous segment */
            for (uint32_t w = tid; w < words; w += TV_BLOCK_THREADS) {
                if (w < sizeof(tv_segment) / 8u)
                    ((uint64_t *)&s_seg)[w] = ((const uint64_t *)g)[w];
                else
                    ((uint64_t *)s_terms)[w - sizeof(tv_segment) / 8u] =
                        ((const uint64_t *)(terms + g->term_begin))[w - sizeof(tv_segment) / 8u];
            }
            __syncthreads();
            loaded = index;
        }
        const tv_term *t = s_seg.term_count <= TV_SHARED_TERMS ? s_terms : terms + s_seg.term_begin;
        const uint32_t n = (uint32_t)s_seg.n;
        const uint32_t i0 = (tile - (uint32_t)s_seg.first_block + s_seg.block_offset) * TV_BLOCK_ELEMS + 4u * tid;
        if (i0 < n)
            tv_rebuild4(&s_seg, t, i0, n, prefetch);
    }
}

/*
 * The kernels: segs holds nseg segments sorted by first_block (runtime/plan.py makes them
 * so), terms the term table they index; launch ceil(total_tiles / tiles_per_block) blocks
 * of TV_BLOCK_THREADS threads.  They differ only in how many terms a thread prefetches,
 * which sets its registers and so how many blocks an SM holds: a one-task switch (TVQ and
 * T-Switch: 1 term, RTVQ: 2) wants many threads each with a few bytes in flight, an 8-task
 * mix (RTVQ: 9 terms, the shared base merged) wants every term's words in flight at once.
 * MIN_BLOCKS caps registers so that many blocks fit an SM (ptxas -v, sm_53..sm_90: at
 * most 48, 64 and 128 registers, spilling at most a few bytes).  The host picks the
 * smallest kernel whose prefetch covers the plan's largest term count.
 */
#define TV_DEFINE_REBUILD(PREFETCH, MIN_BLOCKS)                                              \
    extern "C" __global__ void __launch_bounds__(TV_BLOCK_THREADS, MIN_BLOCKS)               \
    tv_rebuild_p##PREFETCH(const tv_segment *segs, uint32_t nseg, const tv_term *terms,      \
                           uint32_t total_tiles, uint32_t tiles_per_block)                   \
    {                                                                                        \
        tv_rebuild_tiles(segs, nseg, terms, total_tiles, tiles_per_block, PREFETCH);         \
    }
TV_DEFINE_REBUILD(2, 5)
TV_DEFINE_REBUILD(4, 4)
TV_DEFINE_REBUILD(10, 2)
