// Fused pruned FFN: the activation-sparse second product, compiled per ISA like the SpMM kernels.
// Shapes and fields: FfnSkipArgs in kernels.h.
//
// Why W2 transposed: with a ReLU (or a CATS-style threshold) most intermediate entries of a
// decode step are zero, and y = W2 h only needs the columns of W2 at the nonzero ones. Stored as
// nn.Linear's (d, hidden) those columns are strided and every cache line of W2 is still touched;
// stored as W2^T (hidden, d) each nonzero is one contiguous row, so 90% zeros skip 90% of W2's
// bytes. The kernel holds kFfnChunkCols output columns in registers and streams the kept rows.

template <typename T>
static void ffn_skip(const FfnSkipArgs& a, int64_t chunk0, int64_t chunk1) {
  constexpr int NV = int(kFfnChunkCols) / Vec::W;
  const T* w = static_cast<const T*>(a.w2t);
  for (int64_t ch = chunk0; ch < chunk1; ++ch) {
    const int64_t c0 = ch * kFfnChunkCols;
    if (c0 + kFfnChunkCols <= a.d) {
      typename Vec::V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = Vec::zero();
      // Partial sums of 16 rows: one fp32 chain over hundreds of rows was 3x less accurate than
      // the unfused GEMM (which blocks its sums the same way).
      for (int64_t i0 = 0; i0 < a.nnz; i0 += 16) {
        typename Vec::V part[NV];
        for (int v = 0; v < NV; ++v) part[v] = Vec::zero();
        for (int64_t i = i0; i < a.nnz && i < i0 + 16; ++i) {
          const T* row = w + int64_t(a.nz[i]) * a.d + c0;
          const auto h = Vec::set1(a.hv[i]);
          for (int v = 0; v < NV; ++v) part[v] = Vec::fma(h, Vec::load_cvt(row + v * Vec::W), part[v]);
        }
        for (int v = 0; v < NV; ++v) acc[v] = Vec::add(acc[v], part[v]);
      }
      for (int v = 0; v < NV; ++v) Vec::store(a.acc + c0 + v * Vec::W, acc[v]);
    } else {  // the last, partial chunk
      for (int64_t c = c0; c < a.d; ++c) {
        float acc = 0.f;
        for (int64_t i0 = 0; i0 < a.nnz; i0 += 16) {
          float part = 0.f;
          for (int64_t i = i0; i < a.nnz && i < i0 + 16; ++i) part += a.hv[i] * to_f32(w[int64_t(a.nz[i]) * a.d + c]);
          acc += part;
        }
        a.acc[c] = acc;
      }
    }
  }
}
