// AVX-512 (F, BW, VL, DQ) + VNNI kernels; selected at run time where the CPU has them, see engine.cpp.
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define LMLAB_AVX512 1
#define LMLAB_OPS_FN lmlab_ops_avx512
#define LMLAB_ISA_NAME "avx512-vnni"
#include "kernels.inc"
