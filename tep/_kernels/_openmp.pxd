# OpenMP helpers that exist with or without OpenMP (see _omp_shim.h).
cdef extern from "_omp_shim.h" nogil:
    int TEP_OPENMP
    int omp_get_max_threads()
    int omp_get_thread_num()
