// A per-process memo of sparse index tensors that already passed their check, for the GPU
// launchers (the Python ones keep the same memo in pysparse/_checked.py).
//
// Why: a GPU op can only raise on a bad index after reading a verdict back from the device, which
// synchronises the host with the stream. Once per call that costs a round trip comparable to a
// decode-sized product and makes the op impossible to capture in a CUDA graph. The CPU kernels
// check indices as they read them, for free, and do not need this. So a GPU launcher checks a
// matrix's indices on its first use and remembers them here, keyed by the index tensors
// themselves (weak references: an entry dies with its tensors, and a new tensor can never take a
// dead one's place) and by their version counters, which every in-place write bumps, so a changed
// matrix is checked again. Writes that bypass the version counter (through `.data`, DLPack or a
// shared numpy array) are not seen; the kernels still clamp every index they read, so such a write
// can give wrong numbers but never an out-of-bounds access. Inference tensors carry no version
// counter and are never remembered (checked on every call). An entry can also hold a tensor the
// launcher derived from the indices (the CSR launcher's row order), so that it is made once too.
// Thread-safe.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>

namespace pysparse {

class CheckedIndices {
 public:
  explicit CheckedIndices(size_t capacity = 4096) : capacity_(capacity) {}

  // What remember() stored for (a, b, param) if neither tensor changed since; nullopt otherwise.
  std::optional<at::Tensor> find(const at::Tensor& a, const at::Tensor& b, int64_t param) {
    if (!trackable(a) || !trackable(b)) return std::nullopt;
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = entries_.find(key(a, b, param));
    if (it == entries_.end() || !it->second.a.matches(a) || !it->second.b.matches(b)) return std::nullopt;
    return it->second.derived;
  }

  // Records that (a, b, param) passed its check at the tensors' current versions.
  void remember(const at::Tensor& a, const at::Tensor& b, int64_t param, at::Tensor derived = {}) {
    if (!trackable(a) || !trackable(b)) return;
    std::lock_guard<std::mutex> lock(mu_);
    const Key k = key(a, b, param);
    entries_.erase(k);
    evict();
    entries_.emplace(k, Entry{Seen(a), Seen(b), std::move(derived), ++clock_});
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return entries_.size();
  }

 private:
  static bool trackable(const at::Tensor& t) { return t.defined() && !t.is_inference(); }

  // One tensor as it was when checked.
  struct Seen {
    c10::weak_intrusive_ptr<c10::TensorImpl> impl;
    int64_t version;
    const void* data;
    int64_t numel;
    at::ScalarType dtype;

    explicit Seen(const at::Tensor& t)
        : impl(t.getIntrusivePtr()), version(t._version()), data(t.const_data_ptr()), numel(t.numel()),
          dtype(t.scalar_type()) {}
    bool alive() const { return !impl.expired(); }
    bool matches(const at::Tensor& t) const {
      return alive() && version == t._version() && data == t.const_data_ptr() && numel == t.numel() &&
             dtype == t.scalar_type();
    }
  };
  struct Entry {
    Seen a, b;
    at::Tensor derived;
    uint64_t stamp;  // insertion order, for eviction
  };
  // Keyed by the TensorImpl addresses: while an entry's weak references live, the memory of its
  // TensorImpls is never reused, so no other tensor can have the same key.
  using Key = std::tuple<const c10::TensorImpl*, const c10::TensorImpl*, int64_t>;
  static Key key(const at::Tensor& a, const at::Tensor& b, int64_t param) {
    return {a.unsafeGetTensorImpl(), b.unsafeGetTensorImpl(), param};
  }

  // Drops the entries whose tensors died (they may hold a derived tensor's memory), then, while
  // full, the oldest (checked again if used again). Runs on a miss only, next to a host sync.
  void evict() {
    for (auto it = entries_.begin(); it != entries_.end();)
      it = it->second.a.alive() && it->second.b.alive() ? std::next(it) : entries_.erase(it);
    if (entries_.size() < capacity_) return;
    auto oldest = entries_.begin();
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (it->second.stamp < oldest->second.stamp) oldest = it;
    entries_.erase(oldest);
  }

  size_t capacity_;
  uint64_t clock_ = 0;
  std::mutex mu_;
  std::map<Key, Entry> entries_;
};

}  // namespace pysparse
