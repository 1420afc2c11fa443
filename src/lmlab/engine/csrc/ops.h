// The plain-C interface between the torch-facing engine (engine.cpp) and the per-ISA kernels
// (isa_avx2.cpp, isa_avx512.cpp). The kernel files include no torch or C++ standard headers, so that
// code compiled for AVX-512 can never be merged by the linker into what an AVX2 machine runs.
//
// Layouts (built in Python by lmlab/engine/native.py from lmlab's quantized layers):
//   F32   w (N, K) float
//   BF16  w (N, K) uint16 (bfloat16 bits)
// The integer layouts interleave 16 rows (N padded to Np, a multiple of 16, with zero rows): for row
// group g (rows 16g..16g+15), input block b (inputs 32b..32b+31) and j < 8, a 64-byte vector holds in
// its 4-byte lane r the weights q[16g + r, 32b + 4j .. 32b + 4j + 3]:
//   Q8    w (Np/16, K/32, 8, 64) int8 (those vectors); scale (Np,) float:  W[n,k] = scale[n] * q[n,k]
//   Q4    w (Np/16, K/32, 4, 64) uint8: vector j in the low nibbles, vector j + 4 in the high ones;
//         scale, min (Np/16, K/32, 16) float:       W[n,k] = scale[g,b,r] * q[n,k] + min[g,b,r], q in [0, 15]
// Activations of the integer kernels are quantized per block of 32 (LmlabAct): x[k] ~= d[k/32] * q[k],
// s[b] = d[b] * sum(q of block b).
#pragma once
#include <stdint.h>

enum { LMLAB_LIN_F32 = 0, LMLAB_LIN_BF16 = 1, LMLAB_LIN_Q8 = 2, LMLAB_LIN_Q4 = 3 };

typedef struct {
  int kind, N, K;  // N: the true number of rows (the integer layouts are padded to Np)
  const void* w;
  const float* scale;
  const float* min;
} LmlabLin;

typedef struct {
  const int8_t* q;
  const float* d;
  const float* s;
} LmlabAct;

typedef struct {
  const char* name;
  // x (K) -> q (K), d (K/32), s (K/32); K % 32 == 0
  void (*quantize)(const float* x, int K, int8_t* q, float* d, float* s);
  // y[t * ldy + n] = sum_k W[n, k] x_t[k] for rows n in [r0, r1), activations t < B (matmul_q: r0 % 16 == 0)
  void (*matmul_q)(const LmlabLin* L, const LmlabAct* x, int B, int r0, int r1, float* y, int ldy);
  void (*matmul_f)(const LmlabLin* L, const float* x, int ldx, int B, int r0, int r1, float* y, int ldy);
  // one new query token, G = H / Hkv query heads sharing one key/value head:
  // q (G, D), k/v cache rows (S, D) (float, or bfloat16 bits when bf16), keys [start, S) visible;
  // scratch (G * S) floats -> out (G, D)
  void (*attention)(const float* q, int G, int D, const void* k, const void* v, int bf16, int start, int S,
                    float scale, float* scratch, float* out);
  // out = silu(g) * u
  void (*silu_mul)(const float* g, const float* u, int n, float* out);
} LmlabOps;

#ifdef __cplusplus
extern "C" {
#endif
void lmlab_ops_avx2(LmlabOps* ops);
void lmlab_ops_avx512(LmlabOps* ops);
#ifdef __cplusplus
}
#endif
