// The fused SGD step with Gradient Centralization, for CPU tensors.
//
// One call steps a list of tensors, each row (output unit) by row (rows.h:
// one pass over memory, rows split among threads):
//
//   d   = g + wd * w - mean(row of g + wd * w)   (decay 'inside_gc'; the
//                                                 mean only if centralized)
//   d   = g - mean(row of g) + wd * w            ('after_gc': torch's SGD
//                                                 on a centralized gradient)
//   buf = d                                      (first step)
//   buf = momentum * buf + (1 - dampening) * d   (later steps)
//   dir = nesterov ? d + momentum * buf : buf    (d without momentum)
//   w   = (1 - lr * wd) * w - lr * dir           (1 - lr * wd if 'decoupled')
//
// The gradient is not modified. These are the maths of gc_mm/centralize.py
// and SGD's plain path, fused; the parity tests hold all three to the same
// float64 reference.
#include "rows.h"

namespace {

using namespace gc_mm;

// What a sweep does to its row: nothing (it only sums the next one), the
// update without momentum, the first step of momentum (the buffer is
// written, not read) or a later one.
enum class Update { kNone, kPlain, kFirstStep, kMomentum };
// Where the decay goes: into the centralized direction (SGD_GC), added
// after GC (torch's SGD on a centralized gradient, GCOptimWrapper) or
// decoupled (SGDW).
enum class Decay { kNone, kInsideGC, kAfterGC, kDecoupled };

template <typename scalar_t>
struct Coefficients {
  scalar_t weight_decay, keep;  // keep = 1 - lr * wd (decoupled decay)
  scalar_t lr, momentum, new_part;  // new_part = 1 - dampening
};

// One sweep over n elements of a row: updates w, buf (kUpdate) given the
// row's mean and, with kSum, returns the sum of the next row's centralized
// quantity (g_next + wd * w_next inside GC, else g_next). __restrict__
// (param, grad and buffer are distinct tensors, the two rows distinct
// ranges) lets the compiler vectorize without overlap checks; the update
// is written out here, not called, so that it keeps them.
template <typename scalar_t, Update kUpdate, Decay kDecay, bool kNesterov,
          bool kSum>
double sweep(scalar_t* __restrict__ w, const scalar_t* __restrict__ g,
             scalar_t* __restrict__ buf, const scalar_t* __restrict__ g_next,
             const scalar_t* __restrict__ w_next, int64_t n, scalar_t mean,
             const Coefficients<scalar_t> c) {
  constexpr bool kInside = kDecay == Decay::kInsideGC;
#define GC_MM_CENTRALIZED(g, w, i) \
  (kInside ? g[i] + c.weight_decay * w[i] : g[i])
#define GC_MM_UPDATE(i)                                                  \
  if constexpr (kUpdate != Update::kNone) {                              \
    scalar_t d = GC_MM_CENTRALIZED(g, w, i) - mean;                      \
    if constexpr (kDecay == Decay::kAfterGC) d += c.weight_decay * w[i]; \
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
      if constexpr (kSum) {  // its streams from memory, asked for ahead
        prefetch_lanes(g_next, i);
        prefetch_lanes(w_next, i);
        if constexpr (kUpdate == Update::kMomentum) prefetch_lanes(buf, i);
      }
      for (int k = 0; k < kLanes; ++k) {
        if constexpr (kSum) {
          part[k] += GC_MM_CENTRALIZED(g_next, w_next, i + k);
        }
        GC_MM_UPDATE(i + k)
      }
    }
    for (int k = 0; i < end; ++i, ++k) {
      if constexpr (kSum) part[k] += GC_MM_CENTRALIZED(g_next, w_next, i);
      GC_MM_UPDATE(i)
    }
    if constexpr (kSum) {
      for (int k = 0; k < kLanes; ++k) total += part[k];
    }
  }
#undef GC_MM_UPDATE
#undef GC_MM_CENTRALIZED
  return total;
}

template <typename scalar_t, Update kUpdate, Decay kDecay, bool kNesterov>
void sgd_step(scalar_t* w, const scalar_t* g, scalar_t* buf, int64_t rows,
              int64_t cols, bool centralize, const Coefficients<scalar_t>& c) {
  if (!centralize) {
    for_blocks(rows * cols, [&](int64_t at, int64_t n) {
      sweep<scalar_t, kUpdate, kDecay, kNesterov, false>(
          w + at, g + at, buf ? buf + at : nullptr, nullptr, nullptr, n,
          scalar_t(0), c);
    });
    return;
  }
  const auto sum_first = [&](int64_t row) {
    return sweep<scalar_t, Update::kNone, kDecay, false, true>(
        nullptr, nullptr, nullptr, g + row * cols, w + row * cols, cols,
        scalar_t(0), c);
  };
  const auto update = [&](int64_t row, double mean, bool sum_next) {
    const int64_t at = row * cols;
    scalar_t* const row_buf = buf ? buf + at : nullptr;
    if (sum_next) {
      return sweep<scalar_t, kUpdate, kDecay, kNesterov, true>(
          w + at, g + at, row_buf, g + at + cols, w + at + cols, cols,
          scalar_t(mean), c);
    }
    return sweep<scalar_t, kUpdate, kDecay, kNesterov, false>(
        w + at, g + at, row_buf, nullptr, nullptr, cols, scalar_t(mean), c);
  };
  for_rows(rows, cols, sum_first, update);
}

Decay parse_decay(const std::string& decay, double weight_decay) {
  if (weight_decay == 0 || decay == "none") return Decay::kNone;
  if (decay == "inside_gc") return Decay::kInsideGC;
  if (decay == "after_gc") return Decay::kAfterGC;
  TORCH_CHECK(decay == "decoupled", "gc_mm fused SGD: decay must be 'none', "
              "'inside_gc', 'after_gc' or 'decoupled', got '", decay, "'");
  return Decay::kDecoupled;
}

template <typename scalar_t>
void sgd_step(scalar_t* w, const scalar_t* g, scalar_t* buf, int64_t rows,
              int64_t cols, bool centralize, double lr, double weight_decay,
              Decay decay, double momentum, double dampening, bool nesterov,
              bool first_step) {
  const Coefficients<scalar_t> c{
      scalar_t(weight_decay), scalar_t(1 - lr * weight_decay), scalar_t(lr),
      scalar_t(momentum), scalar_t(1 - dampening)};
  const Update update = buf == nullptr ? Update::kPlain
                        : first_step   ? Update::kFirstStep
                                       : Update::kMomentum;
  with_constant<Update, Update::kPlain, Update::kFirstStep,
                Update::kMomentum>(update, [&](auto kUpdate) {
    with_constant<Decay, Decay::kNone, Decay::kInsideGC, Decay::kAfterGC,
                  Decay::kDecoupled>(decay, [&](auto kDecay) {
      with_constant<bool, false, true>(nesterov, [&](auto kNesterov) {
        sgd_step<scalar_t, kUpdate, kDecay, kNesterov>(w, g, buf, rows, cols,
                                                       centralize, c);
      });
    });
  });
}

void check_tensors(const at::Tensor& param, const at::Tensor& grad,
                   const c10::optional<at::Tensor>& momentum_buffer,
                   double momentum) {
  const char* kernel = "fused SGD";
  check_like(param, param, kernel, "param");
  check_like(grad, param, kernel, "grad");
  TORCH_CHECK(momentum_buffer.has_value() == (momentum != 0),
              "gc_mm fused SGD: a momentum_buffer is needed iff momentum "
              "!= 0");
  if (momentum_buffer.has_value()) {
    check_like(*momentum_buffer, param, kernel, "momentum_buffer");
  }
}

// The step of a list of tensors, in one call (Python between the tensors
// of a large model runs with a cache the step has just flushed, which cost
// more than the step's own overhead). Every tensor is checked before any
// moves. Per tensor: centralize, and first_step (its buffer is written, not
// read); a buffer is None when momentum is 0. decay: 'none', 'inside_gc',
// 'after_gc', 'decoupled'.
void sgd_gc_steps(const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& grads,
                  const std::vector<c10::optional<at::Tensor>>& buffers,
                  const std::vector<bool>& centralize,
                  const std::vector<bool>& first_step, double lr,
                  double weight_decay, const std::string& decay,
                  double momentum, double dampening, bool nesterov) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && buffers.size() == n &&
                  centralize.size() == n && first_step.size() == n,
              "gc_mm fused SGD: the lists must have one entry per param");
  const Decay parsed = parse_decay(decay, weight_decay);
  for (size_t i = 0; i < n; ++i) {
    check_tensors(params[i], grads[i], buffers[i], momentum);
  }
  for_each_tensor(params, [&](size_t i, int64_t rows, int64_t cols) {
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "sgd_gc_steps", [&] {
      sgd_step<scalar_t>(
          params[i].data_ptr<scalar_t>(), grads[i].data_ptr<scalar_t>(),
          buffers[i].has_value() ? buffers[i]->data_ptr<scalar_t>()
                                 : nullptr,
          rows, cols, centralize[i], lr, weight_decay, parsed, momentum,
          dampening, nesterov, first_step[i]);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgd_gc_steps", &sgd_gc_steps,
        "One fused SGD step with Gradient Centralization of each tensor of "
        "a list, in place");
  gc_mm::describe_build(m);
}
