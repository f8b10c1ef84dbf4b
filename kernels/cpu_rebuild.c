/*
 * cpu_rebuild.c - the CPU rebuild: decode.h's arithmetic, eight rows of 32 elements at a
 * time, OpenMP across tiles.
 *
 * This is the reference the CUDA kernels are held to and the fallback on a Jetson's ARM
 * cores, so it computes every element exactly as tv_rebuild_element() does (same
 * operations, same order) but is arranged for a CPU: each pass over 8 rows of 32 elements
 * (a row is one row of codes) reads their base, adds every term and stores them, with the
 * code width a compile-time constant so the unpacking is unrolled.  No full-size temporary.
 *
 * Three instruction paths compute the same bits: scalar (decode.h's functions alone, the
 * reference of the others), portable (scalar plus SSE2 on x86-64 or NEON on aarch64 to
 * convert codes to float) and, on x86-64 CPUs that have it, AVX2, which cuts eight codes
 * at a time with per-lane shifts.  The path is picked once at first use (AVX2, else
 * portable); tv_cpu_set_path() lets the tests run each one on one machine.  A groups term
 * (FORMAT.md 3.3) is turned row by row into the code and mask words of the same 1-bit
 * term as streams and then takes the 1-bit row of its path, and a sparse term (3.4) into
 * the row of codes a stream would hold, then the b-bit row; the scalar path decodes both
 * element by element with tv_term_value.
 */
#include "decode.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__ /* every x86-64 CPU */
#include <emmintrin.h>
#define TV_HAVE_SSE2 1
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TV_HAVE_AVX2_PATH 1
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define TV_HAVE_NEON 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* Elements per work item; a multiple of 32 so every run of 32 is one row of codes. */
#define TILE 4096
#define MIN_TILES_PER_THREAD 16

#define TV_ALWAYS_INLINE __attribute__((always_inline))

/* tv_cpu_path() values. */
enum {
    TV_PATH_AUTO = 0,
    TV_PATH_PORTABLE = 1,
    TV_PATH_AVX2 = 2,
    TV_PATH_SCALAR = 3,
    TV_PATH_AVX512 = 4,
    TV_PATH_NEON = 5
};

/* 2: tv_check_tables and tv_rebuild_cpu_checked, which refuse tables outside their buffers;
 * 3: TV_KIND_GROUPS terms (tv_term.aux: their byte stream's words);
 * 4: TV_KIND_SPARSE terms, tv_term.fill, tv_term.group 32-bit;
 * 5: tv_rebuild_cpu_runs_checked, a rebuild of listed element ranges only. */
int tv_abi_version(void) { return 5; }
uint32_t tv_sizeof_term(void) { return (uint32_t)sizeof(tv_term); }
uint32_t tv_sizeof_segment(void) { return (uint32_t)sizeof(tv_segment); }

/*
 * tv_code_float() of the 32 codes of one row, with SIMD where the CPU has it (these lines
 * are not decode.h's: tests/kernels/test_cpu_library.py holds them to the scalar path for
 * every width).  Four codes at a time are cut from the row as one field (tv_field).  NEON
 * then shifts each lane by its own amount.  SSE2 has no per-lane shifts, so there the field
 * is masked in place (code j stays at bit b*j, below 2^28 for b <= 7), converted, and
 * scaled back by 2^-b*j: every step is exact in binary32.  8-bit codes on SSE2, and other
 * CPUs, take decode.h's tv_unpack32 and tv_code_float.
 */
static inline TV_ALWAYS_INLINE void unpack32_float(const uint32_t *row, uint32_t bits, float *qf)
{
#if defined(TV_HAVE_NEON)
    const int32_t b = (int32_t)bits;
    const int32x4_t right = {0, -b, -2 * b, -3 * b}; /* vshlq by a negative count shifts right */
    const uint32x4_t ones = vdupq_n_u32((1u << bits) - 1u);
    for (uint32_t k = 0; k < 8u; ++k) {
        const uint32x4_t q = vandq_u32(vshlq_u32(vdupq_n_u32(tv_field(row, bits, 4u * k, 4u)), right), ones);
        vst1q_f32(qf + 4u * k, vcvtq_f32_u32(q));
    }
    return;
#elif defined(TV_HAVE_SSE2)
    if (bits <= 7u) {
        const uint32_t m = (1u << bits) - 1u;
        const __m128i lanes = _mm_setr_epi32((int)m, (int)(m << bits), (int)(m << 2 * bits),
                                             (int)(m << 3 * bits));
        const __m128 back = _mm_setr_ps(1.0f, 1.0f / (float)(1u << bits), 1.0f / (float)(1u << 2 * bits),
                                        1.0f / (float)(1u << 3 * bits));
        for (uint32_t k = 0; k < 8u; ++k) {
            const __m128i masked = _mm_and_si128(_mm_set1_epi32((int)tv_field(row, bits, 4u * k, 4u)), lanes);
            _mm_storeu_ps(qf + 4u * k, _mm_mul_ps(_mm_cvtepi32_ps(masked), back));
        }
        return;
    }
#endif
    uint32_t q[32];
    tv_unpack32(row, bits, q);
    for (uint32_t j = 0; j < 32u; ++j)
        qf[j] = tv_code_float(q[j]);
}

/*
 * The (scale, offset) of a CODES term over elements i .. i+31, or 0 when those elements
 * straddle a group boundary (they then go element by element through decode.h's
 * generic path).  Per-tensor scales, the common case, need no divide.
 */
static inline TV_ALWAYS_INLINE int row_params(const tv_term *t, uint32_t i, uint32_t n, float *scale,
                                              float *offset)
{
    const uint32_t group = (uint32_t)t->group;
    const float *p = (const float *)t->params;
    if (group < n) {
        if (i % group + 32u > group)
            return 0;
        p = tv_params(t, i);
    }
    *scale = p[0];
    *offset = p[1];
    return 1;
}

/* The mask field of elements i .. i+31 (i a multiple of 32: one whole mask word). */
static inline TV_ALWAYS_INLINE uint32_t row_mask(const tv_term *t, uint32_t i)
{
    return tv_mask_field(((const uint32_t *)t->mask)[tv_code_word(i, 1u)], i);
}

static inline TV_ALWAYS_INLINE void accum32_generic(float *acc, const tv_term *t, uint32_t i)
{
    for (uint32_t j = 0; j < 32u; ++j)
        acc[j] = tv_accumulate(acc[j], t->weight, tv_term_value(t, i + j));
}

/*
 * acc[j] = tv_accumulate(acc[j], w, tv_keep(tv_affine(qf[j], scale, offset), mask bit j)),
 * j < 32: decode.h's element step over one row whose codes are already floats, in loops
 * the compiler vectorises.
 */
static inline TV_ALWAYS_INLINE void finish32(float *acc, const float *qf, float w, float scale, float offset,
                                             int masked, uint32_t m)
{
    if (masked) {
        uint32_t keep[32]; /* SSE2 has no per-lane shifts: the bits first, then one vector loop */
        for (uint32_t j = 0; j < 32u; ++j)
            keep[j] = tv_bit(m, j);
        for (uint32_t j = 0; j < 32u; ++j)
            acc[j] = tv_accumulate(acc[j], w, tv_keep(tv_affine(qf[j], scale, offset), keep[j]));
    } else { /* tv_keep(v, nonzero) is v */
        for (uint32_t j = 0; j < 32u; ++j)
            acc[j] = tv_accumulate(acc[j], w, tv_affine(qf[j], scale, offset));
    }
}

/*
 * One row (i a multiple of 32) of a CODES term whose width B is a constant, so the
 * unpacking is unrolled with constant shifts.  Two flavours:
 * - scalar: decode.h alone (tv_unpack32, tv_code_float, then finish32), the path every
 *   other one is tested against;
 * - portable: the same with the codes converted by unpack32_float's SIMD.
 */
#define TV_DEFINE_ROWS(B)                                                                     \
    static inline TV_ALWAYS_INLINE void row_scalar_##B(float *acc, const tv_term *t, uint32_t i, \
                                                       uint32_t n)                            \
    {                                                                                         \
        float scale, offset, qf[32];                                                          \
        uint32_t q[32];                                                                       \
        if (!row_params(t, i, n, &scale, &offset)) {                                          \
            accum32_generic(acc, t, i);                                                       \
            return;                                                                           \
        }                                                                                     \
        tv_unpack32((const uint32_t *)t->codes + tv_code_word(i, B), B, q);                   \
        for (uint32_t j = 0; j < 32u; ++j)                                                    \
            qf[j] = tv_code_float(q[j]);                                                      \
        finish32(acc, qf, t->weight, scale, offset, t->mask != 0, t->mask ? row_mask(t, i) : 0u);    \
    }                                                                                         \
    static inline TV_ALWAYS_INLINE void row_portable_##B(float *acc, const tv_term *t, uint32_t i, \
                                                         uint32_t n)                          \
    {                                                                                         \
        float scale, offset, qf[32];                                                          \
        if (!row_params(t, i, n, &scale, &offset)) {                                          \
            accum32_generic(acc, t, i);                                                       \
            return;                                                                           \
        }                                                                                     \
        unpack32_float((const uint32_t *)t->codes + tv_code_word(i, B), B, qf);               \
        finish32(acc, qf, t->weight, scale, offset, t->mask != 0, t->mask ? row_mask(t, i) : 0u);    \
    }
TV_DEFINE_ROWS(1)
TV_DEFINE_ROWS(2)
TV_DEFINE_ROWS(3)
TV_DEFINE_ROWS(4)
TV_DEFINE_ROWS(5)
TV_DEFINE_ROWS(6)
TV_DEFINE_ROWS(7)
TV_DEFINE_ROWS(8)

/*
 * One CODES term over `rows` consecutive rows (acc + 32r holds row r): the width becomes a
 * constant once per term and pass, not once per row.
 */
#define TV_DEFINE_ROW_SWITCH(FLAVOUR)                                                         \
    static __attribute__((noinline)) void accum_##FLAVOUR(float *acc, const tv_term *t, uint32_t i, \
                                                          uint32_t n, uint32_t rows)          \
    {                                                                                         \
        switch (t->bits) {                                                                    \
        case 1: for (uint32_t r = 0; r < rows; ++r) row_##FLAVOUR##_1(acc + 32u * r, t, i + 32u * r, n); break; \
        case 2: for (uint32_t r = 0; r < rows; ++r) row_##FLAVOUR##_2(acc + 32u * r, t, i + 32u * r, n); break; \
        case 3: for (uint32_t r = 0; r < rows; ++r) row_##FLAVOUR##_3(acc + 32u * r, t, i + 32u * r, n); break; \
        case 4: for (uint32_t r = 0; r < rows; ++r) row_##FLAVOUR##_4(acc + 32u * r, t, i + 32u * r, n); break; \
        case 5: for (uint32_t r = 0; r < rows; ++r) row_##FLAVOUR##_5(acc + 32u * r, t, i + 32u * r, n); break; \
        case 6: for (uint32_t r = 0; r < rows; ++r) row_##FLAVOUR##_6(acc + 32u * r, t, i + 32u * r, n); break; \
        case 7: for (uint32_t r = 0; r < rows; ++r) row_##FLAVOUR##_7(acc + 32u * r, t, i + 32u * r, n); break; \
        default: for (uint32_t r = 0; r < rows; ++r) row_##FLAVOUR##_8(acc + 32u * r, t, i + 32u * r, n); break; \
        }                                                                                     \
    }
TV_DEFINE_ROW_SWITCH(scalar)
TV_DEFINE_ROW_SWITCH(portable)

/* The index flags of the row of 32 elements from group g (a multiple of 8): one byte;
 * index_flags from the index itself (a plan holds its address: one load fewer a row). */
static inline TV_ALWAYS_INLINE uint32_t index_flags(const uint32_t *index, uint32_t g)
{
    return (index[(g / TV_BLOCK_GROUPS) * TV_INDEX_RECORD + 1u + ((g >> 5) & 7u)] >> (g & 31u)) & 0xffu;
}

static inline TV_ALWAYS_INLINE uint32_t row_flags(const tv_term *t, uint32_t g)
{
    return index_flags((const uint32_t *)t->mask, g);
}

/*
 * A GROUPS term as the 1-bit CODES row it stands for: the bytes of groups g .. g+7 (the
 * row's 32 elements; r the rank of group g, tv_group_rank) gathered into the row's code
 * word (each byte's high nibble) and mask word (its low nibble), the words a streams term
 * of the same codes and mask holds (FORMAT.md 3.3).  Returns the rank of group g + 8, so a
 * pass over consecutive rows ranks once.
 */
static inline TV_ALWAYS_INLINE uint32_t group_row_words(const tv_term *t, uint32_t g, uint32_t r,
                                                         uint32_t *code, uint32_t *keep)
{
    const uint32_t flags = row_flags(t, g);
    uint32_t c = 0u, m = 0u;
    for (uint32_t k = 0; k < 8u; ++k) { /* no branch: flag counts per row are unpredictable */
        const uint32_t f = (flags >> k) & 1u, byte = tv_group_byte_at(t, r) & (0u - f);
        c |= (byte >> 4) << (4u * k);
        m |= (byte & 15u) << (4u * k);
        r += f;
    }
    *code = c;
    *keep = m;
    return r;
}

/*
 * One GROUPS term over `rows` rows: each row's words (WORDS, with group_row_words'
 * arguments), then the 1-bit row of instruction path ROW1(acc, words, weight, scale,
 * offset, mask word).  Rows that straddle a parameter group go element by element
 * (tv_term_value), like CODES rows.
 */
#define TV_DEFINE_GROUP_ROWS(NAME, ATTR, WORDS, ROW1)                                              \
    ATTR static void NAME(float *acc, const tv_term *t, uint32_t i, uint32_t n, uint32_t rows) \
    {                                                                                         \
        float scale, offset;                                                                  \
        const float w = t->weight;                                                            \
        uint32_t r = tv_group_rank(t, i >> 2);                                                \
        if ((uint32_t)t->group >= n) { /* one (scale, offset): ROW1's constants the loop's */ \
            const float s0 = ((const float *)t->params)[0], o0 = ((const float *)t->params)[1]; \
            for (uint32_t k = 0; k < rows; ++k, i += 32u) {                                   \
                uint32_t words[2] = {0u, 0u}, keep;                                           \
                r = WORDS(t, i >> 2, r, &words[0], &keep);                                    \
                ROW1(acc + 32u * k, words, w, s0, o0, keep);                                  \
            }                                                                                 \
            return;                                                                           \
        }                                                                                     \
        for (uint32_t k = 0; k < rows; ++k, i += 32u) {                                       \
            uint32_t words[2] = {0u, 0u}, keep;                                               \
            r = WORDS(t, i >> 2, r, &words[0], &keep);                                        \
            if (row_params(t, i, n, &scale, &offset))                                         \
                ROW1(acc + 32u * k, words, w, scale, offset, keep);                           \
            else                                                                              \
                accum32_generic(acc + 32u * k, t, i);                                         \
        }                                                                                     \
    }

static inline TV_ALWAYS_INLINE void row1_portable(float *acc, const uint32_t *words, float w, float scale,
                                                  float offset, uint32_t keep)
{
    float qf[32];
    unpack32_float(words, 1u, qf);
    finish32(acc, qf, w, scale, offset, 1, keep);
}
TV_DEFINE_GROUP_ROWS(groups_portable, , group_row_words, row1_portable)

/* The scalar path's GROUPS and SPARSE rows: decode.h alone, element by element
 * (tv_term_value). */
static void elementwise_rows(float *acc, const tv_term *t, uint32_t i, uint32_t n, uint32_t rows)
{
    (void)n;
    for (uint32_t k = 0; k < rows; ++k)
        accum32_generic(acc + 32u * k, t, i + 32u * k);
}

/*
 * A SPARSE term's row as the b words of codes a CODES term would hold there: groups g ..
 * g+7 (r the rank of group g) each give four codes, read from the stream at the group's
 * rank or, for a group not stored, four fill codes (fill4; fill_row: a row of them).  A
 * row with no group stored is fill_row, one with all eight stored is b words of the stream
 * from code 4r on (the two cases that fill a tensor's rows where it is mostly unchanged or
 * mostly changed, each a branch that stays predicted within a tensor).  Other rows read
 * the stream for every group (at rank r <= R, the sentinel group after the R stored ones
 * keeping the read inside it) and choose with masks: no branch on the flags.  Returns the
 * rank of group g + 8.
 */
static inline TV_ALWAYS_INLINE uint32_t sparse_row_codes(const tv_term *t, uint32_t g, uint32_t r,
                                                          uint32_t bits, uint32_t fill4, const uint32_t *fill_row,
                                                          uint32_t *row)
{
    const uint32_t flags = row_flags(t, g);
    const uint32_t *stream = (const uint32_t *)t->codes;
    row[bits] = 0u; /* the trailing word a stream has (tv_field may read it) */
    if (flags == 0u) {
        for (uint32_t w = 0; w < bits; ++w)
            row[w] = fill_row[w];
        return r;
    }
    if (flags == 0xffu) {
        const uint32_t first = tv_code_word(4u * r, bits), shift = tv_code_shift(4u * r, bits);
        for (uint32_t w = 0; w < bits; ++w)
            row[w] = tv_window(stream[first + w], stream[first + w + 1u], shift);
        return r + 8u;
    }
    uint64_t pending = 0u;
    uint32_t filled = 0u, w = 0u;
    for (uint32_t k = 0; k < 8u; ++k) {
        const uint32_t f = (flags >> k) & 1u, stored = tv_field(stream, bits, 4u * r, 4u);
        pending |= (uint64_t)((stored & (0u - f)) | (fill4 & (f - 1u))) << filled;
        r += f;
        filled += 4u * bits;
        if (filled >= 32u) {
            row[w++] = (uint32_t)pending;
            pending >>= 32;
            filled -= 32u;
        }
    }
    return r;
}

/* A row of 32 fill codes as b words (fill4 eight times over). */
static inline TV_ALWAYS_INLINE void fill_row_words(uint32_t fill4, uint32_t bits, uint32_t *row)
{
    uint64_t pending = 0u;
    uint32_t filled = 0u, w = 0u;
    for (uint32_t k = 0; k < 8u; ++k) {
        pending |= (uint64_t)fill4 << filled;
        filled += 4u * bits;
        if (filled >= 32u) {
            row[w++] = (uint32_t)pending;
            pending >>= 32;
            filled -= 32u;
        }
    }
}

/*
 * One SPARSE term of constant width B over `rows` rows: each row's codes (ROW_CODES, with
 * sparse_row_codes' arguments), then the unmasked B-bit row of instruction path
 * ROW(acc, row, B, weight, scale, offset).
 */
#define TV_DEFINE_SPARSE_ROWS(NAME, ATTR, ROW_CODES, ROW, B)                                   \
    ATTR static void NAME##_##B(float *acc, const tv_term *t, uint32_t i, uint32_t n, uint32_t rows) \
    {                                                                                         \
        float scale, offset;                                                                  \
        const float w = t->weight;                                                            \
        const uint32_t fill4 = tv_sparse_fill4(t, B);                                         \
        uint32_t r = tv_group_rank(t, i >> 2), fill_row[B];                                   \
        fill_row_words(fill4, B, fill_row);                                                   \
        if ((uint32_t)t->group >= n) { /* one (scale, offset): ROW's constants the loop's */  \
            const float s0 = ((const float *)t->params)[0], o0 = ((const float *)t->params)[1]; \
            for (uint32_t k = 0; k < rows; ++k, i += 32u) {                                   \
                uint32_t row[B + 1];                                                          \
                r = ROW_CODES(t, i >> 2, r, B, fill4, fill_row, row);                         \
                ROW(acc + 32u * k, row, B, w, s0, o0);                                        \
            }                                                                                 \
            return;                                                                           \
        }                                                                                     \
        for (uint32_t k = 0; k < rows; ++k, i += 32u) {                                       \
            uint32_t row[B + 1];                                                              \
            r = ROW_CODES(t, i >> 2, r, B, fill4, fill_row, row);                             \
            if (row_params(t, i, n, &scale, &offset))                                         \
                ROW(acc + 32u * k, row, B, w, scale, offset);                                 \
            else                                                                              \
                accum32_generic(acc + 32u * k, t, i);                                         \
        }                                                                                     \
    }
#define TV_DEFINE_SPARSE(NAME, ATTR, ROW_CODES, ROW)                                           \
    TV_DEFINE_SPARSE_ROWS(NAME, ATTR, ROW_CODES, ROW, 1)                                      \
    TV_DEFINE_SPARSE_ROWS(NAME, ATTR, ROW_CODES, ROW, 2)                                      \
    TV_DEFINE_SPARSE_ROWS(NAME, ATTR, ROW_CODES, ROW, 3)                                      \
    TV_DEFINE_SPARSE_ROWS(NAME, ATTR, ROW_CODES, ROW, 4)                                      \
    TV_DEFINE_SPARSE_ROWS(NAME, ATTR, ROW_CODES, ROW, 5)                                      \
    TV_DEFINE_SPARSE_ROWS(NAME, ATTR, ROW_CODES, ROW, 6)                                      \
    TV_DEFINE_SPARSE_ROWS(NAME, ATTR, ROW_CODES, ROW, 7)                                      \
    TV_DEFINE_SPARSE_ROWS(NAME, ATTR, ROW_CODES, ROW, 8)                                      \
    ATTR static void NAME(float *acc, const tv_term *t, uint32_t i, uint32_t n, uint32_t rows) \
    {                                                                                         \
        switch (t->bits) {                                                                    \
        case 1: NAME##_1(acc, t, i, n, rows); break;                                          \
        case 2: NAME##_2(acc, t, i, n, rows); break;                                          \
        case 3: NAME##_3(acc, t, i, n, rows); break;                                          \
        case 4: NAME##_4(acc, t, i, n, rows); break;                                          \
        case 5: NAME##_5(acc, t, i, n, rows); break;                                          \
        case 6: NAME##_6(acc, t, i, n, rows); break;                                          \
        case 7: NAME##_7(acc, t, i, n, rows); break;                                          \
        default: NAME##_8(acc, t, i, n, rows); break;                                         \
        }                                                                                     \
    }

static inline TV_ALWAYS_INLINE void row_portable(float *acc, const uint32_t *row, uint32_t bits, float w,
                                                 float scale, float offset)
{
    float qf[32];
    unpack32_float(row, bits, qf);
    finish32(acc, qf, w, scale, offset, 0, 0u);
}
TV_DEFINE_SPARSE(sparse_portable, , sparse_row_codes, row_portable)

/*
 * Planned segments (make_plans and the rows: cpu_planned.h), the SIMD paths' common case:
 * a plan holds at most TV_PLAN_TERMS terms; a segment with more takes the per-term rows.
 */
#define TV_PLAN_TERMS 32
#define TV_PLAN_ROWS 2u /* rows per pass over the runs: 5-10 % on one task over one */
/* The base and every term's codes and mask are prefetched 16 rows ahead: with a row's
 * terms between two loads of a stream, and 10-18 streams in an 8-task mix, the hardware's
 * prefetch alone left a quarter of the mix's time waiting on loads (docs/kernels.md). */
#define TV_PF_FLOATS 512u
/* A planned term: its row constants (CONSTS, the path's) and where its rows are read. */
#define TV_DEFINE_PLAN(NAME, CONSTS, VEC)                                                     \
    typedef struct NAME {                                                                     \
        CONSTS c;                                                                             \
        const tv_term *t;                                                                     \
        const uint32_t *codes, *mask; /* CODES: mask 0 when every element is kept */          \
        uint32_t rank;                /* GROUPS, SPARSE: the rank of the next row's first group */ \
        uint32_t fill4, fill_row[8];  /* SPARSE: four fill codes, a row of them */            \
        VEC empty;                    /* GROUPS, SPARSE: each value of a row with no group */ \
    } NAME;

/* Consecutive planned terms that decode alike (kind, width, masking): one branch per row
 * for all of them.  op: a CODES term 2 bits + masked, GROUPS 18, SPARSE 18 + bits. */
typedef struct tv_plan_run {
    uint32_t begin, count, op;
} tv_plan_run;

#if defined(TV_HAVE_AVX2_PATH) || defined(TV_HAVE_NEON)
/* What the byte-shuffle compact rows of both instruction sets share. */
/* Byte k's low nibble of x to bits 4k .. 4k+3 (x's high nibbles zero). */
static inline TV_ALWAYS_INLINE uint32_t nibbles8(uint64_t x)
{
    x = (x | (x >> 4)) & 0x00ff00ff00ff00ffull;
    x = (x | (x >> 8)) & 0x0000ffff0000ffffull;
    return (uint32_t)(x | (x >> 16));
}

/*
 * A row's 8 group flags as bytes, what the byte shuffles below are steered by: byte k of
 * `before`, the count of flags below k (group k's rank counted from the row's first stored
 * group); byte k of `unstored`, 0xff where group k is not stored, else 0; `control`, the
 * control of a byte shuffle moving each stored group's byte to byte k (`before`, with 0x80,
 * a zero byte, where a group is not stored).
 */
typedef struct {
    uint64_t before, unstored, control;
} tv_flag_bytes;

static inline TV_ALWAYS_INLINE tv_flag_bytes flag_bytes_of(uint32_t flags)
{
    const uint64_t lanes = 0x0101010101010101ull;
    /* byte k of `ones`: flag k; ones * lanes: the flags up to k (at most 8, no carries) */
    const uint64_t ones = ((((uint64_t)(flags & 0xffu) * lanes) & 0x8040201008040201ull) + 0x7f7f7f7f7f7f7f7full) >> 7
                          & lanes;
    const uint64_t before = ones * lanes - ones, unstored = (ones ^ lanes) * 0xffu;
    const tv_flag_bytes f = {before, unstored, before | (unstored & 0x8080808080808080ull)};
    return f;
}

/* The control of every flag byte, made when the library loads: a row's lookup (2 KB, which
 * stays in L1 through a rebuild) in place of three multiplies and their dependent adds on
 * the path from the flag word to the shuffle; `before` and `unstored` come back from it
 * (before <= 7 leaves bit 7 of each byte to the 0x80). */
static uint64_t tv_flag_controls[256];
#ifdef TV_HAVE_AVX2_PATH
/* The same with 8 | before where a group is not stored: a shuffle whose source holds the
 * fill in bytes 8-15 gives it there (avx2_sparse2_values). */
static uint64_t tv_flag_fill_controls[256];
#endif
__attribute__((constructor)) static void tv_init_flag_controls(void)
{
    for (uint32_t f = 0; f < 256u; ++f) {
        const uint64_t control = flag_bytes_of(f).control;
        tv_flag_controls[f] = control;
#ifdef TV_HAVE_AVX2_PATH
        const uint64_t lanes = 0x0101010101010101ull;
        tv_flag_fill_controls[f] = (control & 0x7full * lanes) | ((control >> 4) & 0x08ull * lanes);
#endif
    }
}

static inline TV_ALWAYS_INLINE tv_flag_bytes flag_bytes(uint32_t flags)
{
    const uint64_t control = tv_flag_controls[flags & 0xffu];
    const tv_flag_bytes f = {control & 0x7f7f7f7f7f7f7f7full, ((control >> 7) & 0x0101010101010101ull) * 0xffu,
                             control};
    return f;
}

/* group_row_words' two words from a row's eight group bytes in place (byte k group k's,
 * zero where it is not stored): the low nibbles the keep bits, the high ones the codes. */
static inline TV_ALWAYS_INLINE void group_words(uint64_t x, uint32_t *code, uint32_t *keep)
{
    *keep = nibbles8(x & 0x0f0f0f0f0f0f0f0full);
    *code = nibbles8((x >> 4) & 0x0f0f0f0f0f0f0f0full);
}

#endif

#ifdef TV_HAVE_AVX2_PATH
/* AVX2 code, with POPCNT (every AVX2 CPU has it; without it __builtin_popcount is a libgcc
 * call, which the groups and sparse ranks would pay per row). */
#define TV_AVX2_TARGET __attribute__((target("avx2,popcnt")))
#define TV_AVX2 TV_AVX2_TARGET static inline TV_ALWAYS_INLINE

/* The little-endian 32 bits from byte `byte` of a row of codes on: an unaligned load, the
 * vector broadcasts' source.  The callers read no further than tv_field would (the word
 * after the code's word), which a stream's trailing word and a sparse row's extra word hold. */
static inline TV_ALWAYS_INLINE uint32_t row_bytes32(const uint32_t *row, uint32_t byte)
{
    uint32_t v;
    memcpy(&v, (const unsigned char *)row + byte, sizeof v);
    return v;
}

/*
 * Codes 8k .. 8k+7 of a row, code j in the low bits of lane j with the bits above it left
 * as they come (avx2_codes8 clears them).  Up to 4 bits the eight codes are one
 * 8b-bit field, beyond that two 4b-bit fields; each is broadcast to its lanes straight
 * from memory (no scalar cut) and each lane then shifts its code down by its own amount.
 */
TV_AVX2 __m256i avx2_codes8_lanes(const uint32_t *row, uint32_t bits, uint32_t k)
{
    const int b = (int)bits;
    __m256i lanes;
    if (bits == 1u || bits == 2u || bits == 4u) {
        /* the eight codes lie in one word: broadcast it from memory (a groups row is one word) */
        const int s = (int)((8u * k * bits) & 31u);
        lanes = _mm256_srlv_epi32(_mm256_set1_epi32((int)row[(8u * k * bits) >> 5]),
                                  _mm256_setr_epi32(s, s + b, s + 2 * b, s + 3 * b, s + 4 * b, s + 5 * b,
                                                    s + 6 * b, s + 7 * b));
    } else if (bits == 3u) {
        /* eight 3-bit codes are three bytes from byte 3k on */
        lanes = _mm256_srlv_epi32(_mm256_set1_epi32((int)row_bytes32(row, 3u * k)),
                                  _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b));
    } else {
        /* four codes from byte kb on, four from bit 4b past it (a half byte in for odd b) */
        const int s = (int)((4u * bits) & 7u);
        const __m128i lo = _mm_set1_epi32((int)row_bytes32(row, k * bits));
        const __m128i hi = _mm_set1_epi32((int)row_bytes32(row, k * bits + ((4u * bits) >> 3)));
        lanes = _mm256_srlv_epi32(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1),
                                  _mm256_setr_epi32(0, b, 2 * b, 3 * b, s, s + b, s + 2 * b, s + 3 * b));
    }
    return lanes;
}

/* Codes 8k .. 8k+7 of a row as eight float lanes, exactly tv_code_float()'s values. */
TV_AVX2 __m256 avx2_codes8(const uint32_t *row, uint32_t bits, uint32_t k)
{
    return _mm256_cvtepi32_ps(
        _mm256_and_si256(avx2_codes8_lanes(row, bits, k), _mm256_set1_epi32((int)((1u << bits) - 1u))));
}

/* What a row's arithmetic needs of its term: scale, offset and weight in every lane, and
 * for codes of at most 4 bits the table of weighted values (codes 0-7, and 8-15 in
 * table_hi).  Made once per row, or once per pass where the term has one (scale, offset)
 * for the whole tensor. */
typedef struct avx2_consts {
    __m256 s, o, w, table, table_hi, dropped;
} avx2_consts;

TV_AVX2 avx2_consts avx2_prepare(uint32_t bits, float weight, float scale, float offset)
{
    avx2_consts c;
    c.s = _mm256_set1_ps(scale);
    c.o = _mm256_set1_ps(offset);
    c.w = _mm256_set1_ps(weight);
    /* lane q of the table is w * ((q mod 2^b) * scale + offset), the ops of the lane path
     * below in their order, so a lookup gives each lane's weighted value bit for bit.  The
     * lookup reads the low 3 bits of a lane, a code and for b < 3 the next code's low bits:
     * the table repeats every 2^b lanes, so those need no clearing.  A lane the mask drops
     * gets w * +0, as the lane path's and-then-multiply does. */
    const __m256i q = _mm256_and_si256(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                       _mm256_set1_epi32((int)((1u << bits) - 1u)));
    const __m256i q_hi = _mm256_add_epi32(q, _mm256_set1_epi32(8));
    c.table = bits <= 4u ? _mm256_mul_ps(c.w, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), c.s), c.o))
                         : _mm256_setzero_ps();
    c.table_hi = bits == 4u
                     ? _mm256_mul_ps(c.w, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q_hi), c.s), c.o))
                     : _mm256_setzero_ps();
    c.dropped = _mm256_mul_ps(c.w, _mm256_setzero_ps());
    return c;
}

/* finish32's weighted value (tv_affine, tv_keep, the product of tv_accumulate) of codes
 * 8k .. 8k+7 of one row, m the row's mask word in every lane.  Codes of at most 3 bits
 * take it from the table (one lookup for a convert, two multiplies and an add), 4-bit
 * codes from two, chosen by the code's top bit.  Held to the scalar path by the tests. */
TV_AVX2 __m256 avx2_value8(const uint32_t *row, uint32_t bits, const avx2_consts *c, int masked, uint32_t mask,
                           uint32_t k)
{
    const __m256i m = _mm256_set1_epi32((int)mask);
    const int sh = 31 - 8 * (int)k; /* mask bit 8k+j of the row to the sign of lane j */
    const __m256i shifts = _mm256_setr_epi32(sh, sh - 1, sh - 2, sh - 3, sh - 4, sh - 5, sh - 6, sh - 7);
    __m256 v;
    if (bits <= 4u) {
        const __m256i q = avx2_codes8_lanes(row, bits, k);
        v = _mm256_permutevar8x32_ps(c->table, q);
        if (bits == 4u) /* code bit 3 to the lane's sign: the blend's selector */
            v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(c->table_hi, q),
                                 _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
        if (masked)
            v = _mm256_blendv_ps(c->dropped, v, _mm256_castsi256_ps(_mm256_sllv_epi32(m, shifts)));
        return v;
    }
    v = _mm256_add_ps(_mm256_mul_ps(avx2_codes8(row, bits, k), c->s), c->o);
    if (masked)
        v = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_srai_epi32(_mm256_sllv_epi32(m, shifts), 31)));
    return _mm256_mul_ps(c->w, v);
}

/* One row's values added to acc (32-byte aligned), tv_accumulate's add. */
TV_AVX2 void avx2_row_with(float *acc, const uint32_t *row, uint32_t bits, const avx2_consts *c, int masked,
                           uint32_t mask)
{
    for (uint32_t k = 0; k < 4u; ++k)
        _mm256_store_ps(acc + 8u * k,
                        _mm256_add_ps(_mm256_load_ps(acc + 8u * k), avx2_value8(row, bits, c, masked, mask, k)));
}

TV_AVX2 void avx2_row(float *acc, const uint32_t *row, uint32_t bits, float weight, float scale, float offset,
                      int masked, uint32_t mask)
{
    const avx2_consts c = avx2_prepare(bits, weight, scale, offset);
    avx2_row_with(acc, row, bits, &c, masked, mask);
}

/* One row of a CODES term (i a multiple of 32). */
TV_AVX2 void avx2_accum32(float *acc, const tv_term *t, uint32_t i, uint32_t n, uint32_t bits)
{
    float scale, offset;
    if (!row_params(t, i, n, &scale, &offset)) {
        accum32_generic(acc, t, i);
        return;
    }
    avx2_row(acc, (const uint32_t *)t->codes + tv_code_word(i, bits), bits, t->weight, scale, offset,
             t->mask != 0, t->mask ? row_mask(t, i) : 0u);
}

TV_AVX2 void row1_avx2(float *acc, const uint32_t *words, float w, float scale, float offset, uint32_t keep)
{
    avx2_row(acc, words, 1u, w, scale, offset, 1, keep);
}
/*
 * The 8 bytes of a row's groups, stored ones consecutive from byte r of `src`: one 8-byte
 * load, each byte moved to its group's place by one byte shuffle (SSSE3, which every AVX2
 * CPU has), zero where a group is not stored.  The caller keeps r + 8 within the bytes.
 */
TV_AVX2 uint64_t avx2_spread_bytes(const uint8_t *src, uint32_t r, tv_flag_bytes f)
{
    uint64_t bytes;
    memcpy(&bytes, src + r, sizeof bytes); /* little-endian: byte r first */
    return (uint64_t)_mm_cvtsi128_si64(
        _mm_shuffle_epi8(_mm_cvtsi64_si128((long long)bytes), _mm_cvtsi64_si128((long long)f.control)));
}

/* group_row_words by avx2_spread_bytes; near the end of the bytes, where its load would pass
 * them, the loop of group_row_words. */
TV_AVX2 uint32_t avx2_group_row_words(const tv_term *t, uint32_t g, uint32_t r, uint32_t *code, uint32_t *keep)
{
    const uint32_t flags = row_flags(t, g);
    if ((uint64_t)r + 8u > 4u * (uint64_t)t->aux)
        return group_row_words(t, g, r, code, keep);
    group_words(avx2_spread_bytes((const uint8_t *)t->codes, r, flag_bytes(flags)), code, keep);
    return r + tv_popcount(flags);
}
TV_DEFINE_GROUP_ROWS(groups_avx2, TV_AVX2_TARGET, avx2_group_row_words, row1_avx2)

/* The planned rows' groups row (TV_PLANNED_GROUP_VALUE): avx2_spread_bytes' eight bytes as
 * they are, byte k group k's (keep bits in its low nibble, codes in its high one), which
 * avx2_group_value8 reads without the two nibble gathers of avx2_group_row_words; near the
 * end of the bytes, the same shuffle of a zero-padded copy of what is left. */
TV_AVX2 uint32_t avx2_group_row_bytes(const tv_term *t, uint32_t g, uint32_t r, uint32_t *row, uint32_t *unused)
{
    const uint32_t flags = row_flags(t, g);
    const uint64_t nbytes = 4u * (uint64_t)t->aux;
    uint64_t x;
    (void)unused;
    if ((uint64_t)r + 8u > nbytes) {
        uint8_t tail[8] = {0u};
        memcpy(tail, (const uint8_t *)t->codes + r, (size_t)(nbytes > r ? nbytes - r : 0u));
        x = avx2_spread_bytes(tail, 0u, flag_bytes(flags));
    } else {
        x = avx2_spread_bytes((const uint8_t *)t->codes, r, flag_bytes(flags));
    }
    memcpy(row, &x, sizeof x); /* little-endian: groups 0-3 in row[0] */
    return r + tv_popcount(flags);
}

/* Codes 8k .. 8k+7 of a groups row held as bytes (avx2_group_row_bytes), code j in the low
 * bit of lane j: group 2k + j / 4's high nibble, from the row's 16 bits at 16k. */
TV_AVX2 __m256i avx2_group_codes8(__m256i word, uint32_t k)
{
    const int s = 16 * (int)(k & 1u);
    return _mm256_srlv_epi32(word, _mm256_setr_epi32(s + 4, s + 5, s + 6, s + 7, s + 12, s + 13, s + 14, s + 15));
}

/* avx2_value8's masked 1-bit value of the row group_row_words makes, bit for bit (the same
 * table lookup and blend), from the bytes: lane j's keep bit, the low nibble's, to its sign. */
TV_AVX2 __m256 avx2_group_value8(const uint32_t *row, const avx2_consts *c, uint32_t k)
{
    const int s = 16 * (int)(k & 1u);
    const __m256i word = _mm256_set1_epi32((int)row[k >> 1]);
    const __m256i keep = _mm256_sllv_epi32(word, _mm256_setr_epi32(31 - s, 30 - s, 29 - s, 28 - s, 23 - s, 22 - s,
                                                                   21 - s, 20 - s));
    return _mm256_blendv_ps(c->dropped, _mm256_permutevar8x32_ps(c->table, avx2_group_codes8(word, k)),
                            _mm256_castsi256_ps(keep));
}

/*
 * A flag byte's control for groups of two bytes (4-bit codes): group k's
 * bytes 2c, 2c+1 for its control byte c, 0x80 twice where it has none.
 */
TV_AVX2 __m128i avx2_pair_control(uint64_t control)
{
    const __m128i c = _mm_cvtsi64_si128((long long)control);
    const __m128i twice = _mm_unpacklo_epi8(c, c); /* c0 c0 c1 c1 ... */
    const __m128i none = _mm_and_si128(twice, _mm_set1_epi8((char)0x80));
    return _mm_or_si128(_mm_add_epi8(_mm_add_epi8(twice, twice), _mm_set1_epi16(0x0100)), none);
}

/* Four 12-bit fields at bits 16j of x to bits 12j (48 bits). */
static inline TV_ALWAYS_INLINE uint64_t pack12x4(uint64_t x)
{
    return (x & 0xfffull) | ((x >> 4) & 0xfff000ull) | ((x >> 8) & 0xfff000000ull) | ((x >> 12) & 0xfff000000000ull);
}

/*
 * A 3-bit sparse row: a group's four codes are 12 bits, at bit 12p of the stream for
 * rank p, so byte 3p/2 (rounded down) and the next hold them, shifted by 4 when p is odd.
 * One shuffle brings each stored group's two bytes to a 16-bit lane (the control counted
 * from the load's first byte, 3r/2), the odd ones shift down, and the fill goes where a
 * group is not stored: the row's eight groups, group k in 16-bit lane k.
 */
TV_AVX2 __m128i avx2_sparse_groups3(const uint8_t *codes, tv_flag_bytes f, uint32_t r, uint32_t fill4)
{
    const __m128i zero = _mm_setzero_si128(), odd = _mm_set1_epi16((short)(r & 1u));
    const __m128i before = _mm_unpacklo_epi8(_mm_cvtsi64_si128((long long)f.before), zero);
    const __m128i none = _mm_unpacklo_epi8(_mm_cvtsi64_si128((long long)f.unstored), zero);
    const __m128i none16 = _mm_or_si128(none, _mm_slli_epi16(none, 8)); /* 0xffff where not stored */
    /* group k's rank from the load's first byte: c = before_k; its bytes (3c + odd) / 2 and next */
    const __m128i first = _mm_srli_epi16(_mm_add_epi16(_mm_add_epi16(_mm_add_epi16(before, before), before), odd), 1);
    const __m128i control = _mm_or_si128(_mm_add_epi16(_mm_mullo_epi16(first, _mm_set1_epi16(0x0101)),
                                                       _mm_set1_epi16(0x0100)),
                                         _mm_and_si128(none16, _mm_set1_epi16((short)0x8080)));
    const uint8_t *stream = codes + (3u * r >> 1);
    __m128i x = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)stream), control);
    const __m128i shifted = _mm_sub_epi16(zero, _mm_and_si128(_mm_add_epi16(before, odd), _mm_set1_epi16(1)));
    x = _mm_or_si128(_mm_andnot_si128(shifted, x), _mm_and_si128(shifted, _mm_srli_epi16(x, 4)));
    return _mm_or_si128(_mm_and_si128(x, _mm_set1_epi16(0x0fff)), _mm_and_si128(none16, _mm_set1_epi16((short)fill4)));
}

/* The eight groups packed into the row's three words. */
TV_AVX2 uint32_t avx2_sparse_row_codes3(const tv_term *t, tv_flag_bytes f, uint32_t flags, uint32_t r,
                                        uint32_t fill4, uint32_t *row)
{
    const __m128i x = avx2_sparse_groups3((const uint8_t *)t->codes, f, r, fill4);
    const uint64_t lo = pack12x4((uint64_t)_mm_cvtsi128_si64(x));
    const uint64_t hi = pack12x4((uint64_t)_mm_cvtsi128_si64(_mm_unpackhi_epi64(x, x)));
    row[0] = (uint32_t)lo;
    row[1] = (uint32_t)((lo >> 32) | (hi << 16));
    row[2] = (uint32_t)(hi >> 16);
    row[3] = 0u;
    return r + tv_popcount(flags);
}

/*
 * sparse_row_codes for 2-bit and 4-bit codes, where a group's four codes are one byte or
 * two of the stream (group rank r at byte r or 2r): the row's codes are those bytes moved
 * to their groups' places by one shuffle (avx2_spread_bytes' control, doubled for pairs),
 * with the fill where a group is not stored; 3-bit codes by avx2_sparse_row_codes3.  The
 * loads (16 bytes at most, from the row's first rank, at most the sentinel's) stay inside the
 * stream: its three zero words after the sentinel are for them (FORMAT.md 3.4).  Other
 * widths take sparse_row_codes.
 */
TV_AVX2 uint32_t avx2_sparse_row_codes(const tv_term *t, uint32_t g, uint32_t r, uint32_t bits, uint32_t fill4,
                                       const uint32_t *fill_row, uint32_t *row)
{
    const uint32_t flags = row_flags(t, g);
    const uint8_t *stream = (const uint8_t *)t->codes;
    const tv_flag_bytes f = flag_bytes(flags);
    if (bits == 2u) {
        const uint64_t x = avx2_spread_bytes(stream, r, f) | ((uint64_t)fill4 * 0x0101010101010101ull & f.unstored);
        row[0] = (uint32_t)x;
        row[1] = (uint32_t)(x >> 32);
        row[2] = 0u;
        return r + tv_popcount(flags);
    }
    if (bits == 4u) {
        const __m128i pairs = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(stream + 2u * r)),
                                               avx2_pair_control(f.control));
        const __m128i none = _mm_cvtsi64_si128((long long)f.unstored);
        const __m128i fill = _mm_and_si128(_mm_set1_epi16((short)fill4), _mm_unpacklo_epi8(none, none));
        _mm_storeu_si128((__m128i *)row, _mm_or_si128(pairs, fill));
        row[4] = 0u;
        return r + tv_popcount(flags);
    }
    if (bits == 3u)
        return avx2_sparse_row_codes3(t, f, flags, r, fill4, row);
    return sparse_row_codes(t, g, r, bits, fill4, fill_row, row);
}

/*
 * The planned rows' 2-bit SPARSE row (TV_PLANNED_SPARSE_VALUES) from its flag byte, its
 * four vectors of values made in registers: avx2_sparse_row_codes' bytes, but the fill is
 * byte 8 of the shuffle's source (the stream's eight bytes from rank r, then the fill byte
 * eight times), which tv_flag_fill_controls picks where a group is not stored, and the
 * row's two words broadcast from that register to avx2_value8's lanes and lookup.
 * avx2_sparse_row_codes stores the row for the value loads to read back and makes the fill
 * in integer registers.
 */
TV_AVX2 uint32_t avx2_sparse2_values(const uint8_t *codes, uint32_t flags, uint32_t r, uint32_t fill4,
                                     const avx2_consts *c, __m256 *v)
{
    const __m128i src = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(codes + r)), _mm_set1_epi8((char)fill4));
    const __m128i x = _mm_shuffle_epi8(src, _mm_cvtsi64_si128((long long)tv_flag_fill_controls[flags]));
    const __m256i lo = _mm256_broadcastd_epi32(x), hi = _mm256_broadcastd_epi32(_mm_srli_epi64(x, 32));
    const __m256i first = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i second = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    v[0] = _mm256_permutevar8x32_ps(c->table, _mm256_srlv_epi32(lo, first));
    v[1] = _mm256_permutevar8x32_ps(c->table, _mm256_srlv_epi32(lo, second));
    v[2] = _mm256_permutevar8x32_ps(c->table, _mm256_srlv_epi32(hi, first));
    v[3] = _mm256_permutevar8x32_ps(c->table, _mm256_srlv_epi32(hi, second));
    return r + tv_popcount(flags);
}

/* The same for a 3-bit SPARSE row: avx2_sparse_groups3's eight groups joined two by two
 * into four words in a register, word k (codes 8k .. 8k+7 in its low 24 bits) broadcast
 * to vector k's lanes. */
TV_AVX2 uint32_t avx2_sparse3_values(const uint8_t *codes, uint32_t flags, uint32_t r, uint32_t fill4,
                                     const avx2_consts *c, __m256 *v)
{
    const __m128i x = avx2_sparse_groups3(codes, flag_bytes(flags), r, fill4);
    const __m128i words = _mm_or_si128(_mm_and_si128(x, _mm_set1_epi32(0xfff)),
                                       _mm_and_si128(_mm_srli_epi32(x, 4), _mm_set1_epi32(0xfff000)));
    const __m256i both = _mm256_broadcastsi128_si256(words);
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    v[0] = _mm256_permutevar8x32_ps(c->table, _mm256_srlv_epi32(_mm256_shuffle_epi32(both, 0x00), shifts));
    v[1] = _mm256_permutevar8x32_ps(c->table, _mm256_srlv_epi32(_mm256_shuffle_epi32(both, 0x55), shifts));
    v[2] = _mm256_permutevar8x32_ps(c->table, _mm256_srlv_epi32(_mm256_shuffle_epi32(both, 0xaa), shifts));
    v[3] = _mm256_permutevar8x32_ps(c->table, _mm256_srlv_epi32(_mm256_shuffle_epi32(both, 0xff), shifts));
    return r + tv_popcount(flags);
}

/* TV_PLANNED_SPARSE_VALUES: the 2-bit and 3-bit rows above (bits a constant where the
 * planned rows inline it). */
#define AVX2_SPARSE_VALUES_BITS(bits) ((bits) == 2u || (bits) == 3u)
TV_AVX2 uint32_t avx2_sparse_values(const uint8_t *codes, uint32_t bits, uint32_t flags, uint32_t r, uint32_t fill4,
                                    const avx2_consts *c, __m256 *v)
{
    return bits == 2u ? avx2_sparse2_values(codes, flags, r, fill4, c, v)
                      : avx2_sparse3_values(codes, flags, r, fill4, c, v);
}

TV_AVX2 void row_avx2(float *acc, const uint32_t *row, uint32_t bits, float w, float scale, float offset)
{
    avx2_row(acc, row, bits, w, scale, offset, 0, 0u);
}
TV_DEFINE_SPARSE(sparse_avx2, TV_AVX2_TARGET, avx2_sparse_row_codes, row_avx2)

/* `rows` rows of a CODES term of width `bits`; one (scale, offset) for the tensor makes
 * the row constants once for the pass. */
TV_AVX2 void avx2_rows(float *acc, const tv_term *t, uint32_t i, uint32_t n, uint32_t rows, uint32_t bits)
{
    if ((uint32_t)t->group >= n) {
        const float *p = (const float *)t->params;
        const avx2_consts c = avx2_prepare(bits, t->weight, p[0], p[1]);
        for (uint32_t r = 0; r < rows; ++r, i += 32u)
            avx2_row_with(acc + 32u * r, (const uint32_t *)t->codes + tv_code_word(i, bits), bits, &c,
                          t->mask != 0, t->mask ? row_mask(t, i) : 0u);
        return;
    }
    for (uint32_t r = 0; r < rows; ++r)
        avx2_accum32(acc + 32u * r, t, i + 32u * r, n, bits);
}

/* One CODES term over `rows` rows, AVX2 path: the width becomes a constant. */
TV_AVX2 void accum_avx2(float *acc, const tv_term *t, uint32_t i, uint32_t n, uint32_t rows)
{
    switch (t->bits) {
    case 1: avx2_rows(acc, t, i, n, rows, 1); break;
    case 2: avx2_rows(acc, t, i, n, rows, 2); break;
    case 3: avx2_rows(acc, t, i, n, rows, 3); break;
    case 4: avx2_rows(acc, t, i, n, rows, 4); break;
    case 5: avx2_rows(acc, t, i, n, rows, 5); break;
    case 6: avx2_rows(acc, t, i, n, rows, 6); break;
    case 7: avx2_rows(acc, t, i, n, rows, 7); break;
    default: avx2_rows(acc, t, i, n, rows, 8); break;
    }
}
#endif

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
 * Elements [start, start + len) of one segment, TV_ROWS rows of 32 at a time: base, every
 * term, store, in one pass, so reading the base, decoding and writing the output overlap
 * the way a memory copy's loads and stores do, and each term's setup (its width, scale,
 * mask) is paid once per pass.  The tail (n not a multiple of 32) is decode.h's
 * tv_rebuild_element itself.  Written once, instantiated per instruction path:
 * ACCUM_CODES(acc, t, i, n, rows) adds one CODES term over `rows` rows.
 */
#define TV_ROWS 8
#define TV_DEFINE_TILE(NAME, ATTR, ACCUM_CODES, ACCUM_GROUPS, ACCUM_SPARSE)                  \
    ATTR static void NAME(const tv_segment *s, const tv_term *terms, uint32_t start, uint32_t len) \
    {                                                                                        \
        const uint32_t n = (uint32_t)s->n;                                                   \
        const uint32_t end = start + len;                                                    \
        const int stream = s->out_dtype == TV_F32 && ((uintptr_t)s->out & 15u) == 0;         \
        const int copy_base = s->base_dtype == TV_F32 && s->base_coef == 1.0f;               \
        uint32_t i = start;                                                                  \
        while (i + 32u <= end) {                                                             \
            const uint32_t rows = (end - i) / 32u < TV_ROWS ? (end - i) / 32u : TV_ROWS;     \
            const uint32_t m = 32u * rows;                                                   \
            float acc[32 * TV_ROWS] __attribute__((aligned(32)));                            \
            if (s->base_coef == 0.0f)                                                        \
                memset(acc, 0, m * sizeof(float));                                           \
            else if (copy_base)                                                              \
                memcpy(acc, (const float *)s->base + i, m * sizeof(float));                  \
            else                                                                             \
                for (uint32_t j = 0; j < m; ++j)                                             \
                    acc[j] = tv_base_term(s, i + j);                                         \
            for (uint32_t k = 0; k < s->term_count; ++k) {                                   \
                const tv_term *t = &terms[s->term_begin + k];                                \
                if (t->kind == TV_KIND_CODES)                                                \
                    ACCUM_CODES(acc, t, i, n, rows);                                         \
                else if (t->kind == TV_KIND_GROUPS)                                          \
                    ACCUM_GROUPS(acc, t, i, n, rows);                                        \
                else if (t->kind == TV_KIND_SPARSE)                                          \
                    ACCUM_SPARSE(acc, t, i, n, rows);                                        \
                else                                                                         \
                    for (uint32_t r = 0; r < rows; ++r)                                      \
                        accum32_generic(acc + 32u * r, t, i + 32u * r);                      \
            }                                                                                \
            for (uint32_t r = 0; r < rows; ++r) {                                            \
                if (s->out_dtype == TV_F32)                                                  \
                    store32_f32((float *)s->out + i + 32u * r, acc + 32u * r, stream);       \
                else                                                                         \
                    for (uint32_t j = 32u * r; j < 32u * r + 32u; ++j)                       \
                        tv_store(s->out, s->out_dtype, i + j, acc[j]);                       \
            }                                                                                \
            i += m;                                                                          \
        }                                                                                    \
        for (; i < end; ++i)                                                                 \
            tv_store(s->out, s->out_dtype, i, tv_rebuild_element(s, terms, i));              \
    }

TV_DEFINE_TILE(rebuild_tile_scalar, , accum_scalar, elementwise_rows, elementwise_rows)
TV_DEFINE_TILE(rebuild_tile_portable, , accum_portable, groups_portable, sparse_portable)
#ifdef TV_HAVE_AVX2_PATH
TV_DEFINE_TILE(rebuild_tile_avx2, TV_AVX2_TARGET, accum_avx2, groups_avx2, sparse_avx2)

TV_DEFINE_PLAN(avx2_plan, avx2_consts, __m256)

#define TV_PLANNED(name) avx2_##name
#define TV_PLANNED_TARGET TV_AVX2_TARGET
#define TV_PLANNED_VALUE avx2_value8
#define TV_PLANNED_PLAN avx2_plan
#define TV_PLANNED_PREPARE avx2_prepare
#define TV_PLANNED_VEC __m256
#define TV_PLANNED_VECS 4u
#define TV_PLANNED_ZERO _mm256_setzero_ps
#define TV_PLANNED_ADD _mm256_add_ps
#define TV_PLANNED_LOADU _mm256_loadu_ps
#define TV_PLANNED_STOREU _mm256_storeu_ps
#define TV_PLANNED_STREAM(p, v)                                                               \
    (_mm_stream_ps((p), _mm256_castps256_ps128(v)), _mm_stream_ps((p) + 4, _mm256_extractf128_ps((v), 1)))
#define TV_PLANNED_GROUP_ROW avx2_group_row_bytes
#define TV_PLANNED_GROUP_VALUE avx2_group_value8
#define TV_PLANNED_SPARSE_ROW avx2_sparse_row_codes
#define TV_PLANNED_SPARSE_VALUES avx2_sparse_values
#define TV_PLANNED_SPARSE_VALUES_BITS AVX2_SPARSE_VALUES_BITS
#include "cpu_planned.h"

/*
 * The AVX-512 path: AVX2's rows at 256 bits with two AVX-512VL instructions where they
 * save work: a 4-bit code's value is one two-table lookup (vpermt2ps, 16 entries) instead
 * of two lookups and a blend, and a mask's byte is a mask register that picks the dropped
 * value (vblendmps) instead of a per-lane shift and a blend.  256-bit vectors: on cores
 * that split 512-bit operations in two (AMD Zen 4) a 512-bit row ran at 0.85-1.00x AVX2's
 * (docs/kernels.md), and these instructions are full speed at 256 bits on every AVX-512 CPU.
 * Segments the plans do not take go through the AVX2 rows.
 */
#define TV_AVX512_TARGET __attribute__((target("avx2,avx512f,avx512vl,avx512bw,avx512dq,popcnt")))
#define TV_AVX512 TV_AVX512_TARGET static inline TV_ALWAYS_INLINE

/* avx2_value8's values bit for bit: the same table entries and lane arithmetic, and for a
 * dropped lane the same w * +0. */
TV_AVX512 __m256 avx512_value8(const uint32_t *row, uint32_t bits, const avx2_consts *c, int masked, uint32_t mask,
                               uint32_t k)
{
    __m256 v;
    if (bits <= 4u) {
        const __m256i q = avx2_codes8_lanes(row, bits, k);
        v = bits == 4u ? _mm256_permutex2var_ps(c->table, q, c->table_hi) : _mm256_permutevar8x32_ps(c->table, q);
    } else {
        v = _mm256_mul_ps(c->w, _mm256_add_ps(_mm256_mul_ps(avx2_codes8(row, bits, k), c->s), c->o));
    }
    return masked ? _mm256_mask_blend_ps((__mmask8)(mask >> (8u * k)), c->dropped, v) : v;
}

/* avx2_group_value8's values, the keep bits tested into a mask register. */
TV_AVX512 __m256 avx512_group_value8(const uint32_t *row, const avx2_consts *c, uint32_t k)
{
    const int s = 16 * (int)(k & 1u);
    const __m256i word = _mm256_set1_epi32((int)row[k >> 1]);
    const __mmask8 keep = _mm256_test_epi32_mask(
        word, _mm256_setr_epi32(1 << s, 2 << s, 4 << s, 8 << s, 0x100 << s, 0x200 << s, 0x400 << s, 0x800 << s));
    return _mm256_mask_blend_ps(keep, c->dropped, _mm256_permutevar8x32_ps(c->table, avx2_group_codes8(word, k)));
}

#define TV_PLANNED(name) avx512_##name
#define TV_PLANNED_TARGET TV_AVX512_TARGET
#define TV_PLANNED_VALUE avx512_value8
#define TV_PLANNED_GROUP_VALUE avx512_group_value8
#include "cpu_planned.h"

/* One row of CODES term t added to acc (32 floats, 32-byte aligned) by the AVX-512 rows:
 * what tv_cpu_accum_row holds to the scalar path. */
TV_AVX512_TARGET static void avx512_accum_row(float *acc, const tv_term *t, uint32_t i, uint32_t n)
{
    float scale, offset;
    if (!row_params(t, i, n, &scale, &offset)) {
        accum32_generic(acc, t, i);
        return;
    }
    avx2_plan plan = {avx2_prepare(t->bits, t->weight, scale, offset), t, (const uint32_t *)t->codes,
                      (const uint32_t *)t->mask, 0u, 0u, {0u}, _mm256_setzero_ps()};
    const tv_plan_run run = {0u, 1u, 2u * t->bits + (t->mask != 0)};
    __m256 a[4 * TV_PLAN_ROWS];
    for (uint32_t k = 0; k < 4u; ++k)
        a[k] = _mm256_load_ps(acc + 8u * k);
    avx512_runs_rows(a, &plan, &run, 1u, i, 1u, 0);
    for (uint32_t k = 0; k < 4u; ++k)
        _mm256_store_ps(acc + 8u * k, a[k]);
}

/* accum_avx2 callable from code compiled for any x86-64 (tv_cpu_accum_row). */
TV_AVX2_TARGET static void accum_avx2_rows(float *acc, const tv_term *t, uint32_t i, uint32_t n)
{
    accum_avx2(acc, t, i, n, 1u);
}
#endif

#ifdef TV_HAVE_NEON
/*
 * The NEON path (aarch64: a Jetson's CPU): the planned rows of cpu_planned.h with four
 * lanes to a vector, eight to a row, so two rows' sums take 16 of the 32 registers.  A
 * value is computed in its lanes (convert, multiply, add, mask, multiply), the ops of
 * finish32 in their order; the groups and sparse rows are decode's (group_row_words,
 * sparse_row_codes).  Segments the plans do not take go through the portable rows.
 * Checked for exactness under qemu (tests/kernels/test_aarch64.py); its speed needs the
 * hardware and was not measured.
 */
typedef struct neon_consts {
    float32x4_t s, o, w;
} neon_consts;

static inline TV_ALWAYS_INLINE neon_consts neon_prepare(uint32_t bits, float weight, float scale, float offset)
{
    (void)bits;
    const neon_consts c = {vdupq_n_f32(scale), vdupq_n_f32(offset), vdupq_n_f32(weight)};
    return c;
}

/* finish32's weighted value of codes 4k .. 4k+3 of a row, m the row's mask word: lane j
 * shifts the row's field right by its own b*j (unpack32_float's cut) and keeps its value
 * where mask bit 4k+j is set (tv_keep's AND; a dropped lane is w * +0). */
static inline TV_ALWAYS_INLINE float32x4_t neon_value4(const uint32_t *row, uint32_t bits, const neon_consts *c,
                                                        int masked, uint32_t mask, uint32_t k)
{
    const int32_t b = (int32_t)bits;
    const int32x4_t right = {0, -b, -2 * b, -3 * b};
    const uint32x4_t q = vandq_u32(vshlq_u32(vdupq_n_u32(tv_field(row, bits, 4u * k, 4u)), right),
                                   vdupq_n_u32((1u << bits) - 1u));
    float32x4_t v = vaddq_f32(vmulq_f32(vcvtq_f32_u32(q), c->s), c->o);
    if (masked) {
        const uint32x4_t lane_bits = {1u, 2u, 4u, 8u};
        const uint32x4_t keep = vtstq_u32(vdupq_n_u32(mask >> (4u * k)), lane_bits);
        v = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), keep));
    }
    return vmulq_f32(c->w, v);
}

/* avx2_group_row_words by NEON's byte table lookup (vtbl1_u8, where an index past 7, an
 * unstored group's 0x80, gives a zero byte); near the end of the bytes, the loop. */
static inline TV_ALWAYS_INLINE uint32_t neon_group_row_words(const tv_term *t, uint32_t g, uint32_t r, uint32_t *code,
                                                             uint32_t *keep)
{
    const uint32_t flags = row_flags(t, g);
    if ((uint64_t)r + 8u > 4u * (uint64_t)t->aux)
        return group_row_words(t, g, r, code, keep);
    const uint8x8_t bytes = vld1_u8((const uint8_t *)t->codes + r);
    const uint8x8_t x = vtbl1_u8(bytes, vcreate_u8(flag_bytes(flags).control));
    group_words(vget_lane_u64(vreinterpret_u64_u8(x), 0), code, keep);
    return r + tv_popcount(flags);
}

/* avx2_sparse_row_codes' 2-bit and 4-bit rows by NEON's table lookups (the same loads, inside
 * the stream by its pad words, FORMAT.md 3.4); other widths sparse_row_codes. */
static inline TV_ALWAYS_INLINE uint32_t neon_sparse_row_codes(const tv_term *t, uint32_t g, uint32_t r, uint32_t bits,
                                                              uint32_t fill4, const uint32_t *fill_row, uint32_t *row)
{
    const uint32_t flags = row_flags(t, g);
    const uint8_t *stream = (const uint8_t *)t->codes;
    const tv_flag_bytes f = flag_bytes(flags);
    if (bits == 2u) {
        const uint8x8_t x = vtbl1_u8(vld1_u8(stream + r), vcreate_u8(f.control));
        const uint64_t codes = vget_lane_u64(vreinterpret_u64_u8(x), 0) |
                               ((uint64_t)fill4 * 0x0101010101010101ull & f.unstored);
        row[0] = (uint32_t)codes;
        row[1] = (uint32_t)(codes >> 32);
        row[2] = 0u;
        return r + tv_popcount(flags);
    }
    if (bits == 4u) { /* group k's bytes 2c, 2c+1 for its control byte c; past 15 where none */
        const uint8x8_t c = vcreate_u8(f.control);
        const uint8x16_t twice = vcombine_u8(vzip1_u8(c, c), vzip2_u8(c, c));
        const uint8x16_t pairs = vorrq_u8(vaddq_u8(vaddq_u8(twice, twice), vreinterpretq_u8_u16(vdupq_n_u16(0x0100))),
                                          vandq_u8(twice, vdupq_n_u8(0x80)));
        const uint8x8_t none = vcreate_u8(f.unstored);
        const uint8x16_t none2 = vcombine_u8(vzip1_u8(none, none), vzip2_u8(none, none));
        const uint8x16_t fill = vandq_u8(vreinterpretq_u8_u16(vdupq_n_u16((uint16_t)fill4)), none2);
        vst1q_u32(row, vreinterpretq_u32_u8(vorrq_u8(vqtbl1q_u8(vld1q_u8(stream + 2u * r), pairs), fill)));
        row[4] = 0u;
        return r + tv_popcount(flags);
    }
    return sparse_row_codes(t, g, r, bits, fill4, fill_row, row);
}

TV_DEFINE_PLAN(neon_plan, neon_consts, float32x4_t)

#define TV_PLANNED(name) neon_##name
#define TV_PLANNED_TARGET
#define TV_PLANNED_VALUE neon_value4
#define TV_PLANNED_PLAN neon_plan
#define TV_PLANNED_PREPARE neon_prepare
#define TV_PLANNED_VEC float32x4_t
#define TV_PLANNED_VECS 8u
#define TV_PLANNED_ZERO() vdupq_n_f32(0.0f)
#define TV_PLANNED_ADD vaddq_f32
#define TV_PLANNED_LOADU vld1q_f32
#define TV_PLANNED_STOREU vst1q_f32
#define TV_PLANNED_STREAM vst1q_f32 /* no streaming store intrinsic; STNP would need assembly */
#define TV_PLANNED_GROUP_ROW neon_group_row_words
#define TV_PLANNED_SPARSE_ROW neon_sparse_row_codes
#include "cpu_planned.h"

/* One row of CODES term t added to acc by the NEON planned rows (tv_cpu_accum_row). */
static void neon_accum_row(float *acc, const tv_term *t, uint32_t i, uint32_t n)
{
    float scale, offset;
    if (!row_params(t, i, n, &scale, &offset)) {
        accum32_generic(acc, t, i);
        return;
    }
    neon_plan plan = {neon_prepare(t->bits, t->weight, scale, offset), t, (const uint32_t *)t->codes,
                      (const uint32_t *)t->mask, 0u, 0u, {0u}, vdupq_n_f32(0.0f)};
    const tv_plan_run run = {0u, 1u, 2u * t->bits + (t->mask != 0)};
    float32x4_t a[8 * TV_PLAN_ROWS];
    for (uint32_t k = 0; k < 8u; ++k)
        a[k] = vld1q_f32(acc + 4u * k);
    neon_runs_rows(a, &plan, &run, 1u, i, 1u, 0);
    for (uint32_t k = 0; k < 8u; ++k)
        vst1q_f32(acc + 4u * k, a[k]);
}
#endif

static int avx2_supported(void)
{
#ifdef TV_HAVE_AVX2_PATH
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("popcnt") != 0;
#else
    return 0;
#endif
}

static int avx512_supported(void)
{
#ifdef TV_HAVE_AVX2_PATH
    return avx2_supported() && __builtin_cpu_supports("avx512f") != 0 && __builtin_cpu_supports("avx512vl") != 0 &&
           __builtin_cpu_supports("avx512bw") != 0 && __builtin_cpu_supports("avx512dq") != 0;
#else
    return 0;
#endif
}

static int neon_supported(void)
{
#ifdef TV_HAVE_NEON
    return 1; /* every aarch64 CPU */
#else
    return 0;
#endif
}

static int path_supported(int path)
{
    return path == TV_PATH_PORTABLE || path == TV_PATH_SCALAR || (path == TV_PATH_AVX2 && avx2_supported()) ||
           (path == TV_PATH_AVX512 && avx512_supported()) || (path == TV_PATH_NEON && neon_supported());
}

static int path_in_use = TV_PATH_AUTO;

/*
 * Choose the instruction path: TV_PATH_AUTO (the fastest this CPU runs), PORTABLE, AVX2,
 * AVX512, NEON or SCALAR (decode.h alone, the others' reference).  Returns the path now in use, or -1
 * (and changes nothing) for one this CPU or build lacks.  Not to be called while a
 * rebuild runs.
 */
int tv_cpu_set_path(int path)
{
    if (path == TV_PATH_AUTO)
        path = avx512_supported() ? TV_PATH_AVX512
               : avx2_supported() ? TV_PATH_AVX2
               : neon_supported() ? TV_PATH_NEON
                                  : TV_PATH_PORTABLE;
    if (!path_supported(path))
        return -1;
    path_in_use = path;
    return path;
}

int tv_cpu_path(void)
{
    if (path_in_use == TV_PATH_AUTO)
        tv_cpu_set_path(TV_PATH_AUTO);
    return path_in_use;
}

/*
 * Add CODES term t over elements i .. i+31 (i a multiple of 32, i + 32 <= n) to acc
 * (32 floats, 32-byte aligned) the way instruction path `path` does inside a rebuild;
 * -1 for a path this CPU or build lacks.  The tests compare the paths row by row.
 */
int tv_cpu_accum_row(int path, float *acc, const tv_term *t, uint32_t i, uint32_t n)
{
    if (path == TV_PATH_SCALAR)
        accum_scalar(acc, t, i, n, 1u);
    else if (path == TV_PATH_PORTABLE)
        accum_portable(acc, t, i, n, 1u);
#ifdef TV_HAVE_AVX2_PATH
    else if (path == TV_PATH_AVX2 && avx2_supported())
        accum_avx2_rows(acc, t, i, n);
    else if (path == TV_PATH_AVX512 && avx512_supported())
        avx512_accum_row(acc, t, i, n);
#endif
#ifdef TV_HAVE_NEON
    else if (path == TV_PATH_NEON)
        neon_accum_row(acc, t, i, n);
#endif
    else
        return -1;
    return 0;
}

static void rebuild_tile(const tv_segment *s, const tv_term *terms, uint32_t start, uint32_t len)
{
#ifdef TV_HAVE_AVX2_PATH
    if (path_in_use == TV_PATH_AVX2 || path_in_use == TV_PATH_AVX512) {
        if (!(path_in_use == TV_PATH_AVX512 ? avx512_tile_planned(s, terms, start, len)
                                            : avx2_tile_planned(s, terms, start, len)))
            rebuild_tile_avx2(s, terms, start, len);
        return;
    }
#endif
#ifdef TV_HAVE_NEON
    if (path_in_use == TV_PATH_NEON) {
        if (!neon_tile_planned(s, terms, start, len))
            rebuild_tile_portable(s, terms, start, len);
        return;
    }
#endif
    if (path_in_use == TV_PATH_SCALAR)
        rebuild_tile_scalar(s, terms, start, len);
    else
        rebuild_tile_portable(s, terms, start, len);
}

static uint64_t tiles_of(const tv_segment *s) { return (s->n + TILE - 1) / TILE; }

/*
 * Buffer checks: every byte a table makes the rebuild read or write must lie inside one of
 * the buffers the caller names (begin address, size in bytes).  Checked before anything
 * runs, so a bug in whoever filled the tables (or a bundle no reader check caught) is a
 * refusal, never a read or write outside them.  The addresses are plain integers: the GPU
 * rebuild checks its device tables here too.
 */
typedef struct tv_extent {
    uint64_t begin;
    uint64_t bytes;
} tv_extent;

enum {
    TV_CHECK_OK = 0,
    TV_CHECK_SEGMENT = 1, /* n above 2^31 - 1, a dtype code unknown, terms past the term table, or
                             a block_offset past the tensor's last block */
    TV_CHECK_BASE = 2,
    TV_CHECK_OUT = 3,
    TV_CHECK_TERM = 4, /* kind, bits or group out of range */
    TV_CHECK_CODES = 5,
    TV_CHECK_PARAMS = 6,
    TV_CHECK_MASK = 7,
    TV_CHECK_VALUES = 8,
    TV_CHECK_RUN = 9 /* a run's segment or element range (then *where is the run's index) */
};

/*
 * The buffers as the checks search them: sorted by begin address, each with the furthest
 * end of it and the buffers before it, so a range lies inside one of them exactly when the
 * last buffer beginning at or below it has a furthest end at or past the range's end (a
 * binary search: an 8-task mix names about 1,800 buffers and makes about 1,900 checks,
 * which a scan over the buffers took 1 ms for, against 16 ms of rebuild).  Without
 * memory for the copy, the checks scan the caller's table.
 */
typedef struct tv_spans {
    const tv_extent *ext; /* the caller's table, next entries */
    uint32_t next;
    tv_extent *sorted; /* begin, and in `bytes` the furthest end so far; 0 when not made */
} tv_spans;

static uint64_t extent_end(const tv_extent *e)
{
    return e->bytes > UINT64_MAX - e->begin ? UINT64_MAX : e->begin + e->bytes;
}

static int by_begin(const void *a, const void *b)
{
    const uint64_t x = ((const tv_extent *)a)->begin, y = ((const tv_extent *)b)->begin;
    return x < y ? -1 : x > y;
}

static tv_spans make_spans(const tv_extent *ext, uint32_t next)
{
    tv_spans sp = {ext, next, next ? malloc(next * sizeof(tv_extent)) : NULL};
    if (!sp.sorted)
        return sp;
    memcpy(sp.sorted, ext, next * sizeof(tv_extent));
    qsort(sp.sorted, next, sizeof(tv_extent), by_begin);
    uint64_t furthest = 0;
    for (uint32_t i = 0; i < next; ++i) {
        const uint64_t end = extent_end(&sp.sorted[i]);
        furthest = end > furthest ? end : furthest;
        sp.sorted[i].bytes = furthest;
    }
    return sp;
}

static int inside(const tv_spans *sp, uint64_t p, uint64_t bytes)
{
    if (bytes > UINT64_MAX - p)
        return 0;
    if (!sp->sorted) {
        for (uint32_t i = 0; i < sp->next; ++i)
            if (p >= sp->ext[i].begin && p + bytes <= extent_end(&sp->ext[i]))
                return 1;
        return 0;
    }
    uint32_t lo = 0, hi = sp->next; /* the first buffer beginning above p: hi */
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (sp->sorted[mid].begin <= p)
            lo = mid + 1;
        else
            hi = mid;
    }
    return hi > 0 && sp->sorted[hi - 1].bytes >= p + bytes;
}

static uint64_t element_bytes(uint32_t dtype) { return dtype == TV_F32 ? 4 : 2; }

static int check_term(const tv_term *t, uint64_t n, const tv_spans *sp)
{
    if (t->kind == TV_KIND_CODES) {
        if (t->bits < 1 || t->bits > 8 || t->group < 1)
            return TV_CHECK_TERM;
        if (!inside(sp, t->codes, 4 * ((n * t->bits + 31) / 32 + 1)))
            return TV_CHECK_CODES;
        if (!inside(sp, t->params, 8 * ((n + t->group - 1) / t->group)))
            return TV_CHECK_PARAMS;
    } else if (t->kind == TV_KIND_GROUPS || t->kind == TV_KIND_SPARSE) {
        /* The index's counts and flags are the reader's to check (FORMAT.md 3.3, 3.4): with
         * them consistent every byte or code read (a sparse term's sentinel group and pad
         * included) lies in the aux words of the stream, so these extents bound every read. */
        const int width_ok = t->kind == TV_KIND_GROUPS ? t->bits == 1
                                                       : t->bits >= 1 && t->bits <= 8 && (t->fill >> t->bits) == 0;
        if (!width_ok || t->group < 1 || t->aux < 1 || !t->mask)
            return TV_CHECK_TERM;
        if (!inside(sp, t->codes, 4 * (uint64_t)t->aux))
            return TV_CHECK_CODES;
        if (!inside(sp, t->params, 8 * ((n + t->group - 1) / t->group)))
            return TV_CHECK_PARAMS;
        if (!inside(sp, t->mask, 4 * TV_INDEX_RECORD * (((n + 3) / 4 + TV_BLOCK_GROUPS - 1) / TV_BLOCK_GROUPS)))
            return TV_CHECK_MASK;
        return TV_CHECK_OK;
    } else if (t->kind == TV_KIND_RAW_F32 || t->kind == TV_KIND_RAW_F16) {
        if (!inside(sp, t->codes, n * (t->kind == TV_KIND_RAW_F32 ? 4 : 2)))
            return TV_CHECK_VALUES;
    } else {
        return TV_CHECK_TERM;
    }
    if (t->mask && !inside(sp, t->mask, 4 * ((n + 31) / 32 + 1)))
        return TV_CHECK_MASK;
    return TV_CHECK_OK;
}

static int check_segments(const tv_segment *segs, uint32_t nseg, const tv_term *terms, uint32_t nterms,
                          const tv_spans *sp, uint32_t *where)
{
    for (uint32_t s = 0; s < nseg; ++s) {
        const tv_segment *g = &segs[s];
        int fault = TV_CHECK_OK;
        *where = s;
        if (g->n > 0x7fffffffu || g->base_dtype > TV_BF16 || g->out_dtype > TV_BF16 ||
            (uint64_t)g->term_begin + g->term_count > nterms ||
            (g->block_offset && (uint64_t)g->block_offset * TV_BLOCK_ELEMS >= g->n))
            return TV_CHECK_SEGMENT;
        if (g->n == 0)
            continue;
        if (g->base_coef != 0.0f && !inside(sp, g->base, g->n * element_bytes(g->base_dtype)))
            return TV_CHECK_BASE;
        if (!inside(sp, g->out, g->n * element_bytes(g->out_dtype)))
            return TV_CHECK_OUT;
        for (uint32_t j = 0; j < g->term_count && fault == TV_CHECK_OK; ++j)
            fault = check_term(&terms[g->term_begin + j], g->n, sp);
        if (fault != TV_CHECK_OK)
            return fault;
    }
    return TV_CHECK_OK;
}

/* TV_CHECK_OK, or the first fault and (in *where) the segment it is in. */
int tv_check_tables(const tv_segment *segs, uint32_t nseg, const tv_term *terms, uint32_t nterms,
                    const tv_extent *ext, uint32_t next, uint32_t *where)
{
    tv_spans sp = make_spans(ext, next);
    const int fault = check_segments(segs, nseg, terms, nterms, &sp, where);
    free(sp.sorted);
    return fault;
}

/*
 * Elements [start, start + len) of segment `segment`: one work item of a rebuild that
 * writes part of a tensor (runtime/mixtables.py lists the 1024-element blocks a switch
 * must write, skipping those that hold the same bits before and after it).
 */
typedef struct tv_run {
    uint32_t segment;
    uint32_t start; /* a multiple of 32: rows of codes begin there */
    uint32_t len;   /* 1..TILE, and start + len <= the segment's n */
} tv_run;

uint32_t tv_sizeof_run(void) { return (uint32_t)sizeof(tv_run); }

static int check_runs(const tv_segment *segs, uint32_t nseg, const tv_run *runs, uint32_t nruns, uint32_t *where)
{
    for (uint32_t r = 0; r < nruns; ++r) {
        const tv_run *u = &runs[r];
        *where = r;
        if (u->segment >= nseg || u->start % 32u || u->len < 1u || u->len > TILE ||
            (uint64_t)u->start + u->len > segs[u->segment].n)
            return TV_CHECK_RUN;
    }
    return TV_CHECK_OK;
}

int tv_rebuild_cpu(const tv_segment *segs, uint32_t nseg, const tv_term *terms, int threads);
static void rebuild_runs(const tv_segment *segs, const tv_run *runs, uint32_t nruns, const tv_term *terms,
                         int threads);

/* tv_check_tables, then the rebuild if the tables pass: what the Python side calls. */
int tv_rebuild_cpu_checked(const tv_segment *segs, uint32_t nseg, const tv_term *terms, uint32_t nterms,
                           const tv_extent *ext, uint32_t next, int threads, uint32_t *where)
{
    int fault = tv_check_tables(segs, nseg, terms, nterms, ext, next, where);
    return fault != TV_CHECK_OK ? fault : tv_rebuild_cpu(segs, nseg, terms, threads);
}

/* The same for the listed runs only: a fault in the tables names a segment, one in the
 * runs (TV_CHECK_RUN) a run. */
int tv_rebuild_cpu_runs_checked(const tv_segment *segs, uint32_t nseg, const tv_term *terms, uint32_t nterms,
                                const tv_extent *ext, uint32_t next, const tv_run *runs, uint32_t nruns,
                                int threads, uint32_t *where)
{
    int fault = tv_check_tables(segs, nseg, terms, nterms, ext, next, where);
    if (fault == TV_CHECK_OK)
        fault = check_runs(segs, nseg, runs, nruns, where);
    if (fault == TV_CHECK_OK)
        rebuild_runs(segs, runs, nruns, terms, threads);
    return fault;
}

/* The threads worth waking for `items` work items: a thread that is not scheduled on a
 * loaded machine makes the others wait at the barrier for milliseconds. */
static int team_size(uint64_t items, int threads)
{
#ifdef _OPENMP
    if (threads <= 0)
        threads = omp_get_max_threads();
    if ((uint64_t)threads > items / MIN_TILES_PER_THREAD)
        threads = items < MIN_TILES_PER_THREAD ? 1 : (int)(items / MIN_TILES_PER_THREAD);
    return threads;
#else
    (void)items;
    (void)threads;
    return 1;
#endif
}

/* This thread's share [*first, *last) of `items`, in one contiguous range per thread. */
static void my_share(uint64_t items, uint64_t *first, uint64_t *last)
{
#ifdef _OPENMP
    const uint64_t nt = (uint64_t)omp_get_num_threads(), id = (uint64_t)omp_get_thread_num();
#else
    const uint64_t nt = 1, id = 0;
#endif
    *first = items * id / nt;
    *last = items * (id + 1) / nt;
}

static void rebuild_runs(const tv_segment *segs, const tv_run *runs, uint32_t nruns, const tv_term *terms,
                         int threads)
{
    if (nruns == 0)
        return;
    const int team = team_size(nruns, threads);
    (void)team;
#ifdef _OPENMP
#pragma omp parallel num_threads(team)
#endif
    {
        uint64_t first, last;
        my_share(nruns, &first, &last);
        for (uint64_t r = first; r < last; ++r)
            rebuild_tile(&segs[runs[r].segment], terms, runs[r].start, runs[r].len);
    }
#ifdef TV_HAVE_SSE2
    _mm_sfence(); /* streaming stores are visible to every thread once this returns */
#endif
}

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
    const int team = team_size(total, threads);
    (void)team;
#ifdef _OPENMP
#pragma omp parallel num_threads(team)
#endif
    {
        uint64_t first, last;
        my_share(total, &first, &last);
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
