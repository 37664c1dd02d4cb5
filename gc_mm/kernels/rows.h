// What gc_mm's fused CPU steps share: the loop over a tensor's rows (output
// units) that sums each row's mean while the row before it is updated, the
// split of rows among threads, and the dispatch of run-time options to
// compile-time cases. sgd.cpp and adaptive.cpp are the steps.
//
// A kernel updates one tensor at a time. Centralized, it walks the rows in
// order: a row's sum is taken in the same loop that updates the row before
// it, and the row is updated next while it is still in cache, so every
// tensor comes from memory once and the reads of one row overlap the
// writes of the other (a pass of its own for the sums, reads alone, left
// memory idle; docs/benchmark.md has the numbers).
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace gc_mm {

// How many threads the last call's parallel loop ran on, for the tests (a
// build without OpenMP runs every loop on one thread).
inline std::atomic<int> last_step_threads{0};

// at::parallel_for that records how many threads ran f.
template <typename F>
void counted_parallel_for(int64_t begin, int64_t end, int64_t grain,
                          const F& f) {
  std::atomic<int> threads{0};
  at::parallel_for(begin, end, grain, [&](int64_t first, int64_t last) {
    threads.fetch_add(1, std::memory_order_relaxed);
    f(first, last);
  });
  last_step_threads.store(threads.load(), std::memory_order_relaxed);
}

// Elements per parallel task: below this a thread costs more than it saves.
constexpr int64_t kGrainElements = 1 << 15;
// Partial sums of a row: kLanes independent ones, so the compiler can
// vectorize (one running sum is a chain of dependent adds it may not
// reorder), each over at most kBlock / kLanes elements before it is added
// to a double, so the mean stays about as exact as torch's.
constexpr int kLanes = 16;
constexpr int64_t kBlock = kLanes * 64;

// How far ahead a sweep asks for its memory. The hardware prefetcher alone
// keeps too few loads in flight for a loop that runs many instructions per
// element: SGD's centralized sweep (the next row's sum beside the update)
// ran 5-10% slower than the same sweep without GC, and the adaptive steps
// only level with torch's fused Adam; asking 2 KiB ahead brought both
// below torch's fused steps (docs/benchmark.md). SGD's sweep without GC, a
// few instructions per element, is left to the hardware: asking ahead made
// it 13-20% slower.
constexpr std::uintptr_t kPrefetchBytes = 2048;
constexpr std::uintptr_t kCacheLineBytes = 64;

// Asks the cache for the lines of p[i, i + kLanes) kPrefetchBytes ahead. A
// prefetch never faults; the address is computed as an integer, since it
// may lie past the end of the tensor.
template <typename scalar_t>
inline void prefetch_lanes(const scalar_t* p, int64_t i) {
  const std::uintptr_t at =
      reinterpret_cast<std::uintptr_t>(p) + i * sizeof(scalar_t) +
      kPrefetchBytes;
  for (std::uintptr_t line = 0; line < kLanes * sizeof(scalar_t);
       line += kCacheLineBytes) {
    __builtin_prefetch(reinterpret_cast<const void*>(at + line));
  }
}

// Elementwise, not centralized: update(offset, count) over blocks of the
// flat tensor, split among threads.
template <typename Update>
void for_blocks(int64_t numel, const Update& update) {
  counted_parallel_for(0, numel, kGrainElements,
                       [&](int64_t begin, int64_t end) {
                         update(begin, end - begin);
                       });
}

// Centralized: rows split among threads; in each thread's range,
// sum_first(row) sums its first row alone and update(row, mean, sum_next)
// updates a row given its mean and, if sum_next, returns the sum of the
// next row (taken in the same loop). A row's sum has the same rounding
// whether taken alone or beside an update, so results do not depend on how
// rows fall to threads.
template <typename SumFirst, typename Update>
void for_rows(int64_t rows, int64_t cols, const SumFirst& sum_first,
              const Update& update) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / cols);
  counted_parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    double sum = sum_first(begin);
    for (int64_t row = begin; row < end; ++row) {
      sum = update(row, sum / cols, row + 1 < end);
    }
  });
}

// Calls step(i, rows, cols) for each non-empty tensor of a list, as the
// rows GC centralizes (the slices of dim 0; a 1-D tensor is one row) of
// cols elements.
template <typename Step>
void for_each_tensor(const std::vector<at::Tensor>& tensors,
                     const Step& step) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    const int64_t rows = t.dim() > 1 ? t.size(0) : 1;
    step(i, rows, t.numel() / rows);
  }
}

// Calls f with std::integral_constant<decltype(value), value>, so a run-time
// option picks a compile-time instantiation: a run-time test inside the
// loops made the compiler give up hoisting it and the step slowed down.
template <typename T, T... kValues, typename F>
void with_constant(T value, F&& f) {
  ((value == kValues ? f(std::integral_constant<T, kValues>{}) : void()),
   ...);
}

inline void check_like(const at::Tensor& t, const at::Tensor& param,
                       const char* kernel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                  t.scalar_type() == param.scalar_type() &&
                  t.numel() == param.numel(),
              "gc_mm ", kernel, ": ", name, " must be a contiguous CPU "
              "tensor of the parameter's dtype and size");
}

// What every kernel module tells Python: the threads of its last call,
// whether it runs on several, and the torch it was compiled against (an
// install-time build is not used with another one; gc_mm/kernels).
inline void describe_build(pybind11::module& m) {
  m.def("last_step_threads", [] { return last_step_threads.load(); },
        "How many threads the last step's loop ran on");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace gc_mm
