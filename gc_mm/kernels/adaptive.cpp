// The fused step of the adaptive optimizers with Gradient Centralization
// (Adam, both AdamW rules, RAdam's rectified steps, Adagrad), for CPU
// tensors. One call steps a list of tensors, each row (output unit) by
// row, in one pass over memory with rows split among threads (rows.h):
//
//   d = g + wd * w              decay 'inside_gc' (Adam_GC, Adagrad_GC, RAdam)
//   d = P(d)                    center 'gradient'
//   d = d + wd * w              decay 'after_gc' (torch's Adam on P(g))
//   m = beta1 * m + new1 * d    (with a first moment; else m is d: Adagrad)
//   v = beta2 * v + new2 * d^2
//   v = max(v_max, v)           (amsgrad; v_max keeps it)
//   u = m / (sqrt(v) * denom_scale + eps)
//   u = u + wd * w              decay 'in_update' (the authors' AdamW)
//   u = P(u)                    center 'update' (the "2" variants)
//   w = keep * w - step_size * u   (keep = 1 - lr * wd if 'decoupled', else 1)
//
// The caller turns each optimizer's rule into these numbers (bias
// corrections, RAdam's rectification, Adagrad's lr decay: each family's
// _update_kernel in gc_mm/optimizers/, through fused.adaptive_steps).
// Centralizing the gradient, a row's sum of d is taken while the row before
// it is updated; centralizing the update, a row's u is written to a
// per-thread scratch row (in cache) with its sum, then applied. Either way
// g, w and the moments come from memory once and w and the moments are
// written once, as in an update without GC. The gradient is not modified.
#include "rows.h"

#include <cmath>
#include <vector>

namespace {

using namespace gc_mm;

enum class Center { kNone, kGradient, kUpdate };
enum class Decay { kNone, kInsideGC, kAfterGC, kDecoupled, kInUpdate };

template <typename scalar_t>
struct Coefficients {
  scalar_t weight_decay, keep;
  scalar_t beta1, new1, beta2, new2;
  scalar_t denom_scale, eps, step_size;
};

// The tensors of one call; m and v_max may be null (no first moment, no
// amsgrad).
template <typename scalar_t>
struct Tensors {
  scalar_t* w;
  const scalar_t* g;
  scalar_t* m;
  scalar_t* v;
  scalar_t* v_max;
};

// What a sweep does to its row: nothing (it only sums the next row's
// gradient), the whole update, or the update u written to scratch (for GC
// of the update) with its sum returned.
enum class Sweep { kSumOnly, kUpdate, kToScratch };

// One sweep over a row of n elements (and, with kSumNext, the next row's
// g_next, w_next, summed). Options are template parameters (a run-time test
// in this loop kept the compiler from vectorizing it); __restrict__ on the
// parameters (GCC ignores it on local pointers) lets it vectorize without
// overlap checks, of which this loop would need more than it makes.
template <typename scalar_t, Sweep kSweep, bool kMoment1, bool kAmsgrad,
          Decay kDecay, bool kSumNext>
double sweep(scalar_t* __restrict__ w, const scalar_t* __restrict__ g,
             scalar_t* __restrict__ m, scalar_t* __restrict__ v,
             scalar_t* __restrict__ v_max,
             const scalar_t* __restrict__ g_next,
             const scalar_t* __restrict__ w_next,
             scalar_t* __restrict__ scratch, int64_t n, scalar_t mean,
             const Coefficients<scalar_t> c) {
  constexpr bool kInside = kDecay == Decay::kInsideGC;
#define GC_MM_CENTRALIZED(g, w, i) \
  (kInside ? g[i] + c.weight_decay * w[i] : g[i])
#define GC_MM_UPDATE(i, sum)                                                \
  if constexpr (kSweep != Sweep::kSumOnly) {                                \
    scalar_t d = GC_MM_CENTRALIZED(g, w, i) - mean;                         \
    if constexpr (kDecay == Decay::kAfterGC) d += c.weight_decay * w[i];    \
    scalar_t first = d;                                                     \
    if constexpr (kMoment1) {                                               \
      first = c.beta1 * m[i] + c.new1 * d;                                  \
      m[i] = first;                                                         \
    }                                                                       \
    scalar_t second = c.beta2 * v[i] + c.new2 * d * d;                      \
    v[i] = second;                                                          \
    if constexpr (kAmsgrad) {                                               \
      second = std::max(v_max[i], second);                                  \
      v_max[i] = second;                                                    \
    }                                                                       \
    scalar_t u = first / (std::sqrt(second) * c.denom_scale + c.eps);       \
    if constexpr (kDecay == Decay::kInUpdate) u += c.weight_decay * w[i];   \
    if constexpr (kSweep == Sweep::kToScratch) {                            \
      scratch[i] = u;                                                       \
      sum += u;                                                             \
    } else {                                                                \
      w[i] = (kDecay == Decay::kDecoupled ? c.keep * w[i] : w[i]) -         \
             c.step_size * u;                                               \
    }                                                                       \
  }
  double total = 0;
  for (int64_t i = 0; i < n;) {
    const int64_t end = std::min(n, i + kBlock);
    scalar_t part[kLanes] = {};
    for (; i + kLanes <= end; i += kLanes) {
      // The streams from memory, asked for ahead (rows.h): the next row's
      // gradient and weights where this sweep sums it, else this row's.
      prefetch_lanes(kSumNext ? g_next : g, i);
      prefetch_lanes(kSumNext ? w_next : w, i);
      if constexpr (kSweep != Sweep::kSumOnly) {
        if constexpr (kMoment1) prefetch_lanes(m, i);
        prefetch_lanes(v, i);
        if constexpr (kAmsgrad) prefetch_lanes(v_max, i);
      }
      for (int k = 0; k < kLanes; ++k) {
        if constexpr (kSumNext) {
          part[k] += GC_MM_CENTRALIZED(g_next, w_next, i + k);
        }
        GC_MM_UPDATE(i + k, part[k])
      }
    }
    for (int k = 0; i < end; ++i, ++k) {
      if constexpr (kSumNext) part[k] += GC_MM_CENTRALIZED(g_next, w_next, i);
      GC_MM_UPDATE(i, part[k])
    }
    for (int k = 0; k < kLanes; ++k) total += part[k];
  }
#undef GC_MM_UPDATE
#undef GC_MM_CENTRALIZED
  return total;
}

// sweep() over the row of t at offset at (and the sum of the row at next).
template <typename scalar_t, Sweep kSweep, bool kMoment1, bool kAmsgrad,
          Decay kDecay, bool kSumNext>
double sweep_row(const Tensors<scalar_t>& t, int64_t at, int64_t next,
                 int64_t n, scalar_t mean, scalar_t* scratch,
                 const Coefficients<scalar_t>& c) {
  return sweep<scalar_t, kSweep, kMoment1, kAmsgrad, kDecay, kSumNext>(
      t.w + at, t.g + at, kMoment1 ? t.m + at : nullptr, t.v + at,
      kAmsgrad ? t.v_max + at : nullptr, kSumNext ? t.g + next : nullptr,
      kSumNext ? t.w + next : nullptr, scratch, n, mean, c);
}

// w = keep * w - step_size * (u - mean), u from the scratch row.
template <typename scalar_t, Decay kDecay>
void apply_centered(scalar_t* __restrict__ w,
                    const scalar_t* __restrict__ u, int64_t n,
                    scalar_t mean, const Coefficients<scalar_t>& c) {
  for (int64_t i = 0; i < n; ++i) {
    w[i] = (kDecay == Decay::kDecoupled ? c.keep * w[i] : w[i]) -
           c.step_size * (u[i] - mean);
  }
}

template <typename scalar_t, Center kCenter, bool kMoment1, bool kAmsgrad,
          Decay kDecay>
void adaptive_step(const Tensors<scalar_t>& t, int64_t rows, int64_t cols,
                   const Coefficients<scalar_t>& c) {
  if constexpr (kCenter == Center::kNone) {
    for_blocks(rows * cols, [&](int64_t at, int64_t n) {
      sweep_row<scalar_t, Sweep::kUpdate, kMoment1, kAmsgrad, kDecay,
                false>(t, at, 0, n, scalar_t(0), nullptr, c);
    });
  } else if constexpr (kCenter == Center::kGradient) {
    const auto sum_first = [&](int64_t row) {
      return sweep_row<scalar_t, Sweep::kSumOnly, kMoment1, kAmsgrad,
                       kDecay, true>(t, 0, row * cols, cols, scalar_t(0),
                                     nullptr, c);
    };
    const auto update = [&](int64_t row, double mean, bool sum_next) {
      if (sum_next) {
        return sweep_row<scalar_t, Sweep::kUpdate, kMoment1, kAmsgrad,
                         kDecay, true>(t, row * cols, (row + 1) * cols, cols,
                                       scalar_t(mean), nullptr, c);
      }
      return sweep_row<scalar_t, Sweep::kUpdate, kMoment1, kAmsgrad,
                       kDecay, false>(t, row * cols, 0, cols, scalar_t(mean),
                                      nullptr, c);
    };
    for_rows(rows, cols, sum_first, update);
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / cols);
    counted_parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(cols);
      for (int64_t row = begin; row < end; ++row) {
        const double sum =
            sweep_row<scalar_t, Sweep::kToScratch, kMoment1, kAmsgrad,
                      kDecay, false>(t, row * cols, 0, cols, scalar_t(0),
                                     scratch.data(), c);
        apply_centered<scalar_t, kDecay>(t.w + row * cols, scratch.data(),
                                         cols, scalar_t(sum / cols), c);
      }
    });
  }
}

template <typename scalar_t>
void adaptive_step(const Tensors<scalar_t>& t, int64_t rows, int64_t cols,
                   Center center, Decay decay,
                   const Coefficients<scalar_t>& c) {
  with_constant<Center, Center::kNone, Center::kGradient, Center::kUpdate>(
      center, [&](auto kCenter) {
        with_constant<Decay, Decay::kNone, Decay::kInsideGC, Decay::kAfterGC,
                      Decay::kDecoupled, Decay::kInUpdate>(
            decay, [&](auto kDecay) {
              with_constant<bool, false, true>(
                  t.m != nullptr, [&](auto kMoment1) {
                    with_constant<bool, false, true>(
                        t.v_max != nullptr, [&](auto kAmsgrad) {
                          adaptive_step<scalar_t, kCenter, kMoment1,
                                        kAmsgrad, kDecay>(t, rows, cols, c);
                        });
                  });
            });
      });
}

Center parse_center(const std::string& center) {
  if (center == "none") return Center::kNone;
  if (center == "gradient") return Center::kGradient;
  TORCH_CHECK(center == "update", "gc_mm fused adaptive step: center must be "
              "'none', 'gradient' or 'update', got '", center, "'");
  return Center::kUpdate;
}

Decay parse_decay(const std::string& decay, double weight_decay) {
  if (weight_decay == 0 || decay == "none") return Decay::kNone;
  if (decay == "inside_gc") return Decay::kInsideGC;
  if (decay == "after_gc") return Decay::kAfterGC;
  if (decay == "decoupled") return Decay::kDecoupled;
  TORCH_CHECK(decay == "in_update", "gc_mm fused adaptive step: decay must "
              "be 'none', 'inside_gc', 'after_gc', 'decoupled' or "
              "'in_update', got '", decay, "'");
  return Decay::kInUpdate;
}

// exp_avg is None without a first moment (Adagrad), max_exp_avg_sq without
// amsgrad.
void check_tensors(const at::Tensor& param, const at::Tensor& grad,
                   const c10::optional<at::Tensor>& exp_avg,
                   const at::Tensor& exp_avg_sq,
                   const c10::optional<at::Tensor>& max_exp_avg_sq) {
  const char* kernel = "fused adaptive step";
  check_like(param, param, kernel, "param");
  check_like(grad, param, kernel, "grad");
  check_like(exp_avg_sq, param, kernel, "exp_avg_sq");
  if (exp_avg.has_value()) check_like(*exp_avg, param, kernel, "exp_avg");
  if (max_exp_avg_sq.has_value()) {
    check_like(*max_exp_avg_sq, param, kernel, "max_exp_avg_sq");
  }
}

// The step of a list of tensors, in one call (Python between the tensors
// of a large model runs with a cache the step has just flushed, which cost
// more than the step's own overhead). Every tensor is checked before any
// moves. Per tensor: center ('none', 'gradient', 'update'), denom_scale
// and step_size (the bias corrections of its own step count); decay:
// 'none', 'inside_gc', 'after_gc', 'decoupled', 'in_update'.
void adaptive_gc_steps(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    const std::vector<c10::optional<at::Tensor>>& exp_avgs,
    const std::vector<at::Tensor>& exp_avg_sqs,
    const std::vector<c10::optional<at::Tensor>>& max_exp_avg_sqs,
    const std::vector<std::string>& centers, double weight_decay,
    const std::string& decay, double keep, double beta1, double new1,
    double beta2, double new2, const std::vector<double>& denom_scales,
    double eps, const std::vector<double>& step_sizes) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n &&
                  exp_avg_sqs.size() == n && max_exp_avg_sqs.size() == n &&
                  centers.size() == n && denom_scales.size() == n &&
                  step_sizes.size() == n,
              "gc_mm fused adaptive step: the lists must have one entry per "
              "param");
  const Decay parsed_decay = parse_decay(decay, weight_decay);
  std::vector<Center> parsed_centers;
  for (size_t i = 0; i < n; ++i) {
    check_tensors(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                  max_exp_avg_sqs[i]);
    parsed_centers.push_back(parse_center(centers[i]));
  }
  for_each_tensor(params, [&](size_t i, int64_t rows, int64_t cols) {
    const auto& m = exp_avgs[i];
    const auto& v_max = max_exp_avg_sqs[i];
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "adaptive_gc_steps",
                               [&] {
      const Tensors<scalar_t> t{
          params[i].data_ptr<scalar_t>(), grads[i].data_ptr<scalar_t>(),
          m.has_value() ? m->data_ptr<scalar_t>() : nullptr,
          exp_avg_sqs[i].data_ptr<scalar_t>(),
          v_max.has_value() ? v_max->data_ptr<scalar_t>() : nullptr};
      const Coefficients<scalar_t> c{
          scalar_t(weight_decay),    scalar_t(keep),  scalar_t(beta1),
          scalar_t(new1),            scalar_t(beta2), scalar_t(new2),
          scalar_t(denom_scales[i]), scalar_t(eps),   scalar_t(step_sizes[i])};
      adaptive_step<scalar_t>(t, rows, cols, parsed_centers[i], parsed_decay,
                              c);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adaptive_gc_steps", &adaptive_gc_steps,
        "One fused adaptive (Adam, AdamW, RAdam, Adagrad) step with Gradient "
        "Centralization of each tensor of a list, in place");
  gc_mm::describe_build(m);
}
