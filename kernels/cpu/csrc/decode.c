/* The whole decode step of a Phi-3 in one native call (kernels/cpu/decode.py states the math): embedding → layers
   → lm_head for 1-16 rows, one OpenMP parallel region. The GEMVs split weight rows over the threads (gemv.h, or nf4.h
   for an NF4 model), attention splits (row, head) pairs (decode_attention.h), and the small vector ops between them
   split the batch's rows. Two tiers (simd.h's width-neutral vfloat): AVX-512 F/BW/VL, where bf16 models use the
   bf16 dot product if the CPU has AVX512-BF16, and AVX2 + FMA (8 lanes, bf16 widened to fp32). Rows with a LoRA
   adapter get its delta after each projection (decode_lora.h). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "decode.h"
#include "decode_attention.h"
#include "decode_lora.h"
#include "gemv.h"
#include "nf4.h"

/* The layout check (decode.h): each field's byte offset by name, -1 for a name the struct lacks. */
#define OFFSET_OF(T, f) if (!strcmp(name, #f)) return (int64_t)offsetof(T, f);
#define MODEL_OFFSET(f) OFFSET_OF(Model, f)
#define NF4DESC_OFFSET(f) OFFSET_OF(NF4Desc, f)
#define LORA_OFFSET(f) OFFSET_OF(LoRA, f)
#define COUNT(f) + 1
int64_t decode_model_size(void) { return (int64_t)sizeof(Model); }
int64_t decode_model_fields(void) { return 0 MODEL_FIELDS(COUNT); }
int64_t decode_model_offset(const char *name) { MODEL_FIELDS(MODEL_OFFSET) return -1; }
int64_t decode_nf4desc_size(void) { return (int64_t)sizeof(NF4Desc); }
int64_t decode_nf4desc_fields(void) { return 0 NF4DESC_FIELDS(COUNT); }
int64_t decode_nf4desc_offset(const char *name) { NF4DESC_FIELDS(NF4DESC_OFFSET) return -1; }
int64_t decode_lora_size(void) { return (int64_t)sizeof(LoRA); }
int64_t decode_lora_fields(void) { return 0 LORA_FIELDS(COUNT); }
int64_t decode_lora_offset(const char *name) { LORA_FIELDS(LORA_OFFSET) return -1; }

/* Make row b of x (B rows of K values, already representable in the model dtype) the next GEMV's input: bf16
   GEMVs read m->xb. */
static void prep(const Model *m, const float *x, int K, int b) {
    if (m->bf) for (int64_t k = (int64_t)b * K; k < (int64_t)(b + 1) * K; k++) m->xb[k] = f2bf(x[k]);
}

#define STORE_R(i, v) (y[i] = R(m, (v)))
#ifdef __AVX512BF16__
static void gemv_bf16(const Model *m, const uint16_t *W, const uint16_t *x, float *y, int N, int K) {
    GEMV_BODY(uint16_t, 32, _mm512_loadu_si512, _mm512_maskz_loadu_epi16, DPBF16, MASK32, STORE_R)
}
static void gemm_bf16(const Model *m, const uint16_t *W, const uint16_t *x, float *y, int N, int K) {
    const int B = m->B;
    GEMM_BODY(uint16_t, 32, _mm512_loadu_si512, _mm512_maskz_loadu_epi16, DPBF16, MASK32, STORE_R)
}
static void gemv1_bf16(const Model *m, const uint16_t *W, const uint16_t *x, float *y, int N, int K) {
    GEMV1_BODY(uint16_t, 32, _mm512_loadu_si512, _mm512_maskz_loadu_epi16, DPBF16, MASK32, STORE_R)
}
#else
static void gemv_bf16(const Model *m, const uint16_t *W, const uint16_t *x, float *y, int N, int K) {
    GEMV_BODY(uint16_t, VW, BF16W_LOAD, BF16W_MLOAD, FMA32, MASKW, STORE_R)
}
static void gemm_bf16(const Model *m, const uint16_t *W, const uint16_t *x, float *y, int N, int K) {
    const int B = m->B;
    GEMM_BODY(uint16_t, VW, BF16W_LOAD, BF16W_MLOAD, FMA32, MASKW, STORE_R)
}
static void gemv1_bf16(const Model *m, const uint16_t *W, const uint16_t *x, float *y, int N, int K) {
    GEMV1_BODY(uint16_t, VW, BF16W_LOAD, BF16W_MLOAD, FMA32, MASKW, STORE_R)
}
#endif
static void gemv_f32(const Model *m, const float *W, const float *x, float *y, int N, int K) {
    GEMV_BODY(float, VW, F32_LOAD, F32_MLOAD, FMA32, MASKW, STORE_R)
}
static void gemm_f32(const Model *m, const float *W, const float *x, float *y, int N, int K) {
    const int B = m->B;
    GEMM_BODY(float, VW, F32_LOAD, F32_MLOAD, FMA32, MASKW, STORE_R)
}
static void gemv1_f32(const Model *m, const float *W, const float *x, float *y, int N, int K) {
    GEMV1_BODY(float, VW, F32_LOAD, F32_MLOAD, FMA32, MASKW, STORE_R)
}

/* y (B, N) = R(x (B, K) · Wᵀ); bf16 GEMVs read x from m->xb (see prep). Batch-invariant (m->invariant), one row
   goes through GEMV1, the GEMM's sums: the GEMV's two FMA chains per output sum in another order than the GEMM's
   one, so a row alone would round differently from the same row in a batch. The GEMM's micro-kernels (and DOT1)
   all run one chain per output over k in the same order, whatever B, so a row's sums are the same for every B. */
static void gemv(const Model *m, const void *W, const float *x, float *y, int N, int K) {
    if (m->B == 1 && m->invariant) {
        if (m->bf) { gemv1_bf16(m, (const uint16_t *)W, m->xb, y, N, K); return; }
        gemv1_f32(m, (const float *)W, x, y, N, K);
    } else if (m->B == 1) {
        if (m->bf) { gemv_bf16(m, (const uint16_t *)W, m->xb, y, N, K); return; }
        gemv_f32(m, (const float *)W, x, y, N, K);
    } else {
        if (m->bf) { gemm_bf16(m, (const uint16_t *)W, m->xb, y, N, K); return; }
        gemm_f32(m, (const float *)W, x, y, N, K);
    }
}

/* A decoder projection: the dense GEMV, or for an NF4 model kernels/cpu/nf4.py's NF4 kernels (the ones the torch
   step runs, so the same sums): from NF4_TILE_MIN_M_* rows the tile GEMM (on m->xb for bf16), each thread in its
   own tile of m->tile, else the fused dequantize-GEMV (up to NF4_GEMV_MAX_M rows); batch-invariant, the tile GEMM
   for every row count (the fused GEMV sums fp32 x in four chains, the tile GEMM x in the model dtype in one).
   NF4_TILE output rows a task, then y rounded to the model dtype as the torch step's `.to(dtype)` does. */
static void proj(const Model *m, const void *W, const float *x, float *y, int N, int K) {
    if (!m->nf4) { gemv(m, W, x, y, N, K); return; }
    const NF4Desc *d = (const NF4Desc *)W;
    const int B = m->B, K2 = K / 2,
              tile = m->invariant || B >= (m->bf ? NF4_TILE_MIN_M_BF16 : NF4_TILE_MIN_M_F32);
    if (!tile) {
        #pragma omp single
        for (int b = 0; b < B; b++)
            for (int k = 0; k < K2; k++) {
                m->xe[(int64_t)b * K2 + k] = x[(int64_t)b * K + 2 * k];
                m->xo[(int64_t)b * K2 + k] = x[(int64_t)b * K + 2 * k + 1];
            }
    }
    float *own = tile ? m->tile + (int64_t)omp_get_thread_num() * NF4_TILE * kmax(m) : NULL;
    #pragma omp for schedule(static)
    for (int n0 = 0; n0 < N; n0 += NF4_TILE) {
        const int n1 = n0 + NF4_TILE < N ? n0 + NF4_TILE : N;
        if (tile)
            nf4_gemm_tile(m->bf ? (const void *)m->xb : (const void *)x, m->bf, B, d->packed, d->absmax, d->code,
                          d->ncode, d->nabs, d->offset, d->dq, d->bs, d->nbs, N, K, n0, n1, own, y);
        else
            nf4_gemv(m->xe, m->xo, B, d->packed, d->absmax, d->code, d->ncode, d->nabs, d->offset, d->dq, d->bs,
                     d->nbs, N, K, n0, n1, y);
        for (int b = 0; b < B; b++)
            for (int n = n0; n < n1; n++) y[(int64_t)b * N + n] = R(m, y[(int64_t)b * N + n]);
    }
}

/* row b: xn = R(w · R(x · rsqrt(mean(x²) + eps))); then xn becomes the GEMV input */
static void rmsnorm(const Model *m, const void *w, const float *x, float *xn, int b) {
    const float *xr = x + (int64_t)b * m->C;
    float *yr = xn + (int64_t)b * m->C, ss = 0.f;
    for (int c = 0; c < m->C; c++) ss += xr[c] * xr[c];
    float r = 1.f / sqrtf(ss / m->C + m->eps);
    for (int c = 0; c < m->C; c++) yr[c] = R(m, ld(m, w, c) * R(m, xr[c] * r));
    prep(m, xn, m->C, b);
}

/* row b: x += proj (the residual), then xn = rmsnorm(x) with weight w */
static void residual_norm(const Model *m, const void *w, int b) {
    for (int64_t i = (int64_t)b * m->C; i < (int64_t)(b + 1) * m->C; i++) m->x[i] = R(m, m->x[i] + m->proj[i]);
    rmsnorm(m, w, m->x, m->xn, b);
}

static void rope(const Model *m, float *h, const void *cos, const void *sin) {  /* one head, in place */
    int half = m->rd / 2;
    float rot[m->rd];
    for (int d = 0; d < half; d++) { rot[d] = -h[d + half]; rot[d + half] = h[d]; }
    for (int d = 0; d < m->rd; d++) h[d] = R(m, R(m, h[d] * ld(m, cos, d)) + R(m, rot[d] * ld(m, sin, d)));
}

/* logits (B, V) in the model dtype for tokens (B,) at positions (B,): row b is cache row rows[b], its K/V written
   into that row's slot slots[b] */
void decode_step(Model *m, const int64_t *tokens, const int64_t *positions, const int64_t *rows,
                 const int64_t *slots, void *logits) {
    const int B = m->B, C = m->C, hs = m->hs, nh = m->nh, nkv = m->nkv, I = m->I;
    const int nqkv = (nh + 2 * nkv) * hs;
    m->rows = rows;
    for (int b = 0; b < B; b++) m->pos[rows[b] * m->smax + slots[b]] = positions[b];
    lora_groups(m);
    #pragma omp parallel num_threads(m->threads)
    {
        /* The vector work between the projections is split by row (omp for), each row's own arithmetic in its own
           order, so a row's values do not depend on the thread count. */
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            for (int c = 0; c < C; c++) m->x[(int64_t)b * C + c] = ld(m, m->embed, tokens[b] * C + c);
            rmsnorm(m, m->in_norm[0], m->x, m->xn, b);
        }
        for (int l = 0; l < m->L; l++) {
            proj(m, m->qkv_w[l], m->xn, m->qkv, nqkv, C);
            lora_apply(m, l, 0, m->xn, m->qkv, nqkv, C);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                const int64_t t = positions[b] * m->rd;
                float *row = m->qkv + (int64_t)b * nqkv;
                for (int h = 0; h < nh + nkv; h++)
                    rope(m, row + (int64_t)h * hs, (const char *)m->cos + t * (m->bf ? 2 : 4),
                         (const char *)m->sin + t * (m->bf ? 2 : 4));
                for (int g = 0; g < nkv; g++) {
                    int64_t o = (((((int64_t)l * m->nrows + rows[b]) * nkv + g) * m->smax) + slots[b]) * hs;
                    for (int d = 0; d < hs; d++) {
                        st(m, m->k_cache, o + d, row[(int64_t)(nh + g) * hs + d]);
                        st(m, m->v_cache, o + d, row[(int64_t)(nh + nkv + g) * hs + d]);
                    }
                }
            }
            #pragma omp for schedule(static)
            for (int bh = 0; bh < B * nh; bh++)
#ifdef __AVX512BF16__
                if (m->bf) attend_bf16(m, l, bh / nh, bh % nh, (int)slots[bh / nh], positions[bh / nh]); else
#endif
                attend(m, l, bh / nh, bh % nh, (int)slots[bh / nh], positions[bh / nh]);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) prep(m, m->att, nh * hs, b);
            proj(m, m->o_w[l], m->att, m->proj, C, nh * hs);
            lora_apply(m, l, 1, m->att, m->proj, C, nh * hs);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) residual_norm(m, m->post_norm[l], b);
            proj(m, m->gate_up_w[l], m->xn, m->gu, 2 * I, C);
            lora_apply(m, l, 2, m->xn, m->gu, 2 * I, C);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {                          /* mid = R(u · R(silu(g))) */
                for (int i = 0; i < I; i += VW) {
                    const float *g = m->gu + (int64_t)b * 2 * I + i, *u = g + I;
                    float sl[VW];
                    vstoreu(sl, vsilu(vloadn(g, 0, 0, I - i)));
                    for (int t = 0; t < VW && i + t < I; t++)
                        m->mid[(int64_t)b * I + i + t] = R(m, u[t] * R(m, sl[t]));
                }
                prep(m, m->mid, I, b);
            }
            proj(m, m->down_w[l], m->mid, m->proj, C, I);
            lora_apply(m, l, 3, m->mid, m->proj, C, I);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) residual_norm(m, l + 1 < m->L ? m->in_norm[l + 1] : m->final_norm, b);
        }
        gemv(m, m->lm_head, m->xn, m->scores, m->V, C);
        #pragma omp for schedule(static)
        for (int64_t v = 0; v < (int64_t)B * m->V; v++) st(m, logits, v, m->scores[v]);
    }
}
