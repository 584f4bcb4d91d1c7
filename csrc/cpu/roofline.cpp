// The hardware ceilings the benchmarks report fractions of (pysparse.bench.roofline): the FMA
// peak (fp32 FMA, bf16 vdpbf16ps) from register-only loops, and the read bandwidth of a working
// set of a given size (an L1-, L2-, L3- or DRAM-sized buffer). Not ops: plain functions on the
// _C module (registry.cpp), because they take no tensors and must not be traced or compiled.
//
// Each probe runs on `threads` std::threads at once, each on its own data, and reports the
// aggregate rate over the wall time of the slowest thread; a fixed amount of work per thread,
// calibrated on one thread first, so that all threads start and stop together.
#include "roofline.h"

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace pysparse {
namespace cpu {
namespace {

using Clock = std::chrono::steady_clock;

// 16 independent accumulators: FMA latency (4 cycles) x 2 FMA ports needs 8 chains; 16 leaves
// margin for a core with longer latency. The inputs are kept opaque so nothing folds.
__attribute__((target("avx512f"))) float fma_loop_avx512(int64_t iters, float seed) {
  __m512 a[16];
  const __m512 x = _mm512_set1_ps(1.0f + seed * 1e-9f), y = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps(float(i) * seed);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps(a[i], x, y);
  }
  __m512 s = a[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) float fma_loop_avx2(int64_t iters, float seed) {
  __m256 a[12];
  const __m256 x = _mm256_set1_ps(1.0f + seed * 1e-9f), y = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(float(i) * seed);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], x, y);
  }
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
}

// vdpbf16ps: 32 bf16 pairs per instruction into 16 fp32 lanes = 64 FLOP (a multiply and an add
// per pair).
__attribute__((target("avx512f,avx512bf16"))) float bf16_loop(int64_t iters, float seed) {
  __m512 a[16];
  const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3380);
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps(float(i) * seed);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
  }
  __m512 s = a[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}

// Sum of a buffer with vector loads, 8 chains (an add per load: the loads are the limit).
__attribute__((target("avx512f"))) float read_avx512(const float* p, int64_t n, int64_t passes) {
  __m512 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_ps();
  for (int64_t r = 0; r < passes; ++r)
    for (int64_t j = 0; j + 128 <= n; j += 128) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) a[i] = _mm512_add_ps(a[i], _mm512_load_ps(p + j + 16 * i));
    }
  __m512 s = a[0];
  for (int i = 1; i < 8; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2"))) float read_avx2(const float* p, int64_t n, int64_t passes) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t r = 0; r < passes; ++r)
    for (int64_t j = 0; j + 64 <= n; j += 64) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) a[i] = _mm256_add_ps(a[i], _mm256_load_ps(p + j + 8 * i));
    }
  __m256 s = a[0];
  for (int i = 1; i < 8; ++i) s = _mm256_add_ps(s, a[i]);
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
}

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// Runs work(t, units) on `threads` threads and returns the wall seconds of the whole; units is
// calibrated on one thread so that a run lasts about `seconds`.
template <typename Work>
double timed_parallel(int threads, double seconds, int64_t* units, Work work) {
  int64_t u = 1;
  for (;;) {  // calibrate: double until one thread takes >= 1/8 of the target
    const auto t0 = Clock::now();
    work(0, u);
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    if (dt >= seconds / 8 || u >= (int64_t(1) << 40)) {
      u = int64_t(double(u) * seconds / (dt > 1e-9 ? dt : 1e-9)) + 1;
      break;
    }
    u *= 2;
  }
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      work(t, u);
    });
  while (ready.load() < threads) {
  }
  const auto t0 = Clock::now();
  go.store(true, std::memory_order_release);
  for (auto& th : pool) th.join();
  *units = u;
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void check_args(int threads, double seconds) {
  if (threads < 1 || threads > 1024)
    throw std::invalid_argument("pysparse.bench.roofline: threads must be in [1, 1024], got " +
                                std::to_string(threads));
  if (!(seconds > 0 && seconds <= 60))
    throw std::invalid_argument("pysparse.bench.roofline: seconds must be in (0, 60], got " +
                                std::to_string(seconds));
}

}  // namespace

bool bf16_dot_supported() {
  __builtin_cpu_init();
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
}

double probe_flops(const std::string& kind, int threads, double seconds) {
  check_args(threads, seconds);
  std::vector<float> sink(threads);
  int64_t iters = 0;
  double flop_per_iter = 0, dt = 0;
  if (kind == "fp32") {
    if (has_avx512()) {
      flop_per_iter = 16 * 32;  // 16 FMAs of 16 lanes, 2 FLOP each
      dt = timed_parallel(threads, seconds, &iters, [&](int t, int64_t u) { sink[t] = fma_loop_avx512(u, float(t + 1)); });
    } else if (has_avx2()) {
      flop_per_iter = 12 * 16;
      dt = timed_parallel(threads, seconds, &iters, [&](int t, int64_t u) { sink[t] = fma_loop_avx2(u, float(t + 1)); });
    } else {
      return 0.0;  // no vector FMA: no meaningful peak
    }
  } else if (kind == "bf16") {
    if (!bf16_dot_supported()) return 0.0;
    flop_per_iter = 16 * 64;
    dt = timed_parallel(threads, seconds, &iters, [&](int t, int64_t u) { sink[t] = bf16_loop(u, float(t + 1)); });
  } else {
    throw std::invalid_argument("pysparse.bench.roofline: unknown FLOP kind '" + kind + "': fp32 or bf16");
  }
  volatile float keep = 0;
  for (float s : sink) keep = keep + s;
  return double(threads) * double(iters) * flop_per_iter / dt / 1e9;
}

double probe_read_bandwidth(int64_t bytes_per_thread, int threads, double seconds) {
  check_args(threads, seconds);
  if (bytes_per_thread < 4096 || bytes_per_thread > (int64_t(1) << 34))
    throw std::invalid_argument("pysparse.bench.roofline: bytes per thread must be in [4 KiB, 16 GiB], got " +
                                std::to_string(bytes_per_thread));
  if (!has_avx2()) return 0.0;
  const int64_t n = bytes_per_thread / 512 * 128;  // floats, a multiple of 128 (one unrolled step)
  std::vector<float*> bufs(threads, nullptr);
  std::vector<float> sink(threads);
  struct Free { void operator()(float* p) const { std::free(p); } };
  std::vector<std::unique_ptr<float, Free>> owners;
  for (int t = 0; t < threads; ++t) {
    float* p = static_cast<float*>(std::aligned_alloc(64, size_t(n) * sizeof(float)));
    if (!p) throw std::bad_alloc();
    owners.emplace_back(p);
    bufs[t] = p;
  }
  // Touch each buffer from its own thread (first touch places the pages near that core).
  std::vector<std::thread> init;
  for (int t = 0; t < threads; ++t)
    init.emplace_back([&, t] { for (int64_t j = 0; j < n; ++j) bufs[t][j] = float(j & 7); });
  for (auto& th : init) th.join();
  const bool wide = has_avx512();
  int64_t passes = 0;
  const double dt = timed_parallel(threads, seconds, &passes, [&](int t, int64_t u) {
    sink[t] = wide ? read_avx512(bufs[t], n, u) : read_avx2(bufs[t], n, u);
  });
  volatile float keep = 0;
  for (float s : sink) keep = keep + s;
  return double(threads) * double(passes) * double(n) * 4.0 / dt / 1e9;
}

}  // namespace cpu
}  // namespace pysparse
