// Hardware ceilings for the benchmarks (roofline.cpp says how each is measured).
#pragma once
#include <cstdint>
#include <string>

namespace pysparse {
namespace cpu {

// GFLOP/s of `threads` threads running register-only vector loops for about `seconds`:
// kind "fp32" (FMA; AVX-512, else AVX2) or "bf16" (vdpbf16ps). 0 where the CPU lacks the
// instructions. Throws std::invalid_argument for an unknown kind or arguments out of range.
double probe_flops(const std::string& kind, int threads, double seconds);
// GB/s read by `threads` threads each summing its own buffer of bytes_per_thread bytes over and
// over for about `seconds` (the buffer's size picks the cache level that serves it).
double probe_read_bandwidth(int64_t bytes_per_thread, int threads, double seconds);
// Whether the CPU has AVX512-BF16 (vdpbf16ps).
bool bf16_dot_supported();

}  // namespace cpu
}  // namespace pysparse
