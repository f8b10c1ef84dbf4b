/*
 * The register-held rows of a planned segment (cpu_rebuild.c: avx2_make_plans), written
 * once and included once per instruction path, which names them and their value function:
 *   TV_PLANNED(name)   the path's name for `name` (avx2_tile, avx512_tile, ...)
 *   TV_PLANNED_TARGET  its target attribute
 *   TV_PLANNED_VALUE8  (row, bits, consts, masked, mask word, k) -> weighted values of
 *                      codes 8k .. 8k+7 of a row, exactly finish32's.
 * Each row's 32 sums stay in four registers from the base through every term to the
 * store, where rebuild_tile_avx2 adds each term to a row in memory (a load and a store per
 * eight lanes and term, most of a table lookup's cost again).  The same values in the same
 * order as every other path: exact.
 */
#define TV_PLANNED_FN TV_PLANNED_TARGET static inline TV_ALWAYS_INLINE

/* Rows i .. i + rows - 1 of the CODES terms of a run (width `bits`, masked or not) added
 * to the rows' sums a[0 .. 4 rows - 1]. */
TV_PLANNED_FN void TV_PLANNED(codes_rows)(__m256 *a, const avx2_plan *p, uint32_t count, uint32_t i, uint32_t rows,
                                          uint32_t bits, int masked)
{
    const uint32_t word = tv_code_word(i, bits), mask_word = tv_code_word(i, 1u);
    for (uint32_t t = 0; t < count; ++t, ++p) {
        _mm_prefetch((const char *)(p->codes + word + TV_PF_FLOATS / 32u * bits), _MM_HINT_T0);
        if (masked)
            _mm_prefetch((const char *)(p->mask + mask_word + TV_PF_FLOATS / 32u), _MM_HINT_T0);
        for (uint32_t r = 0; r < rows; ++r) {
            const uint32_t m = masked ? tv_mask_field(p->mask[mask_word + r], i + 32u * r) : 0u;
            for (uint32_t k = 0; k < 4u; ++k)
                a[4u * r + k] = _mm256_add_ps(a[4u * r + k],
                                              TV_PLANNED_VALUE8(p->codes + word + r * bits, bits, &p->c, masked, m, k));
        }
    }
}

/* The same for GROUPS terms (the 1-bit masked row avx2_group_row_words makes) and, with
 * `bits`, SPARSE terms (the b-bit row avx2_sparse_row_codes makes), each carrying its rank. */
TV_PLANNED_FN void TV_PLANNED(compact_rows)(__m256 *a, avx2_plan *p, uint32_t count, uint32_t i, uint32_t rows,
                                            int groups, uint32_t bits)
{
    for (uint32_t t = 0; t < count; ++t, ++p) {
        for (uint32_t r = 0; r < rows; ++r) {
            uint32_t row[9] = {0u}, keep = 0u;
            const uint32_t g = (i + 32u * r) >> 2;
            if (groups)
                p->rank = avx2_group_row_words(p->t, g, p->rank, &row[0], &keep);
            else
                p->rank = avx2_sparse_row_codes(p->t, g, p->rank, bits, p->fill4, p->fill_row, row);
            for (uint32_t k = 0; k < 4u; ++k)
                a[4u * r + k] = _mm256_add_ps(a[4u * r + k],
                                              TV_PLANNED_VALUE8(row, groups ? 1u : bits, &p->c, groups, keep, k));
        }
    }
}

/* compact: whether any run is of GROUPS or SPARSE terms (a constant: a segment of CODES
 * terms alone, the streams layout's, runs a switch without their cases, 1.1-1.3x faster
 * than with them). */
TV_PLANNED_FN void TV_PLANNED(runs_rows)(__m256 *a, avx2_plan *plans, const avx2_run *runs, uint32_t nruns,
                                         uint32_t i, uint32_t rows, int compact)
{
#define TV_CODES_CASES(B)                                                                     \
    case 2 * B: TV_PLANNED(codes_rows)(a, p, r->count, i, rows, B, 0); break;                 \
    case 2 * B + 1: TV_PLANNED(codes_rows)(a, p, r->count, i, rows, B, 1); break;
#define TV_SPARSE_CASE(B)                                                                     \
    case 18 + B: TV_PLANNED(compact_rows)(a, p, r->count, i, rows, 0, B); break;
    for (const avx2_run *r = runs; r < runs + nruns; ++r) {
        avx2_plan *p = plans + r->begin;
        if (!compact) {
            switch (r->op) {
            TV_CODES_CASES(1) TV_CODES_CASES(2) TV_CODES_CASES(3) TV_CODES_CASES(4)
            TV_CODES_CASES(5) TV_CODES_CASES(6) TV_CODES_CASES(7) TV_CODES_CASES(8)
            }
            continue;
        }
        switch (r->op) {
        TV_CODES_CASES(1) TV_CODES_CASES(2) TV_CODES_CASES(3) TV_CODES_CASES(4)
        TV_CODES_CASES(5) TV_CODES_CASES(6) TV_CODES_CASES(7) TV_CODES_CASES(8)
        TV_SPARSE_CASE(1) TV_SPARSE_CASE(2) TV_SPARSE_CASE(3) TV_SPARSE_CASE(4)
        TV_SPARSE_CASE(5) TV_SPARSE_CASE(6) TV_SPARSE_CASE(7) TV_SPARSE_CASE(8)
        default: TV_PLANNED(compact_rows)(a, p, r->count, i, rows, 1, 1); break; /* 18: GROUPS */
        }
    }
#undef TV_CODES_CASES
#undef TV_SPARSE_CASE
}

/* `rows` rows of a planned segment from element i: base, every run, store. */
TV_PLANNED_FN void TV_PLANNED(planned_rows)(const tv_segment *s, avx2_plan *plans, const avx2_run *runs,
                                            uint32_t nruns, uint32_t i, uint32_t rows, int compact)
{
    float row[32 * TV_PLAN_ROWS] __attribute__((aligned(32)));
    __m256 a[4 * TV_PLAN_ROWS];
    const uint32_t v = 4u * rows; /* vectors of eight */
    if (s->base_coef == 0.0f) {
        for (uint32_t k = 0; k < v; ++k)
            a[k] = _mm256_setzero_ps();
    } else if (s->base_dtype == TV_F32 && s->base_coef == 1.0f) {
        const float *b = (const float *)s->base + i;
        for (uint32_t k = 0; k < 2u * rows; ++k)
            _mm_prefetch((const char *)(b + TV_PF_FLOATS + 16u * k), _MM_HINT_T0);
        for (uint32_t k = 0; k < v; ++k)
            a[k] = _mm256_loadu_ps(b + 8u * k);
    } else {
        for (uint32_t j = 0; j < 8u * v; ++j)
            row[j] = tv_base_term(s, i + j);
        for (uint32_t k = 0; k < v; ++k)
            a[k] = _mm256_load_ps(row + 8u * k);
    }
    TV_PLANNED(runs_rows)(a, plans, runs, nruns, i, rows, compact);
    float *out = (float *)s->out + i;
    if (s->out_dtype != TV_F32) {
        for (uint32_t k = 0; k < v; ++k)
            _mm256_store_ps(row + 8u * k, a[k]);
        for (uint32_t j = 0; j < 8u * v; ++j)
            tv_store(s->out, s->out_dtype, i + j, row[j]);
    } else if (((uintptr_t)out & 15u) == 0) { /* why streaming: store32_f32 */
        for (uint32_t k = 0; k < v; ++k) {
            _mm_stream_ps(out + 8u * k, _mm256_castps256_ps128(a[k]));
            _mm_stream_ps(out + 8u * k + 4u, _mm256_extractf128_ps(a[k], 1));
        }
    } else {
        for (uint32_t k = 0; k < v; ++k)
            _mm256_storeu_ps(out + 8u * k, a[k]);
    }
}

/* Elements [start, start + len) of a segment avx2_make_plans takes; 0, having done
 * nothing, for one it does not. */
TV_PLANNED_TARGET static int TV_PLANNED(tile_planned)(const tv_segment *s, const tv_term *terms, uint32_t start,
                                                      uint32_t len)
{
    avx2_plan plans[TV_PLAN_TERMS];
    avx2_run runs[TV_PLAN_TERMS];
    uint32_t nruns, i = start;
    const uint32_t end = start + len;
    if (!avx2_make_plans(s, terms, start, plans, runs, &nruns))
        return 0;
    int compact = 0;
    for (uint32_t k = 0; k < nruns; ++k)
        compact |= runs[k].op >= 18u;
    if (compact) {
        for (; i + 32u * TV_PLAN_ROWS <= end; i += 32u * TV_PLAN_ROWS)
            TV_PLANNED(planned_rows)(s, plans, runs, nruns, i, TV_PLAN_ROWS, 1);
    } else {
        for (; i + 32u * TV_PLAN_ROWS <= end; i += 32u * TV_PLAN_ROWS)
            TV_PLANNED(planned_rows)(s, plans, runs, nruns, i, TV_PLAN_ROWS, 0);
    }
    for (; i + 32u <= end; i += 32u)
        TV_PLANNED(planned_rows)(s, plans, runs, nruns, i, 1u, compact);
    for (; i < end; ++i)
        tv_store(s->out, s->out_dtype, i, tv_rebuild_element(s, terms, i));
    return 1;
}

#undef TV_PLANNED_FN
#undef TV_PLANNED
#undef TV_PLANNED_TARGET
#undef TV_PLANNED_VALUE8
