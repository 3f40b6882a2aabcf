/* The cores' arithmetic ceiling for bench/bench_generate.py: 12 independent chains a thread of 512-bit FMAs
   (fp32) or bf16 dot products, timed by the caller. */
#include <immintrin.h>
#include <omp.h>

void peak(long n, int bf, int threads, float *sink) {
    #pragma omp parallel num_threads(threads)
    {
        __m512 acc[12];        /* distinct starting values, so the compiler cannot merge the chains */
        for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
        __m512 x = _mm512_set1_ps(1e-3f);
        if (bf)
            for (long i = 0; i < n; i++) {
                #pragma GCC unroll 12
                for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)x, (__m512bh)x);
                __asm__ volatile("" : "+v"(x));
            }
        else
            for (long i = 0; i < n; i++) {
                #pragma GCC unroll 12
                for (int j = 0; j < 12; j++) acc[j] = _mm512_fmadd_ps(acc[j], x, x);
                __asm__ volatile("" : "+v"(x));
            }
        float total = 0;
        for (int i = 0; i < 12; i++) total += _mm512_reduce_add_ps(acc[i]);
        sink[omp_get_thread_num()] = total;
    }
}
