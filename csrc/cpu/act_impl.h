// Elementwise activations whose torch CPU kernels are slow. Only gelu_tanh so far: torch's tanh
// form took 5x its erf form on (1024, 3072) fp32 (benchmarks/RESULTS.md, "GELU"), and it is what
// GPT-2-style models run after every FFN input projection.
// Part of the per-ISA kernel build: isa_{scalar,avx2,avx512}.cpp include it inside that ISA's
// namespace, after simd.h and in the order they list; no include guard, no torch header
// (kernels.h says why).

// 0.5 x (1 + tanh(u)) = x sigmoid(2u) = x / (1 + 2^(-2 u log2 e)), u = sqrt(2/pi) (x + 0.044715 x^3):
// one exp2 and one division, ~3 ulp from the exact value (tests/test_activation.py). The
// exponent is capped at 128 (exp2 wraps above it; 2^128 = inf): x -> -inf gives -0, NaN stays NaN.
static inline Vec::V gelu_tanh_vec(Vec::V x) {
  constexpr float c1 = float(-2.0 * 0.79788456080286535588 * 1.44269504088896340736);
  constexpr float c3 = float(-2.0 * 0.79788456080286535588 * 1.44269504088896340736 * 0.044715);
  const Vec::V t = Vec::mul(x, Vec::fma(Vec::mul(x, x), Vec::set1(c3), Vec::set1(c1)));
  return Vec::div(x, Vec::add(Vec::set1(1.f), Vec::exp2(Vec::min(Vec::set1(128.f), t))));
}

// dst[0..n) = gelu_tanh(src[0..n)) (T float, bf16_t or f16_t, computed in fp32; src == dst is
// allowed). The tail goes through a zero-padded vector: every element gets the same arithmetic.
template <typename T>
static void gelu_tanh_kernel(const void* src, void* dst, int64_t n) {
  constexpr int W = Vec::W;
  const T* s = static_cast<const T*>(src);
  T* d = static_cast<T*>(dst);
  alignas(64) float tmp[W];
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec::V y = gelu_tanh_vec(Vec::load_cvt(s + i));
    if constexpr (sizeof(T) == 4) {
      Vec::store(reinterpret_cast<float*>(d + i), y);
    } else {
      Vec::store(tmp, y);
      for (int k = 0; k < W; ++k) from_f32(tmp[k], d + i + k);
    }
  }
  if (i == n) return;
  const int rest = int(n - i);
  for (int k = 0; k < W; ++k) tmp[k] = k < rest ? to_f32(s[i + k]) : 0.f;
  Vec::store(tmp, gelu_tanh_vec(Vec::load(tmp)));
  for (int k = 0; k < rest; ++k) from_f32(tmp[k], d + i + k);
}
