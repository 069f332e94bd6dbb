/* Exact (non-causal, unmasked) attention for bf16 tensors on x86 CPUs with AVX512-BF16.

   out = softmax(q k^T * scale) v, computed block by block with an online softmax (flash attention):
   scores accumulate in fp32 (vdpbf16ps: bf16 pairs multiplied exactly, summed in fp32), the softmax runs
   in fp32, the probabilities are rounded to bf16 for the second product (as torch's CPU flash kernel
   does), and the output accumulates in fp32 and is rounded to bf16 once at the end.

   Shapes: q, k, v (B, H, L, D) and out (B, H, Lq, D), with any strides whose last dimension is contiguous.
   Keys and values are first packed, zero-padded to a multiple of KB keys, into the caller's buffers:
     kp: (B*H, Lk_pad / KB, D / 2, KB, 2)  key pairs along D, so one vector holds 16 keys' pairs;
     vp: (B*H, Lk_pad / 2, D, 2)           value pairs along the keys, so one vector holds 16 columns' pairs.
   Then work is split over (batch*head, block of QB queries) items taken from a shared counter. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QB 96  /* queries per work item (16 tiles of 6 rows) */
#define KB 64  /* keys per block: 4 vectors of 16 */
#define R 6    /* rows per register tile: 6 x 4 accumulators */
#define DMAX 256

typedef struct {
    const uint16_t *q, *kp, *vp;
    uint16_t *out;
    long q_sb, q_sh, q_sl, o_sb, o_sh, o_sl;
    long heads, lq, lk, d, n_items, n_qblocks;
    float scale_log2;
    long next, done; /* shared work counter, items finished */
} job_t;

typedef struct {
    const uint16_t *k, *v;
    uint16_t *kp, *vp;
    long k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;
} kv_t;

#define INLINE static inline __attribute__((always_inline))

typedef int32_t __attribute__((may_alias, aligned(2))) i32_alias; /* a bf16 pair */

INLINE __m512bh pair(const uint16_t *p) { return (__m512bh)_mm512_set1_epi32(*(const i32_alias *)p); }

INLINE __m512bh load_bh(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512((const void *)p); }

/* 2^x for x <= 0 (x may be -inf): 2^round(x) * p(f), p a degree-6 Taylor series of e^(f ln 2), |f| <= 1/2
   (relative error < 2e-7). A NaN stays NaN (max returns its second operand when one is NaN), so a NaN score
   makes its row's output NaN instead of a finite value. */
INLINE __m512 exp2_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.69314718056f));
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* s[r][KB] = q[r][D] . k-block^T for r <= R rows (r is a constant after inlining). */
INLINE void qk_tile(const uint16_t *q, long q_sl, const uint16_t *kp, long d2, float *s, int r) {
    __m512 acc[R][4];
    for (int i = 0; i < r; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = _mm512_setzero_ps();
    for (long p = 0; p < d2; p++) {
        const uint16_t *kr = kp + p * KB * 2;
        __m512bh k0 = load_bh(kr), k1 = load_bh(kr + 32), k2 = load_bh(kr + 64), k3 = load_bh(kr + 96);
        for (int i = 0; i < r; i++) {
            __m512bh qi = pair(q + i * q_sl + 2 * p);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], qi, k0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], qi, k1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], qi, k2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], qi, k3);
        }
    }
    for (int i = 0; i < r; i++)
        for (int c = 0; c < 4; c++) _mm512_store_ps(s + i * KB + c * 16, acc[i][c]);
}

/* o[r][cols c0..c0+64) = o * alpha + p[r][KB] . v-block[KB][cols] for r <= R rows. */
INLINE void pv_tile(const uint16_t *p, const uint16_t *vp, long d, long c0, float *o, const float *alpha, int r) {
    __m512 acc[R][4];
    for (int i = 0; i < r; i++) {
        __m512 a = _mm512_set1_ps(alpha[i]);
        for (int c = 0; c < 4; c++) acc[i][c] = _mm512_mul_ps(_mm512_load_ps(o + i * d + c0 + c * 16), a);
    }
    for (long j = 0; j < KB / 2; j++) {
        const uint16_t *vr = vp + (j * d + c0) * 2;
        __m512bh v0 = load_bh(vr), v1 = load_bh(vr + 32), v2 = load_bh(vr + 64), v3 = load_bh(vr + 96);
        for (int i = 0; i < r; i++) {
            __m512bh pi = pair(p + i * KB + 2 * j);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], pi, v0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], pi, v1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], pi, v2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], pi, v3);
        }
    }
    for (int i = 0; i < r; i++)
        for (int c = 0; c < 4; c++) _mm512_store_ps(o + i * d + c0 + c * 16, acc[i][c]);
}

/* The row count of the last tile of a block is a runtime value; dispatch it to constant-r copies. */
#define BY_ROWS(call_r, r)                                                                               \
    switch (r) {                                                                                       \
    case 6: call_r(6); break;                                                                          \
    case 5: call_r(5); break;                                                                          \
    case 4: call_r(4); break;                                                                          \
    case 3: call_r(3); break;                                                                          \
    case 2: call_r(2); break;                                                                          \
    default: call_r(1); break;                                                                         \
    }

/* Online softmax over one block of scores: scales them, updates the rows' running max m and sum l, writes
   the bf16 probabilities and the factors alpha that rescale the rows' earlier output. */
static void softmax_block(float *s, uint16_t *p, float *m, float *l, float *alpha, long rows, long valid,
                          float scale_log2) {
    const __m512 scale = _mm512_set1_ps(scale_log2), neg_inf = _mm512_set1_ps(-INFINITY);
    float m_new[QB] __attribute__((aligned(64))), block_sum[QB] __attribute__((aligned(64)));
    for (long i = 0; i < rows; i++) {
        __m512 x[4];
        __m512 mx = neg_inf;
        for (int c = 0; c < 4; c++) {
            long left = valid - c * 16;
            __mmask16 keep = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            x[c] = _mm512_mask_mul_ps(neg_inf, keep, _mm512_load_ps(s + i * KB + c * 16), scale);
            mx = _mm512_max_ps(mx, x[c]);
        }
        m_new[i] = fmaxf(m[i], _mm512_reduce_max_ps(mx));
        __m512 mv = _mm512_set1_ps(m_new[i]), sum = _mm512_setzero_ps();
        for (int c = 0; c < 4; c++) {
            x[c] = exp2_ps(_mm512_sub_ps(x[c], mv));
            sum = _mm512_add_ps(sum, x[c]);
        }
        _mm512_storeu_si512((void *)(p + i * KB), (__m512i)_mm512_cvtne2ps_pbh(x[1], x[0]));
        _mm512_storeu_si512((void *)(p + i * KB + 32), (__m512i)_mm512_cvtne2ps_pbh(x[3], x[2]));
        block_sum[i] = _mm512_reduce_add_ps(sum);
    }
    /* 16 rows at a time; a row's first block has m = -inf, and exp2_ps(-inf) = 0 */
    for (long i = 0; i < rows; i += 16) {
        __mmask16 keep = rows - i >= 16 ? 0xFFFF : (__mmask16)((1u << (rows - i)) - 1);
        __m512 mo = _mm512_maskz_loadu_ps(keep, m + i), mn = _mm512_maskz_loadu_ps(keep, m_new + i);
        __m512 a = exp2_ps(_mm512_sub_ps(mo, mn));
        __m512 ln = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(keep, l + i), a, _mm512_maskz_loadu_ps(keep, block_sum + i));
        _mm512_mask_storeu_ps(alpha + i, keep, a);
        _mm512_mask_storeu_ps(l + i, keep, ln);
        _mm512_mask_storeu_ps(m + i, keep, mn);
    }
}

typedef struct {
    float s[QB * KB], o[QB * DMAX], m[QB], l[QB], alpha[QB];
    uint16_t p[QB * KB];
} scratch_t;

static void run_item(const job_t *job, long item, scratch_t *scratch) {
    float *s = scratch->s, *o = scratch->o, *m = scratch->m, *l = scratch->l, *alpha = scratch->alpha;
    uint16_t *p = scratch->p;
    const long d = job->d, d2 = d / 2, bh = item / job->n_qblocks, b = bh / job->heads, h = bh % job->heads;
    const long q0 = (item % job->n_qblocks) * QB;
    const long rows = job->lq - q0 < QB ? job->lq - q0 : QB;
    const long n_kblocks = (job->lk + KB - 1) / KB;
    const uint16_t *q = job->q + b * job->q_sb + h * job->q_sh + q0 * job->q_sl;
    const uint16_t *kp = job->kp + bh * n_kblocks * KB * d, *vp = job->vp + bh * n_kblocks * KB * d;
    for (long i = 0; i < rows; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
        for (long c = 0; c < d; c++) o[i * d + c] = 0.0f;
    }
    for (long kb = 0; kb < n_kblocks; kb++) {
        const uint16_t *kblock = kp + kb * KB * d, *vblock = vp + kb * KB * d;
        for (long i = 0; i < rows; i += R) {
            long r = rows - i < R ? rows - i : R;
#define QK(n) qk_tile(q + i * job->q_sl, job->q_sl, kblock, d2, s + i * KB, n)
            BY_ROWS(QK, r)
#undef QK
        }
        long valid = job->lk - kb * KB < KB ? job->lk - kb * KB : KB;
        softmax_block(s, p, m, l, alpha, rows, valid, job->scale_log2);
        for (long c0 = 0; c0 < d; c0 += 64)
            for (long i = 0; i < rows; i += R) {
                long r = rows - i < R ? rows - i : R;
#define PV(n) pv_tile(p + i * KB, vblock, d, c0, o + i * d, alpha + i, n)
                BY_ROWS(PV, r)
#undef PV
            }
    }
    uint16_t *out = job->out + b * job->o_sb + h * job->o_sh + q0 * job->o_sl;
    for (long i = 0; i < rows; i++) {
        __m512 inv = _mm512_set1_ps(1.0f / l[i]);
        for (long c = 0; c < d; c += 16) {
            __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(o + i * d + c), inv));
            _mm256_storeu_si256((__m256i *)(out + i * job->o_sl + c), (__m256i)y);
        }
    }
}

/* Keys as (B*H, Lk_pad / KB, D / 2, KB, 2) and values as (B*H, Lk_pad / 2, D, 2), zero past Lk. */
static void pack_block(const job_t *job, const kv_t *kv, long item) {
    const long d = job->d, d2 = d / 2, n_kblocks = (job->lk + KB - 1) / KB;
    const long bh = item / n_kblocks, kb = item % n_kblocks, b = bh / job->heads, h = bh % job->heads;
    const i32_alias *k = (const i32_alias *)(kv->k + b * kv->k_sb + h * kv->k_sh);
    const uint16_t *v = kv->v + b * kv->v_sb + h * kv->v_sh;
    i32_alias *kp = (i32_alias *)(kv->kp + (bh * n_kblocks + kb) * KB * d);
    uint16_t *vp = kv->vp + (bh * n_kblocks + kb) * KB * d;
    for (long jj = 0; jj < KB; jj++) {
        long j = kb * KB + jj;
        const i32_alias *krow = j < job->lk ? k + j * kv->k_sl / 2 : NULL;
        const uint16_t *vrow = j < job->lk ? v + j * kv->v_sl : NULL;
        for (long p = 0; p < d2; p++) kp[p * KB + jj] = krow ? krow[p] : 0;
        for (long c = 0; c < d; c++) vp[(jj / 2 * d + c) * 2 + jj % 2] = vrow ? vrow[c] : 0;
    }
}

/* One OpenMP team (torch's own pool when torch's libgomp is loaded, so no second set of threads competes
   for the cores): every thread packs key blocks, then takes query blocks from a shared counter. Scratch
   lives on the heap (132 KB is a lot for a caller thread's stack). */
static void run(job_t *job, const kv_t *kv, long n_threads) {
    const long n_pack = job->n_items / job->n_qblocks * ((job->lk + KB - 1) / KB);
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (long item = 0; item < n_pack; item++) pack_block(job, kv, item);
        scratch_t *scratch = aligned_alloc(64, sizeof(scratch_t));
        for (;;) {
            if (scratch == NULL) break;
            long item = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
            if (item >= job->n_items) break;
            run_item(job, item, scratch);
            __atomic_fetch_add(&job->done, 1, __ATOMIC_RELAXED);
        }
        free(scratch);
    }
}

/* dims: batch, heads, Lq, Lk, D. strides (in elements) of the batch, head and token dimensions of q, k, v
   and out, in that order; every last dimension is contiguous. kp and vp: the caller's buffers for the packed
   keys and values, B*H*ceil(Lk/KB)*KB*D elements each. Returns 0 on success, 1 for an unsupported head size
   or empty keys, 2 when memory for the scratch ran out (some query blocks were not computed). */
int attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, uint16_t *kp,
                   uint16_t *vp, const long *dims, const long *strides, float scale, long n_threads) {
    const long batch = dims[0], heads = dims[1], lq = dims[2], lk = dims[3], d = dims[4];
    if (d % 64 != 0 || d > DMAX || lk < 1 || strides[5] % 2 != 0) return 1;
    job_t job = {q, kp, vp, out, strides[0], strides[1], strides[2], strides[9], strides[10], strides[11],
                 heads, lq, lk, d, 0, (lq + QB - 1) / QB, scale * 1.4426950408889634f, 0, 0};
    kv_t kv = {k, v, kp, vp, strides[3], strides[4], strides[5], strides[6], strides[7], strides[8]};
    job.n_items = batch * heads * job.n_qblocks;
    run(&job, &kv, n_threads < 1 ? 1 : n_threads);
    return job.done == job.n_items ? 0 : 2;
}
