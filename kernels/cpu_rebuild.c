/*
 * cpu_rebuild.c - the CPU rebuild: decode.h's arithmetic over tiles, OpenMP across tiles.
 *
 * This is the reference the CUDA kernels are held to and the fallback on a Jetson's ARM
 * cores, so it computes every element exactly as tv_rebuild_element() does (same
 * operations, same order) but is arranged for a CPU: a tile of TILE elements is summed
 * in a small float buffer that stays in L1, term by term, with the code width made a
 * compile-time constant so the unpacking loop is unrolled.  No full-size temporary.
 */
#include "decode.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__SSE2__)
#include <emmintrin.h>
#define TV_HAVE_STREAM 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE 4096

#define TV_ALWAYS_INLINE __attribute__((always_inline))
/* x86-64: one build, an AVX2 copy picked at load time where the CPU has it (its variable
 * shifts vectorise the unpacking); aarch64's NEON baseline already has them. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define TV_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TV_CLONES
#endif

int tv_abi_version(void) { return 1; }
uint32_t tv_sizeof_term(void) { return (uint32_t)sizeof(tv_term); }
uint32_t tv_sizeof_segment(void) { return (uint32_t)sizeof(tv_segment); }

/*
 * acc[k] += w * value(start + k) for a CODES term whose width B is a constant.  Tiles
 * start at multiples of 32 elements, so each run of 32 elements is one row of B words:
 * it is unpacked with constant shifts, dequantised and accumulated in loops the compiler
 * vectorises.  A run that straddles a group boundary, and the tail, go element by element.
 */
#define TV_DEFINE_ACCUM(B)                                                                  \
    static inline TV_ALWAYS_INLINE void accum_codes_##B(float *acc, const tv_term *t, uint32_t start, uint32_t len) \
    {                                                                                       \
        const uint32_t *codes = (const uint32_t *)t->codes;                                 \
        const uint32_t *mask = (const uint32_t *)t->mask;                                   \
        const float *params = (const float *)t->params;                                     \
        const uint32_t group = (uint32_t)t->group;                                          \
        const float w = t->weight;                                                          \
        uint32_t k = 0;                                                                     \
        for (; k + 32u <= len; k += 32u) {                                                  \
            const uint32_t i = start + k;                                                   \
            const uint32_t g = i / group;                                                   \
            if ((i + 31u) / group != g) {                                                   \
                for (uint32_t j = 0; j < 32u; ++j)                                          \
                    acc[k + j] = acc[k + j] + w * tv_term_value(t, i + j);                  \
                continue;                                                                   \
            }                                                                               \
            const float scale = params[2u * g], offset = params[2u * g + 1u];               \
            uint32_t q[32];                                                                 \
            float v[32];                                                                    \
            tv_unpack32(codes + (uint64_t)(i >> 5) * B, B, q);                              \
            for (uint32_t j = 0; j < 32u; ++j)                                              \
                v[j] = tv_dequant(q[j], scale, offset);                                     \
            if (mask) {                                                                     \
                const uint32_t m = mask[i >> 5];                                            \
                for (uint32_t j = 0; j < 32u; ++j)                                          \
                    v[j] = (m & (1u << j)) ? v[j] : 0.0f; /* constant per lane */          \
            }                                                                               \
            for (uint32_t j = 0; j < 32u; ++j)                                              \
                acc[k + j] = acc[k + j] + w * v[j];                                         \
        }                                                                                   \
        for (; k < len; ++k)                                                                \
            acc[k] = acc[k] + w * tv_term_value(t, start + k);                              \
    }
TV_DEFINE_ACCUM(1)
TV_DEFINE_ACCUM(2)
TV_DEFINE_ACCUM(3)
TV_DEFINE_ACCUM(4)
TV_DEFINE_ACCUM(5)
TV_DEFINE_ACCUM(6)
TV_DEFINE_ACCUM(7)
TV_DEFINE_ACCUM(8)


/* RAW terms and anything unusual: the generic per-element path of decode.h. */
static void accum_generic(float *acc, const tv_term *t, uint32_t start, uint32_t len)
{
    for (uint32_t k = 0; k < len; ++k)
        acc[k] = acc[k] + t->weight * tv_term_value(t, start + k);
}

/*
 * The output is written once and read later by the engine, not by us: on x86 a
 * streaming store skips the read-for-ownership of every output line, which is a third
 * of the traffic of a single-task rebuild.
 */
static void store_f32(float *dst, const float *src, uint32_t len)
{
#ifdef TV_HAVE_STREAM
    if (((uintptr_t)dst & 15u) == 0) {
        uint32_t k = 0;
        for (; k + 4u <= len; k += 4u)
            _mm_stream_ps(dst + k, _mm_loadu_ps(src + k));
        for (; k < len; ++k)
            dst[k] = src[k];
        return;
    }
#endif
    memcpy(dst, src, sizeof(float) * len);
}

TV_CLONES static void rebuild_tile(const tv_segment *s, const tv_term *terms, uint32_t start, uint32_t len)
{
    float acc[TILE];
    if (s->base_coef == 0.0f) {
        memset(acc, 0, sizeof(float) * len);
    } else if (s->base_dtype == TV_F32 && s->base_coef == 1.0f) {
        memcpy(acc, (const float *)s->base + start, sizeof(float) * len);
    } else {
        for (uint32_t k = 0; k < len; ++k)
            acc[k] = tv_base_term(s, start + k);
    }
    for (uint32_t j = 0; j < s->term_count; ++j) {
        const tv_term *t = &terms[s->term_begin + j];
        switch (t->kind == TV_KIND_CODES ? t->bits : 0u) {
        case 1: accum_codes_1(acc, t, start, len); break;
        case 2: accum_codes_2(acc, t, start, len); break;
        case 3: accum_codes_3(acc, t, start, len); break;
        case 4: accum_codes_4(acc, t, start, len); break;
        case 5: accum_codes_5(acc, t, start, len); break;
        case 6: accum_codes_6(acc, t, start, len); break;
        case 7: accum_codes_7(acc, t, start, len); break;
        case 8: accum_codes_8(acc, t, start, len); break;
        default: accum_generic(acc, t, start, len); break;
        }
    }
    if (s->out_dtype == TV_F32) {
        store_f32((float *)s->out + start, acc, len);
    } else {
        for (uint32_t k = 0; k < len; ++k)
            tv_store(s->out, s->out_dtype, start + k, acc[k]);
    }
}

/*
 * Rebuild every segment.  Work items are tiles of TILE elements across all segments;
 * `threads` <= 0 lets OpenMP choose.  Segments must not overlap one another's outputs
 * (an output may alias its own base: each element is read before it is written).
 */
int tv_rebuild_cpu(const tv_segment *segs, uint32_t nseg, const tv_term *terms, int threads)
{
    uint64_t total = 0;
    for (uint32_t s = 0; s < nseg; ++s)
        total += (segs[s].n + TILE - 1) / TILE;
    if (total == 0)
        return 0;
#ifdef _OPENMP
    if (threads <= 0)
        threads = omp_get_max_threads();
#else
    (void)threads;
#endif
    long long ntiles = (long long)total;
    long long tile;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
#endif
    for (tile = 0; tile < ntiles; ++tile) {
        /* The tile's segment: a walk over a few hundred segments costs nothing next to
         * the TILE elements the tile moves. */
        uint32_t lo;
        uint64_t before = 0;
        uint64_t t = (uint64_t)tile;
        for (lo = 0; lo < nseg; ++lo) {
            uint64_t tiles = (segs[lo].n + TILE - 1) / TILE;
            if (t < before + tiles)
                break;
            before += tiles;
        }
        const tv_segment *s = &segs[lo];
        uint32_t start = (uint32_t)((t - before) * TILE);
        uint32_t len = (uint32_t)(s->n - start < TILE ? s->n - start : TILE);
        rebuild_tile(s, terms, start, len);
    }
#ifdef TV_HAVE_STREAM
    _mm_sfence(); /* streaming stores are visible to every thread once this returns */
#endif
    return 0;
}
