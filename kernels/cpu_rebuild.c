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

#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE 4096

int tv_abi_version(void) { return 1; }
uint32_t tv_sizeof_term(void) { return (uint32_t)sizeof(tv_term); }
uint32_t tv_sizeof_segment(void) { return (uint32_t)sizeof(tv_segment); }

/* acc[k] += w * value(start + k) for a CODES term whose width B is a constant. */
#define TV_DEFINE_ACCUM(B)                                                              \
    static void accum_codes_##B(float *acc, const tv_term *t, uint32_t start, uint32_t len) \
    {                                                                                   \
        const uint32_t *codes = (const uint32_t *)t->codes;                             \
        const uint32_t *mask = (const uint32_t *)t->mask;                               \
        const float *params = (const float *)t->params;                                 \
        const uint32_t group = (uint32_t)t->group;                                      \
        const float w = t->weight;                                                      \
        uint32_t k = 0;                                                                 \
        while (k < len) {                                                               \
            uint32_t i = start + k;                                                     \
            uint32_t g = i / group;                                                     \
            uint32_t stop = (g + 1u) * group - start; /* first k of the next group */   \
            if (stop > len || stop < k) stop = len;                                     \
            const float scale = params[2u * g], offset = params[2u * g + 1u];           \
            if (mask) {                                                                 \
                for (; k < stop; ++k) {                                                 \
                    float v = tv_dequant(tv_code(codes, B, start + k), scale, offset);  \
                    if (!tv_mask_bit(mask, start + k)) v = 0.0f;                        \
                    acc[k] = acc[k] + w * v;                                            \
                }                                                                       \
            } else {                                                                    \
                for (; k < stop; ++k) {                                                 \
                    float v = tv_dequant(tv_code(codes, B, start + k), scale, offset);  \
                    acc[k] = acc[k] + w * v;                                            \
                }                                                                       \
            }                                                                           \
        }                                                                               \
    }
TV_DEFINE_ACCUM(1)
TV_DEFINE_ACCUM(2)
TV_DEFINE_ACCUM(3)
TV_DEFINE_ACCUM(4)
TV_DEFINE_ACCUM(5)
TV_DEFINE_ACCUM(6)
TV_DEFINE_ACCUM(7)
TV_DEFINE_ACCUM(8)

typedef void (*accum_fn)(float *, const tv_term *, uint32_t, uint32_t);
static const accum_fn ACCUM_CODES[9] = {0, accum_codes_1, accum_codes_2, accum_codes_3,
                                        accum_codes_4, accum_codes_5, accum_codes_6,
                                        accum_codes_7, accum_codes_8};

/* RAW terms and anything unusual: the generic per-element path of decode.h. */
static void accum_generic(float *acc, const tv_term *t, uint32_t start, uint32_t len)
{
    for (uint32_t k = 0; k < len; ++k)
        acc[k] = acc[k] + t->weight * tv_term_value(t, start + k);
}

static void rebuild_tile(const tv_segment *s, const tv_term *terms, uint32_t start, uint32_t len)
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
        if (t->kind == TV_KIND_CODES && t->bits >= 1 && t->bits <= 8)
            ACCUM_CODES[t->bits](acc, t, start, len);
        else
            accum_generic(acc, t, start, len);
    }
    if (s->out_dtype == TV_F32) {
        memcpy((float *)s->out + start, acc, sizeof(float) * len);
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
    return 0;
}
