// The fused SGD step with Gradient Centralization, for CPU tensors.
//
// One call updates one tensor. For each row (output unit) the row mean of
// the direction d = g + wd * w is taken in a first pass, and the rest of the
// step runs in a second pass over the same row while it is in cache:
//
//   d   = g + wd * w - mean(row of g + wd * w)   (wd only if coupled, the
//                                                 mean only if centralized)
//   buf = d                                      (first step)
//   buf = momentum * buf + (1 - dampening) * d   (later steps)
//   dir = nesterov ? d + momentum * buf : buf    (d without momentum)
//   w   = (1 - lr * wd) * w - lr * dir           (1 - lr * wd if decoupled)
//
// So g, w and buf come from memory once and w, buf are written once, the
// least traffic a GC step can have; the gradient is not modified. Rows are
// split among threads with at::parallel_for. These are the maths of
// gc_mm/centralize.py and SGD's plain path, fused; the parity tests hold
// all three to the same float64 reference.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <torch/version.h>

#include <algorithm>
#include <string>

namespace {

// Elements per parallel task: below this a thread costs more than it saves.
constexpr int64_t kGrainElements = 1 << 15;
// Partial sums of the row mean: kLanes independent ones, so the compiler
// can vectorize (one running sum is a chain of dependent adds it may not
// reorder), each over at most kBlock / kLanes elements before it is added
// to a double, so the mean stays about as exact as torch's.
constexpr int kLanes = 16;
constexpr int64_t kBlock = kLanes * 64;

template <typename scalar_t, bool kCoupled>
double row_sum(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w,
               scalar_t wd, int64_t n) {
  double total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    scalar_t part[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        part[k] += kCoupled ? g[i + k] + wd * w[i + k] : g[i + k];
      }
    }
    for (int k = 0; i < end; ++i, ++k) {
      part[k] += kCoupled ? g[i] + wd * w[i] : g[i];
    }
    for (int k = 0; k < kLanes; ++k) total += part[k];
  }
  return total;
}

struct Hyper {
  double lr, weight_decay, momentum, dampening;
  bool nesterov, decoupled, first_step;
};

// The second pass over elements [begin, end) given their row mean. The
// branches test loop invariants, which the compiler hoists out of the loop;
// __restrict__ (param, grad and buffer are distinct tensors) lets it
// vectorize without run-time overlap checks.
template <typename scalar_t>
void update(scalar_t* __restrict__ w, const scalar_t* __restrict__ g,
            scalar_t* __restrict__ buf, int64_t begin, int64_t end,
            scalar_t mean, const Hyper& h) {
  const scalar_t wd = h.decoupled ? scalar_t(0) : scalar_t(h.weight_decay);
  const scalar_t keep =
      h.decoupled ? scalar_t(1 - h.lr * h.weight_decay) : scalar_t(1);
  const scalar_t lr = scalar_t(h.lr);
  const scalar_t momentum = scalar_t(h.momentum);
  const scalar_t new_part = scalar_t(1 - h.dampening);
  if (buf == nullptr) {
    for (int64_t i = begin; i < end; ++i) {
      w[i] = keep * w[i] - lr * (g[i] + wd * w[i] - mean);
    }
  } else if (h.first_step) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t d = g[i] + wd * w[i] - mean;
      buf[i] = d;
      w[i] = keep * w[i] - lr * (h.nesterov ? d + momentum * d : d);
    }
  } else {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t d = g[i] + wd * w[i] - mean;
      const scalar_t b = momentum * buf[i] + new_part * d;
      buf[i] = b;
      w[i] = keep * w[i] - lr * (h.nesterov ? d + momentum * b : b);
    }
  }
}

template <typename scalar_t>
void sgd_step(scalar_t* w, const scalar_t* g, scalar_t* buf, int64_t rows,
              int64_t cols, bool centralize, const Hyper& h) {
  if (!centralize) {
    at::parallel_for(0, rows * cols, kGrainElements,
                     [&](int64_t begin, int64_t end) {
                       update(w, g, buf, begin, end, scalar_t(0), h);
                     });
    return;
  }
  const scalar_t wd = h.decoupled ? scalar_t(0) : scalar_t(h.weight_decay);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t first = row * cols;
      const double sum =
          wd == scalar_t(0)
              ? row_sum<scalar_t, false>(g + first, w + first, wd, cols)
              : row_sum<scalar_t, true>(g + first, w + first, wd, cols);
      update(w, g, buf, first, first + cols, scalar_t(sum / cols), h);
    }
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
  const Hyper hyper{lr,       weight_decay, momentum,  dampening,
                    nesterov, decoupled,    first_step};
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_gc_step", [&] {
    sgd_step<scalar_t>(
        param.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
        momentum_buffer.has_value() ? momentum_buffer->data_ptr<scalar_t>()
                                    : nullptr,
        rows, param.numel() / rows, centralize, hyper);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgd_gc_step", &sgd_gc_step,
        "One fused SGD step with Gradient Centralization, in place");
  // The torch this was compiled against: an install-time build is not used
  // with another one (gc_mm/kernels/__init__.py).
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}
