/* Give back the calling thread's OpenMP thread pool (kernels/cpu/omp_pool.py says when and why). OpenMP 5's pause
   call: libgomp ends the pool's worker threads, and the thread's next parallel region builds a new pool.
   Returns 0, or nonzero when the runtime refused (the caller is inside a parallel region). */
#include <omp.h>

int omp_pool_release(void) { return omp_pause_resource_all(omp_pause_soft); }
