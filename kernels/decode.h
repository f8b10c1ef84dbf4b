/*
 * decode.h - the one source of truth for tvswitch's packed layouts.
 *
 * The CPU library (cpu_rebuild.c, built by setup.py and loaded with ctypes) and the
 * CUDA kernels (rebuild.cu, compiled by NVRTC or nvcc) both include this header, so
 * the bytes on flash are decoded by the same lines of code everywhere.  docs/FORMAT.md
 * says the same in prose; tests/kernels holds both builds to the numpy reference
 * bit for bit.
 *
 * What each build takes from here (docs/kernels.md has the same list):
 * - both hot paths: tv_code_word/tv_code_shift (where a code lies), tv_window/tv_cut
 *   (codes from a loaded pair of words), tv_field_code, tv_mask_field and tv_bit (the mask
 *   as a 1-bit stream), tv_group_* (the groups and sparse layouts' index and bytes),
 *   tv_sparse_code/tv_sparse_fill4 (a sparse term's codes), tv_params (a group's scale
 *   and offset), tv_dequant = tv_affine of
 *   tv_code_float, tv_keep and tv_accumulate: one function per operation of the contract
 *   below, in its order;
 * - both slow paths and tails: tv_term_value / tv_rebuild_element, built of the same;
 * - the CPU's 16-bit conversions (tv_half_to_float, tv_float_to_half, bf16 both ways);
 *   the GPU uses the bf16 ones and, for fp16, its cvt instructions, which round the same
 *   way and differ only in NaN payloads (rebuild.cu, tv_h2f/tv_f2h).
 * Not from here, and held to it bit for bit by tests/kernels (every width 1..8, with and
 * without masks, row by row against the scalar path, the CPU path made of this header
 * alone): the CPU's SIMD code conversion (cpu_rebuild.c's unpack32_float: SSE2 on x86-64,
 * NEON on aarch64, run under qemu), its AVX2 row (avx2_codes8 + avx2_row) and its
 * gathering of a groups term's bytes into a row's code and mask words (group_row_words,
 * with a byte shuffle on AVX2 CPUs: avx2_group_row_words) and of a sparse term's codes into
 * a row of codes (sparse_row_codes, avx2_sparse_row_codes), held to tv_term_value.
 *
 * Plain C99 that CUDA 10.2 (JetPack 4) also accepts: no C++ templates, no cuda_fp16.h
 * (half and bfloat16 are converted by bit manipulation, identically on host and device).
 *
 * Arithmetic contract (what makes CPU and GPU bit-identical): every element is
 *     acc  = base_coef * base[i]          (or 0 when base_coef == 0)
 *     acc  = acc + weight_j * value_j(i)  for each term j, in table order
 *     out[i] = round_to_out_dtype(acc)
 * with value = (float)q * scale + offset, then 0 where a mask bit is 0, all in IEEE
 * binary32 with no contraction into FMA (gcc -ffp-contract=off, NVRTC --fmad=false).
 */
#ifndef TVSWITCH_DECODE_H
#define TVSWITCH_DECODE_H

#ifdef __CUDACC_RTC__
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define TV_HD __host__ __device__ __forceinline__
#else
#define TV_HD static inline
#endif

/* Compile-time size checks that C99 and CUDA 10.2 both accept. */
#define TV_STATIC_ASSERT(cond, name) typedef char tv_static_assert_##name[(cond) ? 1 : -1]

/* ---- format constants (FORMAT.md section "Term kinds" and "Element dtypes") ---- */
enum {
    TV_KIND_CODES = 0,   /* b-bit codes with a (scale, offset) pair per group */
    TV_KIND_RAW_F32 = 1, /* the values themselves, binary32 */
    TV_KIND_RAW_F16 = 2, /* the values themselves, binary16 */
    TV_KIND_GROUPS = 3,  /* masked 1-bit codes in the groups layout (FORMAT.md 3.3) */
    TV_KIND_SPARSE = 4   /* b-bit codes in the sparse layout: groups of fill codes left out (3.4) */
};
enum { TV_F32 = 0, TV_F16 = 1, TV_BF16 = 2 };

/* Elements one CUDA block rebuilds; the launch table counts blocks of this size. */
#define TV_BLOCK_THREADS 256
#define TV_ELEMS_PER_THREAD 4
#define TV_BLOCK_ELEMS (TV_BLOCK_THREADS * TV_ELEMS_PER_THREAD)

/*
 * One term of a rebuild: weight * value(i) is added to element i.  Pointers are stored
 * as 64-bit integers so the struct has one layout on every platform and Python can
 * fill it as a numpy structured array (kernels/abi.py mirrors it field by field).
 *
 * A b-bit code stream holds value i at stream bits [b*i, b*i + b); stream bit k is bit
 * (k & 31) of little-endian uint32 word (k >> 5).  Every stream ends with one extra zero
 * word so that a decoder may always read the 64-bit window of words k>>5 and (k>>5)+1.
 * 32 values of b bits fill exactly b words: 2-bit packs 16 per word, 4-bit 8, and 3-bit
 * packs 32 values in 3 words with no waste.  A mask is a 1-bit stream of the same form.
 */
typedef struct tv_term {
    uint64_t codes;  /* uint32 code stream (CODES, SPARSE: its stored groups'), the raw element array
                        (RAW_*), the group bytes (GROUPS) */
    uint64_t mask;   /* uint32 1-bit stream, 0 = no mask (every element kept); GROUPS, SPARSE: the group index */
    uint64_t params; /* float32 [scale, offset] per group (CODES, GROUPS, SPARSE) */
    uint32_t group;  /* elements per group: the tensor, one output channel, or G */
    uint32_t fill;   /* SPARSE: the code of every element of a group the index does not flag; else 0 */
    float weight;    /* mix weight of this term, rescaler included */
    uint32_t kind;   /* TV_KIND_* */
    uint32_t bits;   /* code width b, 1..8 (CODES, SPARSE; GROUPS: 1) */
    uint32_t aux;    /* GROUPS, SPARSE: uint32 words of the bytes or code stream (what the buffer
                        checks bound); else 0 */
} tv_term;
TV_STATIC_ASSERT(sizeof(tv_term) == 48, tv_term_is_48_bytes);

/* One output tensor: out = base_coef * base + sum of its terms. */
typedef struct tv_segment {
    uint64_t base;        /* base tensor; 0 when base_coef == 0 (base not read) */
    uint64_t out;         /* output tensor, may alias base */
    uint64_t n;           /* elements, < 2^31 */
    uint64_t first_block; /* launch table: index of this segment's first CUDA block */
    float base_coef;      /* 1 for task vectors; 1 - sum of weights of absolute terms */
    uint32_t base_dtype;  /* TV_F32 / TV_F16 / TV_BF16 */
    uint32_t out_dtype;
    uint32_t term_begin;  /* index of the first term in the term table */
    uint32_t term_count;
    /* launch table: the tensor's blocks before this segment's first.  A GPU switch that
     * writes part of a tensor lists it once per stretch of blocks (same base, out and
     * terms): segment s then covers the tensor's blocks block_offset .. block_offset +
     * (the next segment's first_block - first_block) - 1.  0 for a whole tensor.  The CPU
     * rebuild writes each segment whole, whatever this says (it takes element runs for
     * part of a tensor); tv_check_tables holds it inside the tensor. */
    uint32_t block_offset;
} tv_segment;
TV_STATIC_ASSERT(sizeof(tv_segment) == 56, tv_segment_is_56_bytes);

/* ---- bit streams ----
 *
 * Every decoder, on the CPU and on the GPU, finds codes with tv_code_word/tv_code_shift,
 * cuts them from a (lo, hi) pair of words it has loaded with tv_cut and takes code k of the
 * field with tv_field_code.  A mask is a 1-bit stream: the same three functions with b = 1.
 */

/* Word holding the first bit of code `first` of a b-bit stream: row first>>5 of 32 codes
 * starts at word (first>>5)*b.  32-bit arithmetic: first < 2^31 and b <= 8 keep it exact. */
TV_HD uint32_t tv_code_word(uint32_t first, uint32_t bits)
{
    return (first >> 5) * bits + (((first & 31u) * bits) >> 5);
}

/* Bit of that word at which code `first` starts. */
TV_HD uint32_t tv_code_shift(uint32_t first, uint32_t bits)
{
    return ((first & 31u) * bits) & 31u;
}

/*
 * The 32 stream bits from bit `shift` of word `lo` on, `hi` being the next word of the
 * stream: the code starting at `shift` in the lowest bits, the codes after it above (the
 * 64-bit pair holds at least 33 bits past any shift).  A caller that knows its codes end
 * inside `lo` may pass hi = 0.
 */
TV_HD uint32_t tv_window(uint32_t lo, uint32_t hi, uint32_t shift)
{
    return (uint32_t)((((uint64_t)hi << 32) | (uint64_t)lo) >> shift);
}

/* `count` codes of b bits (count*b <= 32) of tv_window, as one field, nothing above them. */
TV_HD uint32_t tv_cut(uint32_t lo, uint32_t hi, uint32_t shift, uint32_t bits, uint32_t count)
{
    const uint32_t window = tv_window(lo, hi, shift);
    return count * bits >= 32u ? window : window & ((1u << (count * bits)) - 1u);
}

/* Code k of a field (or window) of b-bit codes. */
TV_HD uint32_t tv_field_code(uint32_t field, uint32_t bits, uint32_t k)
{
    return (field >> (k * bits)) & ((1u << bits) - 1u);
}

/* Codes first .. first+count-1 of a b-bit stream in memory, as tv_cut's field. */
TV_HD uint32_t tv_field(const uint32_t *words, uint32_t bits, uint32_t first, uint32_t count)
{
    const uint32_t w = tv_code_word(first, bits);
    return tv_cut(words[w], words[w + 1], tv_code_shift(first, bits), bits, count);
}

/* Code i of a b-bit stream (b = 1..8). */
TV_HD uint32_t tv_code(const uint32_t *words, uint32_t bits, uint32_t i)
{
    return tv_field(words, bits, i, 1u);
}

/*
 * Codes 32*r .. 32*r+31 of a b-bit stream, whose b words start at words + r*b.  With b a
 * compile-time constant every shift is one too, which is what the CPU build's inner loop
 * relies on.
 */
TV_HD void tv_unpack32(const uint32_t *words, uint32_t bits, uint32_t *q)
{
#if defined(__GNUC__) && !defined(__CUDACC__) && !defined(__clang__)
#pragma GCC unroll 32
#endif
    for (uint32_t j = 0; j < 32u; ++j)
        q[j] = tv_field(words, bits, j, 1u);
}

/* Nonzero when bit k of a mask field is set (element kept).  `word & (1 << k)` rather than
 * a shift down: with k a constant per lane the CPU's vectoriser turns it into one AND. */
TV_HD uint32_t tv_bit(uint32_t field, uint32_t k)
{
    return field & (1u << k);
}

/* The mask bits of elements i, i+1, .. (to the end of their word) in the lowest bits of a
 * field, from the mask word tv_code_word(i, 1) holds: a 1-bit code never straddles words. */
TV_HD uint32_t tv_mask_field(uint32_t word, uint32_t i)
{
    return word >> tv_code_shift(i, 1u);
}

/* 1 when element i of a 1-bit mask stream is kept. */
TV_HD uint32_t tv_mask_bit(const uint32_t *words, uint32_t i)
{
    return tv_bit(tv_mask_field(words[tv_code_word(i, 1u)], i), 0u) != 0u;
}

/* ---- 16-bit floats, round to nearest even, identical on host and device ---- */

TV_HD float tv_bits_to_float(uint32_t u)
{
    union { uint32_t u; float f; } v;
    v.u = u;
    return v.f;
}

TV_HD uint32_t tv_float_to_bits(float f)
{
    union { uint32_t u; float f; } v;
    v.f = f;
    return v.u;
}

TV_HD float tv_half_to_float(uint16_t h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t exp = ((uint32_t)h >> 10) & 0x1fu;
    uint32_t man = (uint32_t)h & 0x3ffu;
    if (exp == 0x1fu) /* inf / nan */
        return tv_bits_to_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0)
            return tv_bits_to_float(sign);
        /* subnormal: man * 2^-24, exact in binary32 */
        float f = (float)man * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    return tv_bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

TV_HD uint16_t tv_float_to_half(float f)
{
    uint32_t x = tv_float_to_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or nan (nan stays quiet nan) */
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) { /* below 2^-14: half subnormal or zero */
        if (ax < 0x33000000u) /* below 2^-25: rounds to zero */
            return (uint16_t)sign;
        uint32_t e = ax >> 23;
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14..24 */
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u)))
            r += 1u;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ax - 0x38000000u; /* rebias exponent 127 -> 15 */
    uint32_t out = r >> 13;
    uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (out & 1u)))
        out += 1u;
    return (uint16_t)(sign | out);
}

TV_HD float tv_bf16_to_float(uint16_t b)
{
    return tv_bits_to_float((uint32_t)b << 16);
}

TV_HD uint16_t tv_float_to_bf16(float f)
{
    uint32_t x = tv_float_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) /* nan */
        return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* ---- values: the arithmetic contract, one operation per function ---- */

/* (float)q for a code q < 2^23, exactly, without an integer-to-float conversion (a
 * quarter-rate unit on the GPU): 2^23 + q is representable, so subtracting 2^23 again is
 * exact and gives q itself (+0.0 for q = 0, as (float)0). */
TV_HD float tv_code_float(uint32_t q)
{
    return tv_bits_to_float(0x4b000000u | q) - 8388608.0f;
}

/* The TVQ affine map of FORMAT.md on a code already converted to float. */
TV_HD float tv_affine(float qf, float scale, float offset)
{
    float scaled = qf * scale;
    return scaled + offset;
}

/* Dequantise one code. */
TV_HD float tv_dequant(uint32_t q, float scale, float offset)
{
    return tv_affine(tv_code_float(q), scale, offset);
}

/* A term's value where its mask says `keep` (nonzero), +0.0 where it does not.  Written as
 * an AND of the bits rather than `keep ? v : 0`: the same result, and no branch for the
 * compiler to keep around the arithmetic that computes v (the CPU build vectorises it). */
TV_HD float tv_keep(float v, uint32_t keep)
{
    return tv_bits_to_float(tv_float_to_bits(v) & (keep ? 0xffffffffu : 0u));
}

/* One step of the sum: acc + weight * value, two roundings, never an FMA. */
TV_HD float tv_accumulate(float acc, float weight, float v)
{
    float term = weight * v;
    return acc + term;
}

/* The (scale, offset) pair of element i of a CODES term (32-bit divide, as the tables promise). */
TV_HD const float *tv_params(const tv_term *t, uint32_t i)
{
    return (const float *)t->params + 2u * (i / (uint32_t)t->group);
}

/* ---- element access by dtype ---- */

TV_HD float tv_load(uint64_t ptr, uint32_t dtype, uint32_t i)
{
    if (dtype == TV_F32)
        return ((const float *)ptr)[i];
    if (dtype == TV_F16)
        return tv_half_to_float(((const uint16_t *)ptr)[i]);
    return tv_bf16_to_float(((const uint16_t *)ptr)[i]);
}

TV_HD void tv_store(uint64_t ptr, uint32_t dtype, uint32_t i, float v)
{
    if (dtype == TV_F32)
        ((float *)ptr)[i] = v;
    else if (dtype == TV_F16)
        ((uint16_t *)ptr)[i] = tv_float_to_half(v);
    else
        ((uint16_t *)ptr)[i] = tv_float_to_bf16(v);
}

/* ---- the groups and sparse layouts (FORMAT.md 3.3, 3.4) ----
 *
 * Both store a term by groups of four elements and leave out the groups that hold nothing
 * of their own.  GROUPS (a masked 1-bit term): groups with a kept element have a byte
 * (bits 0-3: keep of elements 0..3, bits 4-7: their codes), in order.  SPARSE (b-bit
 * codes): groups whose codes are not all the term's fill code have their four codes in a
 * b-bit stream, in order, followed by one sentinel group of fill codes.  The index holds,
 * per block of 256 groups (1024 elements, one CUDA block), a word counting the flagged
 * groups before the block and 8 words of flags (bit g & 31 of word (g >> 5) & 7: group g
 * is stored).  A stored group is found by its rank: the block's count plus the flags
 * before it in the block, at most 8 popcounts.
 */
#define TV_BLOCK_GROUPS 256u
#define TV_INDEX_RECORD 9u

TV_HD uint32_t tv_popcount(uint32_t x)
{
#ifdef __CUDA_ARCH__
    return (uint32_t)__popc(x);
#else
    return (uint32_t)__builtin_popcount(x);
#endif
}

/* The index word holding group g's flag (g & 31 its bit). */
TV_HD uint32_t tv_group_flags(const tv_term *t, uint32_t g)
{
    return ((const uint32_t *)t->mask)[(g / TV_BLOCK_GROUPS) * TV_INDEX_RECORD + 1u + ((g >> 5) & 7u)];
}

/* How many flagged groups come before group g (g's byte, if it has one, is byte rank). */
TV_HD uint32_t tv_group_rank(const tv_term *t, uint32_t g)
{
    const uint32_t *rec = (const uint32_t *)t->mask + (g / TV_BLOCK_GROUPS) * TV_INDEX_RECORD;
    uint32_t r = rec[0];
    for (uint32_t w = 0; w < ((g >> 5) & 7u); ++w)
        r += tv_popcount(rec[1u + w]);
    return r + tv_popcount(rec[1u + ((g >> 5) & 7u)] & ((1u << (g & 31u)) - 1u));
}

/* Byte r of the group bytes (byte r & 3 of little-endian word r >> 2). */
TV_HD uint32_t tv_group_byte_at(const tv_term *t, uint32_t r)
{
    return (((const uint32_t *)t->codes)[r >> 2] >> (8u * (r & 3u))) & 0xffu;
}

/* 1 when group g is stored (flagged in the index). */
TV_HD uint32_t tv_group_stored(const tv_term *t, uint32_t g)
{
    return (tv_group_flags(t, g) >> (g & 31u)) & 1u;
}

/* Group g's byte: 0 (nothing kept) for a group without one. */
TV_HD uint32_t tv_group_byte(const tv_term *t, uint32_t g)
{
    if (!tv_group_stored(t, g))
        return 0u;
    return tv_group_byte_at(t, tv_group_rank(t, g));
}

/* A SPARSE term's fill code four times, as the field of a group of b-bit codes. */
TV_HD uint32_t tv_sparse_fill4(const tv_term *t, uint32_t bits)
{
    return t->fill * (1u | 1u << bits | 1u << 2u * bits | 1u << 3u * bits);
}

/* The code of element i of a SPARSE term: from its group's four codes in the stream, or
 * the fill code where the group is not stored. */
TV_HD uint32_t tv_sparse_code(const tv_term *t, uint32_t i)
{
    const uint32_t g = i >> 2;
    if (!tv_group_stored(t, g))
        return t->fill;
    return tv_code((const uint32_t *)t->codes, t->bits, 4u * tv_group_rank(t, g) + (i & 3u));
}

/* Value of one term at element i, before its weight. */
TV_HD float tv_term_value(const tv_term *t, uint32_t i)
{
    float v;
    if (t->kind == TV_KIND_GROUPS) { /* the code and keep bit of i from its group's byte */
        const uint32_t byte = tv_group_byte(t, i >> 2), j = i & 3u;
        const float *p = tv_params(t, i);
        return tv_keep(tv_dequant((byte >> (4u + j)) & 1u, p[0], p[1]), (byte >> j) & 1u);
    }
    if (t->kind == TV_KIND_SPARSE) { /* no mask: the mask field holds the index */
        const float *p = tv_params(t, i);
        return tv_dequant(tv_sparse_code(t, i), p[0], p[1]);
    }
    if (t->kind == TV_KIND_CODES) {
        const float *p = tv_params(t, i);
        v = tv_dequant(tv_code((const uint32_t *)t->codes, t->bits, i), p[0], p[1]);
    } else if (t->kind == TV_KIND_RAW_F32) {
        v = ((const float *)t->codes)[i];
    } else {
        v = tv_half_to_float(((const uint16_t *)t->codes)[i]);
    }
    return tv_keep(v, t->mask ? tv_mask_bit((const uint32_t *)t->mask, i) : 1u);
}

/* The first term of a segment's sum: the (scaled) base, or nothing. */
TV_HD float tv_base_term(const tv_segment *s, uint32_t i)
{
    if (s->base_coef == 0.0f)
        return 0.0f;
    return s->base_coef * tv_load(s->base, s->base_dtype, i);
}

/* Element i of segment s, exactly as the arithmetic contract above says. */
TV_HD float tv_rebuild_element(const tv_segment *s, const tv_term *terms, uint32_t i)
{
    float acc = tv_base_term(s, i);
    for (uint32_t j = 0; j < s->term_count; ++j) {
        const tv_term *t = &terms[s->term_begin + j];
        acc = tv_accumulate(acc, t->weight, tv_term_value(t, i));
    }
    return acc;
}

#endif /* TVSWITCH_DECODE_H */
