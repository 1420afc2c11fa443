// lmlab's native decode step: the whole layer loop of a LLaMA-family decoder for one new token per row,
// in one call. The arithmetic lives in the per-ISA kernels (ops.h); this file holds the model's
// tensors, picks the kernels for this CPU, and runs the loop (threads: at::parallel_for over weight
// rows and over (row, key/value head) pairs).
//
// Shapes: B batch rows, C d_model, H query heads, Hkv key/value heads, G = H / Hkv, D head dim,
// F feed-forward width, V vocabulary, L cache capacity, S positions after this step.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ops.h"

namespace {

LmlabOps g_ops;
std::string g_isa;

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// "avx512" / "avx2" forces a path (LMLAB_ENGINE_ISA); "" picks the best this CPU has. -> the ISA in use
std::string select_isa(const std::string& want) {
  if (want == "avx512") {
    TORCH_CHECK(cpu_has_avx512_vnni(), "LMLAB_ENGINE_ISA=avx512 but this CPU lacks AVX-512 VNNI");
    lmlab_ops_avx512(&g_ops);
  } else if (want == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "LMLAB_ENGINE_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
    lmlab_ops_avx2(&g_ops);
  } else {
    TORCH_CHECK(want.empty(), "LMLAB_ENGINE_ISA=", want, " is not valid; choose avx512 or avx2");
    if (cpu_has_avx512_vnni()) lmlab_ops_avx512(&g_ops);
    else if (cpu_has_avx2()) lmlab_ops_avx2(&g_ops);
    else TORCH_CHECK(false, "this CPU has neither AVX2+FMA nor AVX-512 VNNI");
  }
  g_isa = g_ops.name;
  return g_isa;
}

void ensure_ops() {
  if (g_isa.empty()) {
    const char* env = std::getenv("LMLAB_ENGINE_ISA");
    select_isa(env ? env : "");
  }
}

struct Linear {
  LmlabLin w{};
  at::Tensor weight, scale, min, bias;  // kept alive; bias may be undefined
  // a LoRA adapter on this layer: y += scaling * B (A x), A (r, K) and B (N, r) fp32, while enabled
  at::Tensor lora_a, lora_b;
  LmlabLin la{}, lb{};
  float lora_scaling = 0.0f;
  bool quantized() const { return w.kind == LMLAB_LIN_Q4 || w.kind == LMLAB_LIN_Q8; }
  void set_lora(at::Tensor a, at::Tensor b, double scaling) {
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == w.K && b.size(0) == w.N && b.size(1) == a.size(0),
                "LoRA A (r, ", w.K, ") and B (", w.N, ", r) expected");
    lora_a = a.to(at::kFloat).contiguous();
    lora_b = b.to(at::kFloat).contiguous();
    la = LmlabLin{LMLAB_LIN_F32, (int)lora_a.size(0), (int)lora_a.size(1), lora_a.data_ptr(), nullptr, nullptr};
    lb = LmlabLin{LMLAB_LIN_F32, (int)lora_b.size(0), (int)lora_b.size(1), lora_b.data_ptr(), nullptr, nullptr};
    lora_scaling = (float)scaling;
  }
};


Linear make_linear(int64_t kind, at::Tensor weight, c10::optional<at::Tensor> scale, c10::optional<at::Tensor> min,
                   c10::optional<at::Tensor> bias, int64_t in_features, int64_t out_features) {
  Linear L;
  TORCH_CHECK(weight.is_contiguous() && weight.device().is_cpu(), "weight must be a contiguous CPU tensor");
  L.weight = weight;
  L.w.kind = (int)kind;
  L.w.N = (int)out_features;
  L.w.K = (int)in_features;
  L.w.w = weight.data_ptr();
  const int64_t Np = (out_features + 15) / 16 * 16;
  if (kind == LMLAB_LIN_Q4 || kind == LMLAB_LIN_Q8) {
    TORCH_CHECK(in_features % 32 == 0, "quantized layers need in_features % 32 == 0, got ", in_features);
    TORCH_CHECK(weight.numel() == Np * in_features / (kind == LMLAB_LIN_Q4 ? 2 : 1), "packed weight has ",
                weight.numel(), " bytes for (", out_features, ", ", in_features, ")");
    L.scale = scale.value().contiguous().to(at::kFloat);
    L.w.scale = L.scale.data_ptr<float>();
  } else {
    TORCH_CHECK(weight.dim() == 2 && weight.size(0) == out_features && weight.size(1) == in_features,
                "weight must be (", out_features, ", ", in_features, ")");
  }
  if (kind == LMLAB_LIN_Q4) {
    L.min = min.value().contiguous().to(at::kFloat);
    L.w.min = L.min.data_ptr<float>();
  }
  if (bias.has_value() && bias->defined()) L.bias = bias->contiguous().to(at::kFloat);
  return L;
}

// activations quantized once per input vector (shared by q/k/v, and by gate/up)
struct ActBuffer {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<LmlabAct> rows;
  void quantize(const float* x, int B, int K, int ldx) {
    const int nb = K / 32;
    q.resize((size_t)B * K); d.resize((size_t)B * nb); s.resize((size_t)B * nb);
    rows.resize(B);
    for (int b = 0; b < B; ++b) {
      g_ops.quantize(x + (size_t)b * ldx, K, q.data() + (size_t)b * K, d.data() + (size_t)b * nb,
                     s.data() + (size_t)b * nb);
      rows[b] = LmlabAct{q.data() + (size_t)b * K, d.data() + (size_t)b * nb, s.data() + (size_t)b * nb};
    }
  }
};

// y (B, N) row stride ldy = x (B, K) W^T (+ bias); `act` holds x quantized when the layer is
void linear(const Linear& L, const float* x, int B, const ActBuffer* act, float* y, int ldy, bool lora = true) {
  const int N = L.w.N;
  const int64_t threads = at::get_num_threads();
  const int64_t grain = std::max<int64_t>(16, ((N + threads - 1) / threads + 15) / 16 * 16);
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    if (L.quantized()) g_ops.matmul_q(&L.w, act->rows.data(), B, (int)r0, (int)r1, y, ldy);
    else g_ops.matmul_f(&L.w, x, L.w.K, B, (int)r0, (int)r1, y, ldy);
  });
  if (L.lora_a.defined() && lora) {
    const int r = L.la.N;
    std::vector<float> t((size_t)B * r), d((size_t)B * N);
    g_ops.matmul_f(&L.la, x, L.w.K, B, 0, r, t.data(), r);
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      g_ops.matmul_f(&L.lb, t.data(), r, B, (int)r0, (int)r1, d.data(), N);
    });
    for (int b = 0; b < B; ++b)
      for (int n = 0; n < N; ++n) y[(size_t)b * ldy + n] += L.lora_scaling * d[(size_t)b * N + n];
  }
  if (L.bias.defined()) {
    const float* bp = L.bias.data_ptr<float>();
    for (int b = 0; b < B; ++b)
      for (int n = 0; n < N; ++n) y[(size_t)b * ldy + n] += bp[n];
  }
}

void rmsnorm(const float* x, const float* w, int B, int C, float eps, float* y) {
  for (int b = 0; b < B; ++b) {
    const float* xr = x + (size_t)b * C;
    float* yr = y + (size_t)b * C;
    float ss = 0.0f;
    for (int i = 0; i < C; ++i) ss += xr[i] * xr[i];
    const float r = 1.0f / std::sqrt(ss / C + eps);
    for (int i = 0; i < C; ++i) yr[i] = w[i] * (xr[i] * r);
  }
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

struct Layer {
  at::Tensor attn_norm, ffn_norm;  // (C,) fp32
  Linear q, k, v, o, gate, up, down;
};

class NativeModel {
 public:
  NativeModel(int64_t C, int64_t H, int64_t Hkv, int64_t D, int64_t F, int64_t V, double eps, double attn_scale,
              at::Tensor inv_freq, at::Tensor final_norm, Linear head)
      : C_(C), H_(H), Hkv_(Hkv), D_(D), F_(F), V_(V), eps_((float)eps), scale_((float)attn_scale),
        inv_freq_(inv_freq.contiguous().to(at::kFloat)), final_norm_(final_norm.contiguous().to(at::kFloat)),
        head_(std::move(head)) {
    ensure_ops();
    TORCH_CHECK(H % Hkv == 0, "n_heads ", H, " is not a multiple of n_kv_heads ", Hkv);
  }

  void add_layer(at::Tensor attn_norm, at::Tensor ffn_norm, std::vector<Linear> lins) {
    TORCH_CHECK(lins.size() == 7, "a layer has 7 linears (q k v o gate up down), got ", lins.size());
    Layer l{attn_norm.contiguous().to(at::kFloat), ffn_norm.contiguous().to(at::kFloat),
            lins[0], lins[1], lins[2], lins[3], lins[4], lins[5], lins[6]};
    layers_.push_back(std::move(l));
  }

  // x (B, C) embedded new tokens; caches: per layer (R, Hkv, L, D) fp32 or bf16. Batch row b uses cache row
  // rows[b] (default b), writes its key/value at position lengths[b] (default `past`) and attends to
  // positions [starts[b], lengths[b]]; its rotary position is lengths[b] - starts[b] (starts: left padding).
  at::Tensor step(at::Tensor x_in, const std::vector<at::Tensor>& kc, const std::vector<at::Tensor>& vc,
                  int64_t past, c10::optional<at::Tensor> starts_opt, c10::optional<at::Tensor> lengths_opt,
                  c10::optional<at::Tensor> rows_opt) {
    const int B = (int)x_in.size(0), C = (int)C_, H = (int)H_, Hkv = (int)Hkv_, D = (int)D_, F = (int)F_;
    const int G = H / Hkv;
    TORCH_CHECK(kc.size() == layers_.size() && vc.size() == layers_.size(), "need one k and v cache per layer");
    at::Tensor x = x_in.to(at::kFloat).contiguous().clone();  // (B, C) residual stream
    auto per_row = [&](const c10::optional<at::Tensor>& t, int64_t fill, const char* what) {
      std::vector<int64_t> v(B, fill);
      if (t.has_value() && t->defined()) {
        TORCH_CHECK(t->numel() == B, what, " must have one entry per batch row (", B, "), got ", t->numel());
        auto c = t->to(at::kLong).contiguous();
        for (int b = 0; b < B; ++b) v[b] = c.data_ptr<int64_t>()[b];
      }
      return v;
    };
    const std::vector<int64_t> starts = per_row(starts_opt, 0, "starts"), lens = per_row(lengths_opt, past, "lengths");
    std::vector<int64_t> rows = per_row(rows_opt, -1, "rows");
    for (int b = 0; b < B; ++b) if (rows[b] < 0) rows[b] = b;
    // rotary cos/sin per row: (B, D/2)
    std::vector<float> cs((size_t)B * D / 2), sn((size_t)B * D / 2);
    const float* inv = inv_freq_.data_ptr<float>();
    for (int b = 0; b < B; ++b) {
      TORCH_CHECK(lens[b] >= 0 && starts[b] >= 0 && starts[b] <= lens[b], "row ", b, ": start ", starts[b],
                  " and length ", lens[b], " do not fit");
      const float pos = (float)(lens[b] - starts[b]);
      for (int i = 0; i < D / 2; ++i) {
        const float f = pos * inv[i];
        cs[(size_t)b * D / 2 + i] = std::cos(f);
        sn[(size_t)b * D / 2 + i] = std::sin(f);
      }
    }
    std::vector<float> h((size_t)B * C), q((size_t)B * H * D), k((size_t)B * Hkv * D), v((size_t)B * Hkv * D),
        att((size_t)B * H * D), g((size_t)B * F), u((size_t)B * F), tmp((size_t)B * (C > F ? C : F));
    ActBuffer act;
    float* xp = x.data_ptr<float>();
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      const at::Tensor& kt = kc[li];
      const at::Tensor& vt = vc[li];
      TORCH_CHECK(kt.is_contiguous() && vt.is_contiguous() && kt.dim() == 4 && kt.size(1) == Hkv && kt.size(3) == D &&
                      vt.sizes() == kt.sizes() && vt.scalar_type() == kt.scalar_type(),
                  "layer ", li, ": the KV caches must be contiguous (rows, ", Hkv, ", capacity, ", D, ")");
      if (li == 0)
        for (int b = 0; b < B; ++b)
          TORCH_CHECK(rows[b] < kt.size(0) && lens[b] < kt.size(2), "row ", b, ": cache row ", rows[b], " position ",
                      lens[b], " outside the cache (", kt.size(0), " rows, capacity ", kt.size(2), ")");
      const bool bf16 = kt.scalar_type() == at::kBFloat16;
      TORCH_CHECK(bf16 || kt.scalar_type() == at::kFloat, "KV cache dtype must be float32 or bfloat16");
      const int64_t Lcap = kt.size(2);
      // attention branch
      rmsnorm(xp, L.attn_norm.data_ptr<float>(), B, C, eps_, h.data());
      if (L.q.quantized() || L.k.quantized() || L.v.quantized()) act.quantize(h.data(), B, C, C);
      linear(L.q, h.data(), B, &act, q.data(), H * D, lora_);
      linear(L.k, h.data(), B, &act, k.data(), Hkv * D, lora_);
      linear(L.v, h.data(), B, &act, v.data(), Hkv * D, lora_);
      for (int b = 0; b < B; ++b) {  // RoPE (half-split layout) on q and k, then k, v into the cache
        const float* c = cs.data() + (size_t)b * D / 2;
        const float* s = sn.data() + (size_t)b * D / 2;
        auto rotate = [&](float* t) {
          for (int i = 0; i < D / 2; ++i) {
            const float x1 = t[i], x2 = t[i + D / 2];
            t[i] = x1 * c[i] - x2 * s[i];
            t[i + D / 2] = x2 * c[i] + x1 * s[i];
          }
        };
        for (int hh = 0; hh < H; ++hh) rotate(q.data() + ((size_t)b * H + hh) * D);
        for (int hh = 0; hh < Hkv; ++hh) {
          float* kr = k.data() + ((size_t)b * Hkv + hh) * D;
          rotate(kr);
          const float* vr = v.data() + ((size_t)b * Hkv + hh) * D;
          const size_t off = (((size_t)rows[b] * Hkv + hh) * Lcap + lens[b]) * D;
          if (bf16) {
            auto* kd = reinterpret_cast<uint16_t*>(kt.data_ptr()) + off;
            auto* vd = reinterpret_cast<uint16_t*>(vt.data_ptr()) + off;
            for (int i = 0; i < D; ++i) { kd[i] = to_bf16(kr[i]); vd[i] = to_bf16(vr[i]); }
          } else {
            std::memcpy(kt.data_ptr<float>() + off, kr, sizeof(float) * D);
            std::memcpy(vt.data_ptr<float>() + off, vr, sizeof(float) * D);
          }
        }
      }
      const size_t esz = bf16 ? 2 : 4;
      at::parallel_for(0, (int64_t)B * Hkv, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> scratch;
        for (int64_t i = i0; i < i1; ++i) {
          const int b = (int)(i / Hkv), hh = (int)(i % Hkv);
          const int S = (int)lens[b] + 1;
          scratch.resize((size_t)G * S);
          const size_t off = (((size_t)rows[b] * Hkv + hh) * Lcap) * D * esz;
          g_ops.attention(q.data() + ((size_t)b * H + (size_t)hh * G) * D, G, D,
                          (const char*)kt.data_ptr() + off, (const char*)vt.data_ptr() + off, bf16 ? 1 : 0,
                          (int)starts[b], S, scale_, scratch.data(), att.data() + ((size_t)b * H + (size_t)hh * G) * D);
        }
      });
      if (L.o.quantized()) act.quantize(att.data(), B, H * D, H * D);
      linear(L.o, att.data(), B, &act, tmp.data(), C, lora_);
      for (size_t i = 0; i < (size_t)B * C; ++i) xp[i] += tmp[i];
      // feed-forward branch
      rmsnorm(xp, L.ffn_norm.data_ptr<float>(), B, C, eps_, h.data());
      if (L.gate.quantized() || L.up.quantized()) act.quantize(h.data(), B, C, C);
      linear(L.gate, h.data(), B, &act, g.data(), F, lora_);
      linear(L.up, h.data(), B, &act, u.data(), F, lora_);
      for (int b = 0; b < B; ++b) g_ops.silu_mul(g.data() + (size_t)b * F, u.data() + (size_t)b * F, F, g.data() + (size_t)b * F);
      if (L.down.quantized()) act.quantize(g.data(), B, F, F);
      linear(L.down, g.data(), B, &act, tmp.data(), C, lora_);
      for (size_t i = 0; i < (size_t)B * C; ++i) xp[i] += tmp[i];
    }
    rmsnorm(xp, final_norm_.data_ptr<float>(), B, C, eps_, h.data());
    at::Tensor logits = at::empty({B, V_}, at::kFloat);
    if (head_.quantized()) act.quantize(h.data(), B, C, C);
    linear(head_, h.data(), B, &act, logits.data_ptr<float>(), (int)V_, lora_);
    return logits;
  }

 private:
  int64_t C_, H_, Hkv_, D_, F_, V_;
  float eps_, scale_;
  at::Tensor inv_freq_, final_norm_;
  Linear head_;
  std::vector<Layer> layers_;
  bool lora_ = true;  // lmlab.adapt.lora_disabled switches every adapter of the model off at once

 public:
  void set_lora_enabled(bool on) { lora_ = on; }
};

// y (B, N) = x (B, K) W^T through the kernels alone (tests and benchmarks)
at::Tensor linear_forward(const Linear& L, at::Tensor x) {
  ensure_ops();
  x = x.to(at::kFloat).contiguous();
  const int B = (int)x.size(0);
  TORCH_CHECK(x.size(1) == L.w.K, "x has ", x.size(1), " features, the layer takes ", L.w.K);
  at::Tensor y = at::empty({B, L.w.N}, at::kFloat);
  ActBuffer act;
  if (L.quantized()) act.quantize(x.data_ptr<float>(), B, L.w.K, L.w.K);
  linear(L, x.data_ptr<float>(), B, &act, y.data_ptr<float>(), L.w.N);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lmlab's native decode step (see lmlab/engine/native.py)";
  m.def("select_isa", &select_isa, "force the kernel ISA: 'avx512', 'avx2' or '' (best here) -> the ISA in use");
  m.def("isa", []() { ensure_ops(); return g_isa; });
  m.def("cpu_has_avx512_vnni", &cpu_has_avx512_vnni);
  m.def("cpu_has_avx2", &cpu_has_avx2);
  py::class_<Linear>(m, "Linear")
      .def(py::init(&make_linear), py::arg("kind"), py::arg("weight"), py::arg("scale"), py::arg("min"),
           py::arg("bias"), py::arg("in_features"), py::arg("out_features"))
      .def("set_lora", &Linear::set_lora)
      .def("__call__", &linear_forward);
  py::class_<NativeModel>(m, "NativeModel")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor,
                    Linear>())
      .def("add_layer", &NativeModel::add_layer)
      .def("set_lora_enabled", &NativeModel::set_lora_enabled)
      .def("step", &NativeModel::step, py::arg("x"), py::arg("k_caches"), py::arg("v_caches"), py::arg("past"),
           py::arg("starts") = py::none(), py::arg("lengths") = py::none(), py::arg("rows") = py::none(),
           py::call_guard<py::gil_scoped_release>());
}
