// The fused SGD step with Gradient Centralization, for CPU tensors.
//
// One call updates one tensor, row (output unit) by row:
//
//   d   = g + wd * w - mean(row of g + wd * w)   (wd only if coupled, the
//                                                 mean only if centralized)
//   buf = d                                      (first step)
//   buf = momentum * buf + (1 - dampening) * d   (later steps)
//   dir = nesterov ? d + momentum * buf : buf    (d without momentum)
//   w   = (1 - lr * wd) * w - lr * dir           (1 - lr * wd if decoupled)
//
// A row's mean is summed while the row before it is updated, in the same
// loop, and the row is updated next while it is still in cache. So g, w and
// buf come from memory once and w, buf are written once, the least traffic
// a GC step can have, and the reads of one row overlap the writes of the
// other (a pass of its own for the sums, reads alone, left memory idle;
// docs/benchmark.md has the numbers). The gradient is not modified. Rows are
// split among threads with at::parallel_for. These are the maths of
// gc_mm/centralize.py and SGD's plain path, fused; the parity tests hold
// all three to the same float64 reference.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <type_traits>

namespace {

// How many threads the last call's parallel loop ran on, for the tests (a
// build without OpenMP runs every loop on one thread).
std::atomic<int> last_step_threads{0};

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
// Partial sums of the row mean: kLanes independent ones, so the compiler
// can vectorize (one running sum is a chain of dependent adds it may not
// reorder), each over at most kBlock / kLanes elements before it is added
// to a double, so the mean stays about as exact as torch's.
constexpr int kLanes = 16;
constexpr int64_t kBlock = kLanes * 64;

// What a sweep does to its row: nothing (it only sums the next one), the
// update without momentum, the first step of momentum (the buffer is
// written, not read) or a later one.
enum class Update { kNone, kPlain, kFirstStep, kMomentum };
enum class Decay { kNone, kCoupled, kDecoupled };

template <typename scalar_t>
struct Coefficients {
  scalar_t weight_decay, keep;  // keep = 1 - lr * wd (decoupled decay)
  scalar_t lr, momentum, new_part;  // new_part = 1 - dampening
};

// One sweep over n elements of a row: updates w, buf (kUpdate) given the
// row's mean and, with kSum, returns the sum of the next row's directions,
// g_next + wd * w_next. Every option is a template parameter: a run-time
// test inside this loop (Nesterov, decoupled decay) made the compiler give
// up hoisting it and the step slowed down. A row's sum has the
// same rounding whether taken alone (a thread's first row) or beside an
// update, so results do not depend on how rows fall to threads.
// __restrict__ (param, grad and buffer are distinct tensors, the two rows
// distinct ranges) lets the compiler vectorize without overlap checks; the
// update is written out here, not called, so that it keeps them.
template <typename scalar_t, Update kUpdate, Decay kDecay, bool kNesterov,
          bool kSum>
double sweep(scalar_t* __restrict__ w, const scalar_t* __restrict__ g,
             scalar_t* __restrict__ buf, const scalar_t* __restrict__ g_next,
             const scalar_t* __restrict__ w_next, int64_t n, scalar_t mean,
             const Coefficients<scalar_t> c) {
  constexpr bool kCoupled = kDecay == Decay::kCoupled;
#define GC_MM_DIRECTION(g, w, i) \
  (kCoupled ? g[i] + c.weight_decay * w[i] : g[i])
#define GC_MM_UPDATE(i)                                                  \
  if constexpr (kUpdate != Update::kNone) {                              \
    const scalar_t d = GC_MM_DIRECTION(g, w, i) - mean;                  \
    scalar_t dir = d;                                                    \
    if constexpr (kUpdate == Update::kFirstStep) {                       \
      buf[i] = d;                                                        \
      if constexpr (kNesterov) dir = d + c.momentum * d;                 \
    } else if constexpr (kUpdate == Update::kMomentum) {                 \
      const scalar_t b = c.momentum * buf[i] + c.new_part * d;           \
      buf[i] = b;                                                        \
      dir = kNesterov ? d + c.momentum * b : b;                          \
    }                                                                    \
    w[i] = (kDecay == Decay::kDecoupled ? c.keep * w[i] : w[i]) -        \
           c.lr * dir;                                                   \
  }
  double total = 0;
  for (int64_t i = 0; i < n;) {
    const int64_t end = std::min(n, i + kBlock);
    scalar_t part[kLanes] = {};
    for (; i + kLanes <= end; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        if constexpr (kSum) part[k] += GC_MM_DIRECTION(g_next, w_next, i + k);
        GC_MM_UPDATE(i + k)
      }
    }
    for (int k = 0; i < end; ++i, ++k) {
      if constexpr (kSum) part[k] += GC_MM_DIRECTION(g_next, w_next, i);
      GC_MM_UPDATE(i)
    }
    if constexpr (kSum) {
      for (int k = 0; k < kLanes; ++k) total += part[k];
    }
  }
#undef GC_MM_UPDATE
#undef GC_MM_DIRECTION
  return total;
}

template <typename scalar_t, Update kUpdate, Decay kDecay, bool kNesterov>
void sgd_step(scalar_t* w, const scalar_t* g, scalar_t* buf, int64_t rows,
              int64_t cols, bool centralize, const Coefficients<scalar_t>& c) {
  if (!centralize) {
    counted_parallel_for(
        0, rows * cols, kGrainElements, [&](int64_t begin, int64_t end) {
          sweep<scalar_t, kUpdate, kDecay, kNesterov, false>(
              w + begin, g + begin, buf ? buf + begin : nullptr, nullptr,
              nullptr, end - begin, scalar_t(0), c);
        });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElements / cols);
  counted_parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // A thread's first row is summed alone, each later one beside the
    // update of the row before it.
    double sum = sweep<scalar_t, Update::kNone, kDecay, false, true>(
        nullptr, nullptr, nullptr, g + begin * cols, w + begin * cols, cols,
        scalar_t(0), c);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t at = row * cols;
      const scalar_t mean = scalar_t(sum / cols);
      scalar_t* const row_buf = buf ? buf + at : nullptr;
      if (row + 1 < end) {
        sum = sweep<scalar_t, kUpdate, kDecay, kNesterov, true>(
            w + at, g + at, row_buf, g + at + cols, w + at + cols, cols, mean,
            c);
      } else {
        sweep<scalar_t, kUpdate, kDecay, kNesterov, false>(
            w + at, g + at, row_buf, nullptr, nullptr, cols, mean, c);
      }
    }
  });
}

// Calls f with std::integral_constant<decltype(value), value>, so a run-time
// option picks a compile-time instantiation.
template <typename T, T... kValues, typename F>
void with_constant(T value, F&& f) {
  ((value == kValues ? f(std::integral_constant<T, kValues>{}) : void()),
   ...);
}

template <typename scalar_t>
void sgd_step(scalar_t* w, const scalar_t* g, scalar_t* buf, int64_t rows,
              int64_t cols, bool centralize, double lr, double weight_decay,
              double momentum, double dampening, bool nesterov,
              bool decoupled, bool first_step) {
  const Coefficients<scalar_t> c{
      scalar_t(weight_decay), scalar_t(1 - lr * weight_decay), scalar_t(lr),
      scalar_t(momentum), scalar_t(1 - dampening)};
  const Update update = buf == nullptr ? Update::kPlain
                        : first_step   ? Update::kFirstStep
                                       : Update::kMomentum;
  const Decay decay = weight_decay == 0 ? Decay::kNone
                      : decoupled       ? Decay::kDecoupled
                                        : Decay::kCoupled;
  with_constant<Update, Update::kPlain, Update::kFirstStep,
                Update::kMomentum>(update, [&](auto kUpdate) {
    with_constant<Decay, Decay::kNone, Decay::kCoupled, Decay::kDecoupled>(
        decay, [&](auto kDecay) {
          with_constant<bool, false, true>(nesterov, [&](auto kNesterov) {
            sgd_step<scalar_t, kUpdate, kDecay, kNesterov>(
                w, g, buf, rows, cols, centralize, c);
          });
        });
  });
}

void check(const at::Tensor& t, const at::Tensor& param, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                  t.scalar_type() == param.scalar_type() &&
                  t.numel() == param.numel(),
              "gc_mm fused SGD: ", name, " must be a contiguous CPU tensor "
              "of the parameter's dtype and size");
}

// momentum_buffer is None when momentum is 0; on the first step it is
// written, not read.
void sgd_gc_step(at::Tensor param, const at::Tensor& grad,
                 c10::optional<at::Tensor> momentum_buffer, bool centralize,
                 double lr, double weight_decay, double momentum,
                 double dampening, bool nesterov, bool decoupled,
                 bool first_step) {
  check(param, param, "param");
  check(grad, param, "grad");
  TORCH_CHECK(momentum_buffer.has_value() == (momentum != 0),
              "gc_mm fused SGD: a momentum_buffer is needed iff momentum "
              "!= 0");
  if (momentum_buffer.has_value()) {
    check(*momentum_buffer, param, "momentum_buffer");
  }
  if (param.numel() == 0) return;
  const int64_t rows = param.dim() > 1 ? param.size(0) : 1;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_gc_step", [&] {
    sgd_step<scalar_t>(
        param.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
        momentum_buffer.has_value() ? momentum_buffer->data_ptr<scalar_t>()
                                    : nullptr,
        rows, param.numel() / rows, centralize, lr, weight_decay, momentum,
        dampening, nesterov, decoupled, first_step);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgd_gc_step", &sgd_gc_step,
        "One fused SGD step with Gradient Centralization, in place");
  m.def("last_step_threads", [] { return last_step_threads.load(); },
        "How many threads the last sgd_gc_step's loop over rows ran on");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  // The torch this was compiled against: an install-time build is not used
  // with another one (gc_mm/kernels/__init__.py).
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}
