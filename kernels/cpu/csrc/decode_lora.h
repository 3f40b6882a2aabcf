/* The LoRA epilogue of the decode step (decode.c): after each projection, every row with an adapter adds its
   adapter's delta, Punica's BGMV as shrink then expand, with the rows grouped by adapter so that each adapter's
   A and B are read once per projection however many rows use it:

       shrink   h[b]    = R(R(x[b] · A_sᵀ) · R(s_s))        (R,) per row b of slot s; reduction over K
       expand   y[b, n] = R(y[b, n] + Σ_r h[b, r] · Bt_s[r, n])    for n in [lo_s, hi_s), the rows B_s can change

   the roundings kernels/lora_gather.py's CPU path (`all_slots_`, what the torch step runs at decode sizes) makes:
   h rounded to the model dtype, scaled by the scale in the model dtype, then y + h·Bᵀ rounded once. Rows without
   an adapter (slot -1) and projections no resident adapter targets are left alone. Ranks below the padded R skip
   the padding; a fused projection's adapter that targets one part (q_proj of qkv_proj: engine/formats/peft.py fuses it
   with zero B rows elsewhere) expands only into that part's rows [lo, hi).

   Work split (inside decode_step's parallel region, each part ending in the barrier of `omp for`): the shrink
   over (group, rank) pairs, each reading one row of A for all its group's rows; the expand over blocks of output
   columns, each reading VW-wide pieces of B's rows and adding them into every row of each group. x is the
   projection's fp32 input (bf16-exact for a bf16 model), y its fp32 output (already rounded), Bt is lora_B
   transposed per slot so the expand's loads are contiguous along n. */
#pragma once
#include <stdint.h>

#include "decode.h"

#define LORA_NBLOCK (4 * VW)  /* output columns a task of the expand */

/* Group the call's rows by slot (before the parallel region): lgroup = [rows (B) | slot of each group (B) |
   group starts (B + 1)], m->lng groups; none when no row has an adapter. With lora_rowwise each row is a group of
   its own (the per-row epilogue, kept to measure what grouping buys). */
static void lora_groups(Model *m) {
    m->lng = 0;
    if (!m->lora || !m->lora_slot) return;
    int *rows = m->lgroup, *gslot = rows + m->B, *gstart = gslot + m->B, n = 0;
    for (int s = 0; s < m->lora_slots; s++) {
        const int first = n;
        for (int b = 0; b < m->B; b++) {
            if (m->lora_slot[b] != s) continue;
            if (m->lora_rowwise && n > first) { gslot[m->lng] = s; gstart[m->lng++] = n - 1; }
            rows[n++] = b;
        }
        if (n > first) { gslot[m->lng] = s; gstart[m->lng++] = m->lora_rowwise ? n - 1 : first; }
    }
    gstart[m->lng] = n;
}

/* y (B, N) += each grouped row's delta for projection p (0 qkv, 1 o, 2 gate_up, 3 down) of layer l; x (B, K) */
static void lora_apply(const Model *m, int l, int p, const float *x, float *y, int N, int K) {
    if (!m->lng) return;
    const LoRA *d = &m->lora[l * 4 + p];
    if (!d->A) return;
    const int RP = d->R, ng = m->lng, bf = m->bf;
    const int *rows = m->lgroup, *gslot = rows + m->B, *gstart = gslot + m->B;
    #pragma omp for schedule(static)
    for (int it = 0; it < ng * RP; it++) {
        const int g = it / RP, r = it % RP, s = gslot[g];
        if (r >= d->rank[s]) continue;
        const int64_t a = ((int64_t)s * RP + r) * K;
        const float scale = R(m, d->scale[s]);
        for (int i = gstart[g]; i < gstart[g + 1]; i++) {
            const int b = rows[i];
            const float *xr = x + (int64_t)b * K;
            vfloat acc = vzero();
            for (int k = 0; k < K; k += VW)
                acc = vfmadd(vloadn(d->A, a + k, bf, K - k), vloadn(xr, k, 0, K - k), acc);
            m->lh[b * RP + r] = R(m, R(m, vsum(acc)) * scale);
        }
    }
    #pragma omp for schedule(static)
    for (int n0 = 0; n0 < N; n0 += LORA_NBLOCK) {
        const int n1 = n0 + LORA_NBLOCK < N ? n0 + LORA_NBLOCK : N;
        for (int g = 0; g < ng; g++) {
            const int s = gslot[g], rk = d->rank[s];
            const int lo = d->lo[s] > n0 ? d->lo[s] : n0, hi = d->hi[s] < n1 ? d->hi[s] : n1;
            if (rk == 0 || lo >= hi) continue;
            const int64_t bt = (int64_t)s * RP * N;
            for (int i = gstart[g]; i < gstart[g + 1]; i++) {
                const int b = rows[i];
                const float *h = m->lh + b * RP;
                float *yr = y + (int64_t)b * N;
                for (int n = lo; n < hi; n += VW) {
                    vfloat acc = vloadn(yr, n, 0, hi - n);
                    for (int r = 0; r < rk; r++)
                        acc = vfmadd(vset1(h[r]), vloadn(d->Bt, bt + (int64_t)r * N + n, bf, hi - n), acc);
                    vstoren(yr, n, 0, vround(acc, bf), hi - n);
                }
            }
        }
    }
}
