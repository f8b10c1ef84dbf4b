/*
 * The register-held rows of a planned segment, written once and included once per
 * instruction path (AVX2, AVX-512 at 256 bits, NEON), which names them and the few
 * operations that differ between instruction sets:
 *   TV_PLANNED(name)        the path's name for `name` (avx2_tile_planned, neon_...)
 *   TV_PLANNED_TARGET       its target attribute (empty for NEON)
 *   TV_PLANNED_PLAN         its plan type (TV_DEFINE_PLAN) and TV_PLANNED_PREPARE(bits,
 *                           weight, scale, offset) the constants a plan holds
 *   TV_PLANNED_VEC          a vector of floats, TV_PLANNED_VECS of them a row of 32;
 *                           TV_PLANNED_ZERO(), _ADD(a, b), _LOADU(p), _STOREU(p, v) and
 *                           _STREAM(p, v) (p 16-byte aligned: a store that skips the cache
 *                           where the CPU has one, why: store32_f32)
 *   TV_PLANNED_VALUE        (row, bits, consts, masked, mask word, k) -> the weighted
 *                           values of vector k of a row, exactly finish32's
 *   TV_PLANNED_GROUP_ROW    group_row_words or a faster equal; with TV_PLANNED_GROUP_VALUE
 *                           (row, consts, k) defined, a row as its eight group bytes (keep
 *                           bits low, codes high) and GROUP_VALUE the values of its vector k
 *   TV_PLANNED_SPARSE_VALUES (optional) a SPARSE row's vectors of values made in
 *                           registers, without storing the row for the value loads to read
 *                           back (codes, bits, flag byte, rank, fill4, consts, vectors) ->
 *                           the next rank, for the widths TV_PLANNED_SPARSE_VALUES_BITS(bits)
 *   TV_PLANNED_SPARSE_ROW   sparse_row_codes or a faster equal (the other widths' rows)
 * Each row's 32 sums stay in registers from the base through every term to the store,
 * where the per-term rows (TV_DEFINE_TILE) add each term to a row in memory (a load and a
 * store per vector and term, most of a table lookup's cost again).  The same values in
 * the same order as every other path: exact.
 */
#define TV_PLANNED_FN TV_PLANNED_TARGET static inline TV_ALWAYS_INLINE
#define TV_PLANNED_ROW_VECS (TV_PLANNED_VECS * TV_PLAN_ROWS)

/* Vector k of a compact row: a GROUPS row is 1-bit and masked by `keep` (its bytes under
 * TV_PLANNED_GROUP_VALUE). */
TV_PLANNED_FN TV_PLANNED_VEC TV_PLANNED(row_value)(const uint32_t *row, int groups, uint32_t bits,
                                                  const TV_PLANNED_PLAN *p, uint32_t keep, uint32_t k)
{
#ifdef TV_PLANNED_GROUP_VALUE
    if (groups)
        return TV_PLANNED_GROUP_VALUE(row, &p->c, k);
#endif
    return TV_PLANNED_VALUE(row, groups ? 1u : bits, &p->c, groups, keep, k);
}

/* The plans and runs of the tile from element `start` of a segment whose terms all have
 * one (scale, offset) for the tensor and are CODES, GROUPS or SPARSE terms (every layout's
 * common case: TVQ, RTVQ, T-Switch, and auto's mixes of streams and compact terms), each
 * term's constants made once per tile and a compact term's rank carried from row to row;
 * 0 for any other segment. */
TV_PLANNED_FN int TV_PLANNED(make_plans)(const tv_segment *s, const tv_term *terms, uint32_t start,
                                         TV_PLANNED_PLAN *plans, tv_plan_run *runs, uint32_t *nruns)
{
    const uint32_t n = (uint32_t)s->n, count = s->term_count;
    if (count > TV_PLAN_TERMS)
        return 0;
    *nruns = 0;
    for (uint32_t k = 0; k < count; ++k) {
        const tv_term *t = &terms[s->term_begin + k];
        const float *p = (const float *)t->params;
        TV_PLANNED_PLAN *plan = &plans[k];
        uint32_t op;
        if ((uint32_t)t->group < n)
            return 0;
        if (t->kind == TV_KIND_CODES)
            op = 2u * t->bits + (t->mask != 0);
        else if (t->kind == TV_KIND_GROUPS || t->kind == TV_KIND_SPARSE)
            op = t->kind == TV_KIND_GROUPS ? 18u : 18u + t->bits;
        else
            return 0;
        plan->c = TV_PLANNED_PREPARE(t->kind == TV_KIND_GROUPS ? 1u : t->bits, t->weight, p[0], p[1]);
        plan->t = t;
        plan->codes = (const uint32_t *)t->codes;
        plan->mask = (const uint32_t *)t->mask;
        if (t->kind == TV_KIND_SPARSE) {
            plan->fill4 = tv_sparse_fill4(t, t->bits);
            fill_row_words(plan->fill4, t->bits, plan->fill_row);
        }
        if (t->kind != TV_KIND_CODES) {
            const uint32_t none[8] = {0u}; /* a groups row with no group: no keep bit, no code */
            plan->rank = tv_group_rank(t, start >> 2);
            plan->empty = TV_PLANNED(row_value)(t->kind == TV_KIND_SPARSE ? plan->fill_row : none,
                                                t->kind == TV_KIND_GROUPS, t->bits, plan, 0u, 0u);
        }
        if (*nruns && runs[*nruns - 1].op == op)
            ++runs[*nruns - 1].count;
        else
            runs[(*nruns)++] = (tv_plan_run){k, 1u, op};
    }
    return 1;
}

/* Rows i .. i + rows - 1 of the CODES terms of a run (width `bits`, masked or not) added
 * to the rows' sums a[0 .. 4 rows - 1]. */
TV_PLANNED_FN void TV_PLANNED(codes_rows)(TV_PLANNED_VEC *a, const TV_PLANNED_PLAN *p, uint32_t count, uint32_t i, uint32_t rows,
                                          uint32_t bits, int masked)
{
    const uint32_t word = tv_code_word(i, bits), mask_word = tv_code_word(i, 1u);
    for (uint32_t t = 0; t < count; ++t, ++p) {
        __builtin_prefetch(p->codes + word + TV_PF_FLOATS / 32u * bits, 0, 3);
        if (masked)
            __builtin_prefetch(p->mask + mask_word + TV_PF_FLOATS / 32u, 0, 3);
        for (uint32_t r = 0; r < rows; ++r) {
            const uint32_t m = masked ? tv_mask_field(p->mask[mask_word + r], i + 32u * r) : 0u;
            for (uint32_t k = 0; k < TV_PLANNED_VECS; ++k)
                a[TV_PLANNED_VECS * r + k] = TV_PLANNED_ADD(
                    a[TV_PLANNED_VECS * r + k], TV_PLANNED_VALUE(p->codes + word + r * bits, bits, &p->c, masked, m, k));
        }
    }
}

/* The same for GROUPS terms (the 1-bit masked row group_row_words makes) and, with `bits`,
 * SPARSE terms (the b-bit row sparse_row_codes makes), each carrying its rank. */
TV_PLANNED_FN void TV_PLANNED(compact_rows)(TV_PLANNED_VEC *a, TV_PLANNED_PLAN *p, uint32_t count, uint32_t i, uint32_t rows,
                                            int groups, uint32_t bits)
{
    for (uint32_t t = 0; t < count; ++t, ++p) {
        for (uint32_t r = 0; r < rows; ++r) {
            uint32_t row[9] = {0u}, keep = 0u;
            const uint32_t g = (i + 32u * r) >> 2;
            /* no group stored (fine-tuning left these 32 weights on the zero point): every
             * lane's value is the fill's or the dropped one, the lookup's bits, so add it;
             * adding nothing would differ where a sum is -0.0 and the value +0.0 */
            const uint32_t flags = index_flags(p->mask, g);
            if (!flags) {
                for (uint32_t k = 0; k < TV_PLANNED_VECS; ++k)
                    a[TV_PLANNED_VECS * r + k] = TV_PLANNED_ADD(a[TV_PLANNED_VECS * r + k], p->empty);
                continue;
            }
#ifdef TV_PLANNED_SPARSE_VALUES
            if (!groups && TV_PLANNED_SPARSE_VALUES_BITS(bits)) {
                TV_PLANNED_VEC v[TV_PLANNED_VECS];
                p->rank = TV_PLANNED_SPARSE_VALUES((const uint8_t *)p->codes, bits, flags, p->rank, p->fill4, &p->c, v);
                for (uint32_t k = 0; k < TV_PLANNED_VECS; ++k)
                    a[TV_PLANNED_VECS * r + k] = TV_PLANNED_ADD(a[TV_PLANNED_VECS * r + k], v[k]);
                continue;
            }
#endif
            if (groups)
                p->rank = TV_PLANNED_GROUP_ROW(p->t, g, p->rank, &row[0], &keep);
            else
                p->rank = TV_PLANNED_SPARSE_ROW(p->t, g, p->rank, bits, p->fill4, p->fill_row, row);
            for (uint32_t k = 0; k < TV_PLANNED_VECS; ++k)
                a[TV_PLANNED_VECS * r + k] =
                    TV_PLANNED_ADD(a[TV_PLANNED_VECS * r + k], TV_PLANNED(row_value)(row, groups, bits, p, keep, k));
        }
    }
}

/* 3-bit SPARSE runs out of line: inlined, their rows changed the register allocation of
 * every other case in tile_planned, and the T-Switch groups mix ran 0.88x as fast (0.93x
 * out of line).  Since the groups rows read their bytes the two measure the same, within
 * 4 % for every scheme (docs/kernels.md). */
TV_PLANNED_TARGET static __attribute__((noinline)) void TV_PLANNED(sparse3_rows)(TV_PLANNED_VEC *a, TV_PLANNED_PLAN *p,
                                                                               uint32_t count, uint32_t i,
                                                                               uint32_t rows)
{
    TV_PLANNED(compact_rows)(a, p, count, i, rows, 0, 3u);
}

/* compact: whether any run is of GROUPS or SPARSE terms (a constant: a segment of CODES
 * terms alone, the streams layout's, runs a switch without their cases, 1.1-1.3x faster
 * than with them). */
TV_PLANNED_FN void TV_PLANNED(runs_rows)(TV_PLANNED_VEC *a, TV_PLANNED_PLAN *plans, const tv_plan_run *runs, uint32_t nruns,
                                         uint32_t i, uint32_t rows, int compact)
{
#define TV_CODES_CASES(B)                                                                     \
    case 2 * B: TV_PLANNED(codes_rows)(a, p, r->count, i, rows, B, 0); break;                 \
    case 2 * B + 1: TV_PLANNED(codes_rows)(a, p, r->count, i, rows, B, 1); break;
#define TV_SPARSE_CASE(B)                                                                     \
    case 18 + B: TV_PLANNED(compact_rows)(a, p, r->count, i, rows, 0, B); break;
    for (const tv_plan_run *r = runs; r < runs + nruns; ++r) {
        TV_PLANNED_PLAN *p = plans + r->begin;
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
        TV_SPARSE_CASE(1) TV_SPARSE_CASE(2) TV_SPARSE_CASE(4)
        case 18 + 3: TV_PLANNED(sparse3_rows)(a, p, r->count, i, rows); break;
        TV_SPARSE_CASE(5) TV_SPARSE_CASE(6) TV_SPARSE_CASE(7) TV_SPARSE_CASE(8)
        default: TV_PLANNED(compact_rows)(a, p, r->count, i, rows, 1, 1); break; /* 18: GROUPS */
        }
    }
#undef TV_CODES_CASES
#undef TV_SPARSE_CASE
}

/* `rows` rows of a planned segment from element i: base, every run, store. */
TV_PLANNED_FN void TV_PLANNED(planned_rows)(const tv_segment *s, TV_PLANNED_PLAN *plans, const tv_plan_run *runs,
                                            uint32_t nruns, uint32_t i, uint32_t rows, int compact)
{
    float row[32 * TV_PLAN_ROWS] __attribute__((aligned(32)));
    TV_PLANNED_VEC a[TV_PLANNED_ROW_VECS];
    const uint32_t v = TV_PLANNED_VECS * rows, lanes = 32u / TV_PLANNED_VECS;
    if (s->base_coef == 0.0f) {
        for (uint32_t k = 0; k < v; ++k)
            a[k] = TV_PLANNED_ZERO();
    } else if (s->base_dtype == TV_F32 && s->base_coef == 1.0f) {
        const float *b = (const float *)s->base + i;
        for (uint32_t k = 0; k < 2u * rows; ++k) /* a 64-byte line a prefetch */
            __builtin_prefetch(b + TV_PF_FLOATS + 16u * k, 0, 3);
        for (uint32_t k = 0; k < v; ++k)
            a[k] = TV_PLANNED_LOADU(b + lanes * k);
    } else {
        for (uint32_t j = 0; j < 32u * rows; ++j)
            row[j] = tv_base_term(s, i + j);
        for (uint32_t k = 0; k < v; ++k)
            a[k] = TV_PLANNED_LOADU(row + lanes * k);
    }
    TV_PLANNED(runs_rows)(a, plans, runs, nruns, i, rows, compact);
    float *out = (float *)s->out + i;
    if (s->out_dtype != TV_F32) {
        for (uint32_t k = 0; k < v; ++k)
            TV_PLANNED_STOREU(row + lanes * k, a[k]);
        for (uint32_t j = 0; j < 32u * rows; ++j)
            tv_store(s->out, s->out_dtype, i + j, row[j]);
    } else if (((uintptr_t)out & 15u) == 0) { /* why streaming: store32_f32 */
        for (uint32_t k = 0; k < v; ++k)
            TV_PLANNED_STREAM(out + lanes * k, a[k]);
    } else {
        for (uint32_t k = 0; k < v; ++k)
            TV_PLANNED_STOREU(out + lanes * k, a[k]);
    }
}

/* Elements [start, start + len) of a segment make_plans takes; 0, having done nothing,
 * for one it does not. */
TV_PLANNED_TARGET static int TV_PLANNED(tile_planned)(const tv_segment *s, const tv_term *terms, uint32_t start,
                                                      uint32_t len)
{
    TV_PLANNED_PLAN plans[TV_PLAN_TERMS];
    tv_plan_run runs[TV_PLAN_TERMS];
    uint32_t nruns, i = start;
    const uint32_t end = start + len;
    if (!TV_PLANNED(make_plans)(s, terms, start, plans, runs, &nruns))
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

/* The path's name, target and value functions; the rest a second path of the same
 * instruction set keeps (AVX-512 at 256 bits, AVX2's). */
#undef TV_PLANNED_FN
#undef TV_PLANNED_ROW_VECS
#undef TV_PLANNED
#undef TV_PLANNED_TARGET
#undef TV_PLANNED_VALUE
#undef TV_PLANNED_GROUP_VALUE
