// A CPU emulator for pysparse's CUDA device code, for tests on machines without a GPU (CI).
//
// It runs a __global__ function over a grid the way the hardware would, one thread per lane, on the
// host: each warp's lanes are fibers (ucontext) on one OS thread, switched at every warp shuffle so
// that all lanes of the warp deposit their value before any reads one (double-buffered, so a lane
// that runs ahead to its next shuffle cannot overwrite a value another lane has yet to read).
// Blocks and warps run one after another. What it checks beyond the results: a shuffle must be
// reached by every lane of the warp, at the same call site, with the full mask (a lane that has
// returned, or lanes diverged across branches, is reported), vector loads must be aligned to their
// size (load_vector in the kernels), and the kernel may only use the built-ins defined here
// (anything else fails to compile). What it cannot check: timing,
// coalescing, the memory model, races between blocks.
//
// The CUDA headers (cuda_fp16.h, cuda_bf16.h, vector_types.h) compile as host code; this file adds
// threadIdx / blockIdx / blockDim / gridDim, __shfl_sync, __shfl_xor_sync, atomicOr, atomicMin,
// __popc and __launch_bounds__, then `pysparse_emu::launch(grid, block, kernel, args...)`.
#pragma once
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// Device code that wants the emulator to check something only it can (load_vector's alignment).
#define PYSPARSE_CUDA_EMU 1

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace pysparse_emu {

constexpr int kWarp = 32;
constexpr size_t kStack = 64 * 1024;

struct Warp {
  ucontext_t scheduler;
  ucontext_t lane_ctx[kWarp];
  std::vector<char> stacks[kWarp];
  int lanes = 0;          // lanes in this warp (the last warp of a block may be partial)
  int current = 0;        // lane now running
  bool finished[kWarp];   // returned from the kernel
  bool at_shuffle[kWarp]; // yielded inside __shfl_sync
  int round[kWarp];       // shuffles this lane has done (selects the buffer)
  void* site[kWarp];      // where the lane's pending shuffle was called from
  alignas(16) unsigned char slot[2][kWarp][16];
  std::string error;
  const std::function<void()>* body = nullptr;  // runs the kernel for the current lane's thread index
};

inline thread_local Warp* tl_warp = nullptr;

inline void lane_entry() {
  Warp& w = *tl_warp;
  (*w.body)();
  w.finished[w.current] = true;
}

// Runs one warp: lanes [0, lanes) with thread indices first_thread + lane in a block of `block`.
inline void run_warp(Warp& w, const dim3& block, unsigned first_thread, const std::function<void()>& kernel_call) {
  tl_warp = &w;
  w.error.clear();
  w.body = &kernel_call;
  for (int l = 0; l < w.lanes; ++l) {
    w.finished[l] = w.at_shuffle[l] = false;
    w.round[l] = 0;
    w.stacks[l].resize(kStack);
    getcontext(&w.lane_ctx[l]);
    w.lane_ctx[l].uc_stack.ss_sp = w.stacks[l].data();
    w.lane_ctx[l].uc_stack.ss_size = kStack;
    w.lane_ctx[l].uc_link = &w.scheduler;
    makecontext(&w.lane_ctx[l], lane_entry, 0);
  }
  // Rounds: every unfinished lane runs until its next shuffle or its end. A round in which some
  // lanes shuffled and others had already finished is a shuffle that not every lane reached.
  for (;;) {
    int shuffled = 0;
    void* site = nullptr;
    bool one_site = true;
    for (int l = 0; l < w.lanes; ++l) {
      if (w.finished[l]) continue;
      w.current = l;
      w.at_shuffle[l] = false;
      const unsigned t = first_thread + unsigned(l);  // built-ins are per OS thread: set per switch
      threadIdx.x = t % block.x;
      threadIdx.y = t / block.x % block.y;
      threadIdx.z = t / (block.x * block.y);
      swapcontext(&w.scheduler, &w.lane_ctx[l]);
      if (w.at_shuffle[l]) {
        if (shuffled++ == 0) site = w.site[l];
        one_site = one_site && w.site[l] == site;
      }
    }
    if (shuffled != 0 && shuffled != w.lanes && w.error.empty())
      w.error = "__shfl_sync reached by " + std::to_string(shuffled) + " of " + std::to_string(w.lanes) +
                " lanes (the others returned or diverged)";
    if (!one_site && w.error.empty()) w.error = "__shfl_sync called from different places by lanes of one warp";
    // Done when every lane ran to its end. After an error the warp is abandoned mid-kernel (its
    // lanes hold no resources): resuming would feed lanes values no lane deposited.
    if (shuffled == 0 || !w.error.empty()) break;
  }
}

// A vector load must be aligned to its size: on a GPU a misaligned one is a fatal "misaligned
// address" error, on this CPU it would silently work.
inline void check_vector_load(const void* p, size_t bytes) {
  if (uintptr_t(p) % bytes != 0 && tl_warp->error.empty())
    tl_warp->error = "misaligned " + std::to_string(bytes) + "-byte vector load";
}

// Launches kernel(args...) over grid x block. Returns an empty string, or what went wrong (the
// launch stops at the first warp that goes wrong).
template <typename... P, typename... A>
std::string launch(dim3 grid, dim3 block, void (*kernel)(P...), A... args) {
  Warp w;
  const unsigned threads = block.x * block.y * block.z;
  const std::function<void()> call = [&]() { kernel(P(args)...); };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx)
        for (unsigned first = 0; first < threads; first += kWarp) {
          w.lanes = int(threads - first < unsigned(kWarp) ? threads - first : unsigned(kWarp));
          blockIdx.x = bx, blockIdx.y = by, blockIdx.z = bz;
          blockDim = block, gridDim = grid;
          run_warp(w, block, first, call);
          if (!w.error.empty()) return w.error;
        }
  return std::string();
}

}  // namespace pysparse_emu

namespace pysparse_emu {
// The value `var` held by lane `src` of the calling warp, once every lane has deposited its own;
// `site` is the caller's call site.
template <typename V>
V shuffle(unsigned mask, V var, int src, int width, void* site) {
  static_assert(sizeof(V) <= 16, "emulated shuffles move at most 16 bytes");
  Warp& w = *tl_warp;
  const int lane = w.current;
  if ((mask != 0xffffffffu || width != 32) && w.error.empty()) w.error = "__shfl_sync with a partial mask or width";
  unsigned char (*buf)[16] = w.slot[w.round[lane] & 1];
  std::memcpy(buf[lane], &var, sizeof(V));
  w.at_shuffle[lane] = true;
  w.site[lane] = site;
  swapcontext(&w.lane_ctx[lane], &w.scheduler);  // resumes once every lane has deposited
  V out;
  const int from = src & (kWarp - 1);
  std::memcpy(&out, buf[from < w.lanes ? from : lane], sizeof(V));
  ++w.round[lane];
  return out;
}
}  // namespace pysparse_emu

// __shfl_sync(mask, var, src) and __shfl_xor_sync(mask, var, lane_mask): only the full mask and
// width (the only forms pysparse uses); anything else is an error. Not inlined, so that the return
// address names the call site (lanes of one warp shuffling at two different places is an error the
// hardware would not forgive either). That check follows the host compiler's code: the test pins
// g++ -O1, at which it neither merges two branches' calls nor duplicates a loop holding one.
template <typename V>
__attribute__((noinline)) V __shfl_sync(unsigned mask, V var, int src, int width = 32) {
  return pysparse_emu::shuffle(mask, var, src, width, __builtin_return_address(0));
}
template <typename V>
__attribute__((noinline)) V __shfl_xor_sync(unsigned mask, V var, int lane_mask, int width = 32) {
  return pysparse_emu::shuffle(mask, var, pysparse_emu::tl_warp->current ^ lane_mask, width,
                               __builtin_return_address(0));
}

// Lanes of one warp run one at a time, so plain read-modify-writes are atomic here.
inline int atomicOr(int* p, int v) { const int old = *p; *p = old | v; return old; }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const auto old = *p;
  if (v < old) *p = v;
  return old;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
