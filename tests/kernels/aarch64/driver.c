/*
 * Runs the CPU library on deterministic tables covering every code width, masks, group
 * sizes, raw terms and 16-bit outputs, and writes the raw output bytes to stdout.  Built
 * for the host and for aarch64 (run under qemu), the two byte streams must be equal: the
 * Jetson's CPU build computes what the tested x86 build computes.  Built with
 * AddressSanitizer and UBSan (tests/kernels/test_sanitized.py), every buffer is malloc'd
 * at exactly the size the format gives it, so any read or write past one is caught (the
 * 1-bit cases add the same codes and mask in the groups layout, packed here by
 * pack_groups below, FORMAT.md 3.3, and every case a term of mostly-fill codes in the
 * sparse layout, 3.4, by pack_sparse, so their 8-byte loads near the end are checked); and
 * each case's tables are also run with one buffer declared a word short, which
 * tv_rebuild_cpu_checked must refuse without touching the output.
 */
#include "decode.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { uint64_t begin, bytes; } extent;
int tv_rebuild_cpu_checked(const tv_segment *segs, uint32_t nseg, const tv_term *terms, uint32_t nterms,
                           const extent *ext, uint32_t next, int threads, uint32_t *where);
int tv_cpu_accum_row(int path, float *acc, const tv_term *t, uint32_t i, uint32_t n);
int tv_cpu_set_path(int path);

/*
 * The groups layout of n 1-bit codes under a mask (FORMAT.md 3.3): *index (9 words per
 * block of 256 groups) and *bytes (a byte per group with a kept element, then a zero
 * word), both malloc'd at their exact sizes; returns the byte stream's words.
 */
static uint32_t pack_groups(const uint32_t *codes, const uint32_t *mask, uint32_t n, uint32_t **index,
                            uint32_t **bytes)
{
    const uint32_t groups = (n + 3) / 4, blocks = (groups + 255) / 256;
    uint32_t kept = 0;
    uint8_t *b = calloc(groups + 4, 1);
    *index = calloc(9 * blocks, 4);
    for (uint32_t g = 0; g < groups; ++g) {
        uint32_t byte = 0;
        for (uint32_t j = 0; j < 4 && 4 * g + j < n; ++j) {
            const uint32_t i = 4 * g + j, keep = (mask[i / 32] >> (i % 32)) & 1u;
            byte |= keep << j | (((codes[i / 32] >> (i % 32)) & keep) << (4 + j));
        }
        if (g % 256 == 0)
            (*index)[9 * (g / 256)] = kept;
        if (byte) {
            (*index)[9 * (g / 256) + 1 + (g / 32) % 8] |= 1u << (g % 32);
            b[kept++] = (uint8_t)byte;
        }
    }
    const uint32_t words = (kept + 3) / 4 + 1;
    *bytes = calloc(words, 4);
    for (uint32_t r = 0; r < kept; ++r)
        (*bytes)[r / 4] |= (uint32_t)b[r] << (8 * (r % 4));
    free(b);
    return words;
}

/*
 * The sparse layout of n b-bit codes with fill code `fill` (FORMAT.md 3.4): *index and
 * *words (the stored groups' codes, a sentinel group of fill codes, the stream's zero word
 * and three pad words), malloc'd at their exact sizes; returns the stream's words.
 */
static uint32_t pack_sparse(const uint32_t *codes, uint32_t n, uint32_t bits, uint32_t fill, uint32_t **index,
                            uint32_t **words)
{
    const uint32_t groups = (n + 3) / 4, blocks = (groups + 255) / 256;
    uint32_t stored = 0;
    *index = calloc(9 * blocks, 4);
    for (uint32_t g = 0; g < groups; ++g) {
        int differs = 0;
        for (uint32_t j = 0; j < 4 && 4 * g + j < n; ++j)
            differs |= codes[4 * g + j] != fill;
        if (g % 256 == 0)
            (*index)[9 * (g / 256)] = stored;
        if (differs) {
            (*index)[9 * (g / 256) + 1 + (g / 32) % 8] |= 1u << (g % 32);
            ++stored;
        }
    }
    const uint32_t count = 4 * (stored + 1), nwords = (count * bits + 31) / 32 + 1 + 3; /* 3 pad words */
    uint32_t k = 0;
    *words = calloc(nwords, 4);
    for (uint32_t g = 0; g <= groups; ++g) {
        if (g < groups && !(((*index)[9 * (g / 256) + 1 + (g / 32) % 8] >> (g % 32)) & 1u))
            continue;
        for (uint32_t j = 0; j < 4; ++j, ++k) { /* g == groups: the sentinel */
            const uint32_t q = g < groups && 4 * g + j < n ? codes[4 * g + j] : fill;
            const uint64_t bit = (uint64_t)k * bits;
            (*words)[bit / 32] |= q << (bit % 32);
            if (bit % 32 + bits > 32)
                (*words)[bit / 32 + 1] |= q >> (32 - bit % 32);
        }
    }
    return nwords;
}

static uint32_t state = 12345u;
static uint32_t next(void) { state = state * 1664525u + 1013904223u; return state; }
static float uniform(void) { return (float)(next() >> 8) / 16777216.0f - 0.5f; }

/*
 * Every SIMD row path this build has (NEON or SSE2 code conversion, AVX2, AVX-512, the
 * NEON planned rows) against the
 * scalar path, decode.h's functions alone: every width, with and without a mask, bit for
 * bit.  Returns the number of rows that differ (reported on stderr).
 */
static int check_rows(void)
{
    enum { N = 32 * 64 };
    int bad = 0;
    for (uint32_t bits = 1; bits <= 8; ++bits) {
        for (int masked = 0; masked <= 1; ++masked) {
            uint32_t codes[N * 8 / 32 + 1], mask[N / 32 + 1];
            float params[2 * 4];
            for (uint32_t i = 0; i < N * bits / 32; ++i) codes[i] = i < bits ? 0xffffffffu : next();
            codes[N * bits / 32] = 0;
            for (uint32_t i = 0; i < N / 32; ++i) mask[i] = next();
            mask[N / 32] = 0;
            for (uint32_t g = 0; g < 8; ++g) params[g] = uniform();
            tv_term t;
            memset(&t, 0, sizeof t);
            t.codes = (uint64_t)(uintptr_t)codes; t.params = (uint64_t)(uintptr_t)params;
            t.mask = masked ? (uint64_t)(uintptr_t)mask : 0; t.group = N / 4;
            t.weight = uniform() * 4.0f; t.kind = TV_KIND_CODES; t.bits = bits;
            for (uint32_t i = 0; i < N; i += 32) {
                float want[32] __attribute__((aligned(32))), got[32] __attribute__((aligned(32)));
                for (uint32_t j = 0; j < 32; ++j) want[j] = uniform();
                memcpy(got, want, sizeof got);
                tv_cpu_accum_row(3, want, &t, i, N); /* scalar */
                for (int path = 1; path <= 5; ++path) { /* portable, AVX2, -, AVX-512, NEON */
                    float acc[32] __attribute__((aligned(32)));
                    memcpy(acc, got, sizeof acc);
                    if (tv_cpu_accum_row(path, acc, &t, i, N) == 0 && memcmp(acc, want, sizeof acc) != 0) {
                        fprintf(stderr, "path %d differs from scalar: bits %u mask %d row %u\n", path, bits, masked, i);
                        ++bad;
                    }
                }
            }
        }
    }
    return bad;
}

/*
 * The same case's CODES, GROUPS and SPARSE terms with one (scale, offset) for the tensor
 * and every CODES term masked, repeated to PLANNED_TERMS terms of varied weights (what
 * the SIMD paths' register-held rows take), rebuilt by every path this build has; each
 * must give the scalar path's bytes, which go to stdout.  Returns how many differ.
 */
#define PLANNED_TERMS 7
static int planned_case(const tv_segment *seg, const tv_term *t, const extent *ext, uint32_t next_, uint32_t *out)
{
    tv_term pt[PLANNED_TERMS];
    tv_segment s = *seg;
    const uint32_t n = (uint32_t)s.n, kinds = s.term_count;
    const size_t bytes = (size_t)n * (s.out_dtype == TV_F32 ? 4 : 2);
    uint32_t *want = malloc(4 * n), where = 0;
    int bad = 0;
    for (uint32_t k = 0; k < PLANNED_TERMS; ++k) {
        pt[k] = t[k % kinds == 1 ? 0 : k % kinds]; /* no raw term: it is not planned */
        pt[k].group = n;
        pt[k].weight = uniform() * 2.0f;
        if (pt[k].kind == TV_KIND_CODES)
            pt[k].mask = ext[1].begin;
    }
    s.term_count = PLANNED_TERMS;
    tv_cpu_set_path(3);
    if (tv_rebuild_cpu_checked(&s, 1, pt, PLANNED_TERMS, ext, next_, 1, &where) != 0)
        return 1;
    memcpy(want, out, bytes);
    for (int path = 1; path <= 5; ++path) {
        if (path == 3 || tv_cpu_set_path(path) < 0)
            continue;
        memset(out, 0, bytes);
        if (tv_rebuild_cpu_checked(&s, 1, pt, PLANNED_TERMS, ext, next_, 1, &where) != 0 ||
            memcmp(out, want, bytes) != 0) {
            fprintf(stderr, "path %d's planned rows differ from scalar: n %u bits %u\n", path, n, pt[0].bits);
            ++bad;
        }
    }
    tv_cpu_set_path(0);
    fwrite(want, 1, bytes, stdout);
    free(want);
    return bad;
}

int main(void)
{
    if (check_rows() != 0)
        return 1;
    const uint32_t sizes[] = {1, 31, 32, 33, 1000, 4096 + 77, 70000};
    for (uint32_t si = 0; si < sizeof sizes / sizeof sizes[0]; ++si) {
        const uint32_t n = sizes[si];
        for (uint32_t bits = 1; bits <= 8; ++bits) {
            for (uint32_t out_dtype = TV_F32; out_dtype <= TV_BF16; ++out_dtype) {
                const uint32_t words = (n * bits + 31) / 32 + 1, mwords = (n + 31) / 32 + 1;
                const uint32_t group = (bits % 2) ? n : (bits == 2 ? 33 : 128);
                const uint32_t groups = (n + group - 1) / group;
                uint32_t *codes = calloc(words, 4), *mask = calloc(mwords, 4);
                float *params = malloc(8 * groups), *base = malloc(4 * n), *raw = malloc(4 * n);
                uint32_t *out = malloc(4 * n);
                for (uint32_t i = 0; i + 1 < words; ++i) codes[i] = next();
                codes[words - 1] = 0;
                if (n * bits % 32) codes[words - 2] &= (1u << (n * bits % 32)) - 1u;
                for (uint32_t i = 0; i + 1 < mwords; ++i) mask[i] = next();
                for (uint32_t g = 0; g < 2 * groups; ++g) params[g] = uniform() * 0.01f;
                for (uint32_t i = 0; i < n; ++i) { base[i] = uniform(); raw[i] = uniform() * 0.001f; }
                uint32_t *index = NULL, *bytes = NULL, bwords = 0, *sindex = NULL, *swords = NULL;
                uint32_t *scodes = malloc(4 * n + 4);
                const uint32_t fill = next() & ((1u << bits) - 1u);
                if (bits == 1)
                    bwords = pack_groups(codes, mask, n, &index, &bytes);
                for (uint32_t i = 0; i < n; ++i)
                    scodes[i] = next() % 5 == 0 ? next() & ((1u << bits) - 1u) : fill;
                const uint32_t swcount = pack_sparse(scodes, n, bits, fill, &sindex, &swords);
                tv_term t[4];
                memset(t, 0, sizeof t);
                t[0].codes = (uint64_t)(uintptr_t)codes; t[0].params = (uint64_t)(uintptr_t)params;
                t[0].group = group; t[0].weight = 0.7f; t[0].kind = TV_KIND_CODES; t[0].bits = bits;
                t[0].mask = (bits == 1) ? (uint64_t)(uintptr_t)mask : 0;
                t[1].codes = (uint64_t)(uintptr_t)raw; t[1].group = 1; t[1].weight = -0.3f;
                t[1].kind = TV_KIND_RAW_F32;
                t[2].codes = (uint64_t)(uintptr_t)bytes; t[2].mask = (uint64_t)(uintptr_t)index;
                t[2].params = (uint64_t)(uintptr_t)params; t[2].group = group; t[2].weight = -1.3f;
                t[2].kind = TV_KIND_GROUPS; t[2].bits = 1; t[2].aux = bwords;
                t[3].codes = (uint64_t)(uintptr_t)swords; t[3].mask = (uint64_t)(uintptr_t)sindex;
                t[3].params = (uint64_t)(uintptr_t)params; t[3].group = group; t[3].weight = 0.45f;
                t[3].kind = TV_KIND_SPARSE; t[3].bits = bits; t[3].aux = swcount; t[3].fill = fill;
                if (bits != 1)
                    t[2] = t[3]; /* terms 0, 1 and the sparse one */
                tv_segment s;
                memset(&s, 0, sizeof s);
                s.base = (uint64_t)(uintptr_t)base; s.out = (uint64_t)(uintptr_t)out; s.n = n;
                s.base_coef = 1.0f; s.base_dtype = TV_F32; s.out_dtype = out_dtype; s.term_count = bits == 1 ? 4 : 3;
                const uint32_t gblocks = ((n + 3) / 4 + 255) / 256;
                extent ext[10] = {{(uint64_t)(uintptr_t)codes, 4ull * words}, {(uint64_t)(uintptr_t)mask, 4ull * mwords},
                                  {(uint64_t)(uintptr_t)params, 8ull * groups}, {(uint64_t)(uintptr_t)base, 4ull * n},
                                  {(uint64_t)(uintptr_t)raw, 4ull * n}, {(uint64_t)(uintptr_t)out, 4ull * n},
                                  {(uint64_t)(uintptr_t)swords, 4ull * swcount},
                                  {(uint64_t)(uintptr_t)sindex, 36ull * gblocks},
                                  {(uint64_t)(uintptr_t)bytes, 4ull * bwords}, {(uint64_t)(uintptr_t)index, 36ull * gblocks}};
                const uint32_t next_ = bits == 1 ? 10 : 8;
                uint32_t where = 0;
                memset(out, 0, 4 * n);
                ext[0].bytes -= 4; /* the codes one word short: refused, nothing written */
                if (tv_rebuild_cpu_checked(&s, 1, t, s.term_count, ext, next_, 1, &where) == 0 || out[0] != 0 || out[n - 1] != 0) {
                    fprintf(stderr, "tables past a buffer were not refused: n %u bits %u\n", n, bits);
                    return 2;
                }
                ext[0].bytes += 4;
                if (tv_rebuild_cpu_checked(&s, 1, t, s.term_count, ext, next_, 1, &where) != 0) {
                    fprintf(stderr, "exact tables were refused: n %u bits %u\n", n, bits);
                    return 3;
                }
                fwrite(out, out_dtype == TV_F32 ? 4 : 2, n, stdout);
                if (planned_case(&s, t, ext, next_, out) != 0)
                    return 4;
                free(codes); free(mask); free(params); free(base); free(raw); free(out); free(index); free(bytes);
                free(scodes); free(sindex); free(swords);
            }
        }
    }
    return 0;
}
