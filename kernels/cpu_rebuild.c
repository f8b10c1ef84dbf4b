/*
 * cpu_rebuild.c - the CPU rebuild: decode.h's arithmetic, 32 elements at a time, OpenMP
 * across tiles.
 *
 * This is the reference the CUDA kernels are held to and the fallback on a Jetson's ARM
 * cores, so it computes every element exactly as tv_rebuild_element() does (same
 * operations, same order) but is arranged for a CPU: each run of 32 elements (one row of
 * codes) reads its base, adds every term and is stored in one pass, with the code width
 * a compile-time constant so the unpacking is unrolled.  No full-size temporary.
 */
#include "decode.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__ /* every x86-64 CPU */
#include <emmintrin.h>
#define TV_HAVE_SSE2 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* Elements per work item; a multiple of 32 so every run of 32 is one row of codes. */
#define TILE 4096
#define MIN_TILES_PER_THREAD 16

#define TV_ALWAYS_INLINE __attribute__((always_inline))
/* x86-64: one build, with an AVX2 copy of the inner loops picked at load time where the
 * CPU has it (wider dequantise and accumulate loops). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define TV_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TV_CLONES
#endif

int tv_abi_version(void) { return 1; }
uint32_t tv_sizeof_term(void) { return (uint32_t)sizeof(tv_term); }
uint32_t tv_sizeof_segment(void) { return (uint32_t)sizeof(tv_segment); }

/*
 * (float) of the 32 codes of one row, exactly the values (float)tv_unpack32() gives.  SSE2
 * has no per-lane shifts, so four codes at a time are cut from the row as one 4b-bit
 * field (through decode.h's 64-bit window), masked in place (code j stays at bit b*j,
 * below 2^28 for b <= 7), converted, and scaled back by 2^-b*j: every step is exact in
 * binary32.  8-bit codes, and other CPUs, take decode.h's tv_unpack32.
 */
static inline TV_ALWAYS_INLINE void unpack32_float(const uint32_t *row, uint32_t bits, float *qf)
{
#ifdef TV_HAVE_SSE2
    if (bits <= 7u) {
        const uint32_t m = (1u << bits) - 1u;
        const __m128i lanes = _mm_setr_epi32((int)m, (int)(m << bits), (int)(m << 2 * bits),
                                             (int)(m << 3 * bits));
        const __m128 back = _mm_setr_ps(1.0f, 1.0f / (float)(1u << bits), 1.0f / (float)(1u << 2 * bits),
                                        1.0f / (float)(1u << 3 * bits));
        for (uint32_t g = 0; g < 8u; ++g) { /* codes 4g .. 4g+3 */
            const uint32_t bit = 4u * g * bits;
            const uint64_t window = (uint64_t)row[bit >> 5] | ((uint64_t)row[(bit >> 5) + 1u] << 32);
            const uint32_t field = (uint32_t)(window >> (bit & 31u)) & ((1u << 4 * bits) - 1u);
            const __m128i masked = _mm_and_si128(_mm_set1_epi32((int)field), lanes);
            _mm_storeu_ps(qf + 4u * g, _mm_mul_ps(_mm_cvtepi32_ps(masked), back));
        }
        return;
    }
#endif
    uint32_t q[32];
    tv_unpack32(row, bits, q);
    for (uint32_t j = 0; j < 32u; ++j)
        qf[j] = (float)q[j];
}

/*
 * acc[j] += w * value(i + j), j < 32, for a CODES term whose width B is a constant.  i is
 * a multiple of 32, so the run is one row of B words: unpacked with constant shifts,
 * dequantised and accumulated in loops the compiler vectorises.  A run that straddles a
 * group boundary goes element by element through decode.h's generic path.
 */
#define TV_DEFINE_ACCUM32(B)                                                                \
    static inline TV_ALWAYS_INLINE void accum32_codes_##B(float *acc, const tv_term *t,    \
                                                          uint32_t i, uint32_t n)          \
    {                                                                                       \
        const uint32_t group = (uint32_t)t->group;                                          \
        const uint32_t g = group >= n ? 0u : i / group; /* per-tensor scales: no divide */  \
        if (group < n && (i + 31u) / group != g) {                                          \
            for (uint32_t j = 0; j < 32u; ++j)                                              \
                acc[j] = acc[j] + t->weight * tv_term_value(t, i + j);                      \
            return;                                                                         \
        }                                                                                   \
        const float *params = (const float *)t->params;                                     \
        const float scale = params[2u * g], offset = params[2u * g + 1u], w = t->weight;    \
        float qf[32];                                                                       \
        float v[32];                                                                        \
        unpack32_float((const uint32_t *)t->codes + (uint64_t)(i >> 5) * B, B, qf);         \
        for (uint32_t j = 0; j < 32u; ++j)                                                  \
            v[j] = qf[j] * scale + offset; /* tv_dequant, (float)q already taken */         \
        if (t->mask) {                                                                      \
            const uint32_t m = ((const uint32_t *)t->mask)[i >> 5];                         \
            for (uint32_t j = 0; j < 32u; ++j)                                              \
                v[j] = (m & (1u << j)) ? v[j] : 0.0f; /* constant per lane */              \
        }                                                                                   \
        for (uint32_t j = 0; j < 32u; ++j)                                                  \
            acc[j] = acc[j] + w * v[j];                                                     \
    }
TV_DEFINE_ACCUM32(1)
TV_DEFINE_ACCUM32(2)
TV_DEFINE_ACCUM32(3)
TV_DEFINE_ACCUM32(4)
TV_DEFINE_ACCUM32(5)
TV_DEFINE_ACCUM32(6)
TV_DEFINE_ACCUM32(7)
TV_DEFINE_ACCUM32(8)

/*
 * The output is written once and read later by the engine, not by us: on x86 a
 * streaming store skips the read-for-ownership of every output line, which is a third
 * of the traffic of a single-task rebuild.  dst is 16-byte aligned (checked by the caller).
 */
static inline TV_ALWAYS_INLINE void store32_f32(float *dst, const float *acc, int stream)
{
#ifdef TV_HAVE_SSE2
    if (stream) {
        for (uint32_t j = 0; j < 32u; j += 4u)
            _mm_stream_ps(dst + j, _mm_loadu_ps(acc + j));
        return;
    }
#endif
    (void)stream;
    memcpy(dst, acc, 32 * sizeof(float));
}

/*
 * Elements [start, start + len) of one segment, 32 at a time: base, every term, store,
 * in one pass, so reading the base, decoding and writing the output overlap the way a
 * memory copy's loads and stores do.  The tail (n not a multiple of 32) is decode.h's
 * tv_rebuild_element itself.
 */
TV_CLONES static void rebuild_tile(const tv_segment *s, const tv_term *terms, uint32_t start, uint32_t len)
{
    const uint32_t n = (uint32_t)s->n;
    const uint32_t end = start + len;
    const int stream = s->out_dtype == TV_F32 && ((uintptr_t)s->out & 15u) == 0;
    const int copy_base = s->base_dtype == TV_F32 && s->base_coef == 1.0f;
    uint32_t i = start;
    for (; i + 32u <= end; i += 32u) {
        float acc[32];
        if (s->base_coef == 0.0f)
            memset(acc, 0, sizeof acc);
        else if (copy_base)
            memcpy(acc, (const float *)s->base + i, sizeof acc);
        else
            for (uint32_t j = 0; j < 32u; ++j)
                acc[j] = tv_base_term(s, i + j);
        for (uint32_t k = 0; k < s->term_count; ++k) {
            const tv_term *t = &terms[s->term_begin + k];
            switch (t->kind == TV_KIND_CODES ? t->bits : 0u) {
            case 1: accum32_codes_1(acc, t, i, n); break;
            case 2: accum32_codes_2(acc, t, i, n); break;
            case 3: accum32_codes_3(acc, t, i, n); break;
            case 4: accum32_codes_4(acc, t, i, n); break;
            case 5: accum32_codes_5(acc, t, i, n); break;
            case 6: accum32_codes_6(acc, t, i, n); break;
            case 7: accum32_codes_7(acc, t, i, n); break;
            case 8: accum32_codes_8(acc, t, i, n); break;
            default:
                for (uint32_t j = 0; j < 32u; ++j)
                    acc[j] = acc[j] + t->weight * tv_term_value(t, i + j);
            }
        }
        if (s->out_dtype == TV_F32)
            store32_f32((float *)s->out + i, acc, stream);
        else
            for (uint32_t j = 0; j < 32u; ++j)
                tv_store(s->out, s->out_dtype, i + j, acc[j]);
    }
    for (; i < end; ++i)
        tv_store(s->out, s->out_dtype, i, tv_rebuild_element(s, terms, i));
}

static uint64_t tiles_of(const tv_segment *s) { return (s->n + TILE - 1) / TILE; }

/*
 * Rebuild every segment.  The tiles of all segments, in order, are split into one
 * contiguous range per thread, so each thread streams through memory the way the
 * hardware prefetchers like; `threads` <= 0 lets OpenMP choose.  Segments must not
 * overlap one another's outputs (an output may alias its own base: each element is
 * read before it is written).
 */
int tv_rebuild_cpu(const tv_segment *segs, uint32_t nseg, const tv_term *terms, int threads)
{
    uint64_t total = 0;
    for (uint32_t s = 0; s < nseg; ++s)
        total += tiles_of(&segs[s]);
    if (total == 0)
        return 0;
#ifdef _OPENMP
    if (threads <= 0)
        threads = omp_get_max_threads();
    /* A thread needs work worth waking it for: on a loaded machine a thread that is not
     * scheduled makes the others wait at the barrier for milliseconds. */
    if ((uint64_t)threads > total / MIN_TILES_PER_THREAD)
        threads = total < MIN_TILES_PER_THREAD ? 1 : (int)(total / MIN_TILES_PER_THREAD);
#pragma omp parallel num_threads(threads)
#endif
    {
#ifdef _OPENMP
        const uint64_t nt = (uint64_t)omp_get_num_threads(), id = (uint64_t)omp_get_thread_num();
#else
        const uint64_t nt = 1, id = 0;
#endif
        const uint64_t first = total * id / nt, last = total * (id + 1) / nt;
        uint32_t s = 0;
        uint64_t before = 0; /* tiles of the segments before segment s */
        for (uint64_t t = first; t < last; ++t) {
            while (t >= before + tiles_of(&segs[s])) {
                before += tiles_of(&segs[s]);
                ++s;
            }
            const uint32_t start = (uint32_t)((t - before) * TILE);
            const uint32_t len = (uint32_t)(segs[s].n - start < TILE ? segs[s].n - start : TILE);
            rebuild_tile(&segs[s], terms, start, len);
        }
    }
#ifdef TV_HAVE_SSE2
    _mm_sfence(); /* streaming stores are visible to every thread once this returns */
#endif
    return 0;
}
