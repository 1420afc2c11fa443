// AVX2 + FMA kernels (any x86-64 CPU since 2013); selected at run time, see engine.cpp.
#pragma GCC target("avx2,fma,f16c")
#define LMLAB_AVX512 0
#define LMLAB_OPS_FN lmlab_ops_avx2
#define LMLAB_ISA_NAME "avx2"
#include "kernels.inc"
