/* The decode step's state (decode.c) and the scalar helpers its parts share (decode_attention.h).

   Python fills a Model and one NF4Desc per NF4 projection through ctypes (kernels/cpu/decode.py). So that a field
   added, removed, renamed, reordered or retyped on either side cannot silently shift the others, the C side reports
   each field's offset by name and each struct's size (decode_model_offset, ...), and Python checks its ctypes
   mirror against them when it loads the library. MODEL_FIELDS / NF4DESC_FIELDS list the names; a field missing
   there changes the size, which is checked too. */
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

typedef struct {
    int B, L, C, nh, nkv, hs, rd, I, V, smax, window, bf, threads;
    float eps, scale;
    const void **in_norm, **qkv_w, **o_w, **post_norm, **gate_up_w, **down_w;   /* L pointers each */
    const void *final_norm, *lm_head, *embed, *cos, *sin;                       /* cos/sin: (smax, rd) */
    void *k_cache, *v_cache;                                                    /* (L, B, nkv, smax, hs) */
    int64_t *pos;                                                               /* (B, smax) */
    float *x, *xn, *qkv, *att, *proj, *gu, *mid, *scores;                       /* fp32 scratch, B rows */
    uint16_t *xb;                                                               /* bf16 GEMV input rows */
    int nf4;                        /* the four projections are NF4: their pointers point at an NF4Desc each */
    float *xe, *xo;                 /* NF4 GEMV input: even / odd columns of x, B rows */
    float *tile;                    /* NF4 tile GEMM scratch: threads x NF4_TILE x kmax(m), fp32 or bf16 */
    int nrows;                      /* rows of the cache; the step's B rows are cache rows rows[0..B-1] */
    const int64_t *rows;            /* (B,) set per call by decode_step */
    const struct LoRA *lora;        /* L x 4 stacks (qkv, o, gate_up, down of each layer; decode_lora.h), or NULL */
    int lora_slots;                 /* S: adapter slots of every stack */
    const int64_t *lora_slot;       /* (B,) per call: each row's slot, -1 none; NULL: no row has an adapter */
    float *lh;                      /* (B, R) scratch: each row's scaled shrink h */
    int *lgroup;                    /* (3B + 1) scratch: rows grouped by slot (decode_lora.h's lora_groups) */
    int lng;                        /* groups this call */
    int lora_rowwise;               /* 1: one group per row, no sharing (an ablation: bench_multi_lora.py) */
    int invariant;                  /* 1: one kernel for every row count, so a row's sums never depend on B */
} Model;

#define MODEL_FIELDS(X) X(B) X(L) X(C) X(nh) X(nkv) X(hs) X(rd) X(I) X(V) X(smax) X(window) X(bf) X(threads)   \
    X(eps) X(scale) X(in_norm) X(qkv_w) X(o_w) X(post_norm) X(gate_up_w) X(down_w) X(final_norm) X(lm_head)      \
    X(embed) X(cos) X(sin) X(k_cache) X(v_cache) X(pos) X(x) X(xn) X(qkv) X(att) X(proj) X(gu) X(mid) X(scores)  \
    X(xb) X(nf4) X(xe) X(xo) X(tile) X(nrows) X(rows) X(lora) X(lora_slots) X(lora_slot) X(lh) X(lgroup) X(lng)  \
    X(lora_rowwise) X(invariant)

typedef struct {                    /* one NF4 weight (kernels/nf4.py's NF4Weight), for nf4.h's GEMV */
    const uint8_t *packed;
    const void *absmax;
    const float *code, *ncode, *nabs;
    float offset;
    int dq, bs, nbs;
} NF4Desc;

#define NF4DESC_FIELDS(X) X(packed) X(absmax) X(code) X(ncode) X(nabs) X(offset) X(dq) X(bs) X(nbs)

/* one projection's resident adapters (engine/serve/multi_lora.py's MultiLoRALinear) */
typedef struct LoRA {
    const void *A;                  /* (S, R, K) model dtype: slot s's lora_A, rows rank[s]..R zero; NULL: none */
    const void *Bt;                 /* (S, R, N) model dtype: slot s's lora_B transposed, so the expand reads rows */
    const float *scale;             /* (S,) */
    const int *rank, *lo, *hi;      /* (S,) slot s's rank (0: it leaves this projection alone) and the output
                                       rows [lo, hi) its B can change (a q_proj-only adapter: the q slice of qkv) */
    int R;
} LoRA;

#define LORA_FIELDS(X) X(A) X(Bt) X(scale) X(rank) X(lo) X(hi) X(R)

/* the widest projection input: the most columns a row of xb, xe/xo or an NF4 tile holds */
static inline int kmax(const Model *m) {
    int k = m->C > m->I ? m->C : m->I;
    return k > m->nh * m->hs ? k : m->nh * m->hs;
}

static inline float R(const Model *m, float v) { return m->bf ? bf2f(f2bf(v)) : v; }
static inline float ld(const Model *m, const void *p, int64_t i) {
    return m->bf ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void st(const Model *m, void *p, int64_t i, float v) {
    if (m->bf) ((uint16_t *)p)[i] = f2bf(v); else ((float *)p)[i] = v;
}
