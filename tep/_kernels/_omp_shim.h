/* OpenMP shim: the kernels build and run serially when the compiler has no OpenMP. */
#ifndef TEP_OMP_SHIM_H
#define TEP_OMP_SHIM_H
#ifdef _OPENMP
#include <omp.h>
#define TEP_OPENMP 1
#else
#define TEP_OPENMP 0
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif
#endif
