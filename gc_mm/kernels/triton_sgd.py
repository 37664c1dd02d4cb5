"""SGD_GC's fused step on CUDA, in Triton (``SGD_GC(fused=True)`` with CUDA
parameters; the default there stays the multi-tensor path until this one
is measured on a GPU, docs/benchmark.md).

One program per row (output unit) of each tensor, every tensor of a dtype
in one launch: a centralized row's sum of ``g + wd*w`` is taken and the row
updated by the same program (the second read from cache), so ``g``, ``w``
and the momentum buffer cross memory about once, as in torch's fused SGD
and gc_mm's C++ kernel (gc_mm/kernels/sgd.cpp), whose rule this is:

    d = g + wd*w (decay inside GC) or g (decoupled)
    d = d - mean(row of d)                       (centralized tensors)
    buf = d (first step) or momentum*buf + (1 - dampening)*d
    d = d + momentum*buf (nesterov) or buf
    w = w*(1 - lr*wd) (decoupled) - lr*d

Rows are summed in the tensor's dtype. A tensor without GC is cut into
programs of CHUNK elements. The hyper-parameters reach the kernel in a
tensor of the parameters' dtype (a Python float argument would be rounded
to float32). Importing this module imports triton; ``available()`` in
gc_mm.kernels says whether it can.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # elements a program handles at a time
CHUNK = 16384  # elements per program of a tensor without GC
TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
# The tables' rows (see sgd_steps).
PARAMS, GRADS, BUFS, NUMELS, COLS, FIRST_ROWS, GC, FIRST_STEPS = range(8)


@triton.jit
def _sgd_rows(table, n, row_tensor, hyper, DTYPE: tl.constexpr,
              COUPLED: tl.constexpr, MOMENTUM: tl.constexpr,
              NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(row_tensor + pid)
    cols = tl.load(table + 4 * n + t)
    row = pid - tl.load(table + 5 * n + t)
    start = row * cols
    end = tl.minimum(start + cols, tl.load(table + 3 * n + t))
    p = tl.load(table + t).to(tl.pointer_type(DTYPE))
    g = tl.load(table + n + t).to(tl.pointer_type(DTYPE))
    b = tl.load(table + 2 * n + t).to(tl.pointer_type(DTYPE))
    lr = tl.load(hyper)
    weight_decay = tl.load(hyper + 1)
    momentum = tl.load(hyper + 2)
    dampening = tl.load(hyper + 3)
    mean = tl.sum(tl.zeros([BLOCK], dtype=DTYPE), axis=0)
    if tl.load(table + 6 * n + t) != 0:
        acc = tl.zeros([BLOCK], dtype=DTYPE)
        for i in range(start, end, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            mask = offs < end
            d = tl.load(g + offs, mask=mask, other=0.)
            if COUPLED:
                d += weight_decay * tl.load(p + offs, mask=mask, other=0.)
            acc += d
        mean = tl.sum(acc, axis=0) / (end - start).to(DTYPE)
    first = tl.load(table + 7 * n + t) != 0
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < end
        w = tl.load(p + offs, mask=mask)
        d = tl.load(g + offs, mask=mask)
        if COUPLED:
            d += weight_decay * w
        d -= mean
        if MOMENTUM:
            if first:
                buf = d
            else:
                buf = (momentum * tl.load(b + offs, mask=mask) +
                       (1 - dampening) * d)
            tl.store(b + offs, buf, mask=mask)
            if NESTEROV:
                d = d + momentum * buf
            else:
                d = buf
        if not COUPLED:
            w = w * (1 - lr * weight_decay)
        tl.store(p + offs, w - lr * d, mask=mask)


def sgd_steps(params: List[Tensor], grads: List[Tensor],
              bufs: List[Optional[Tensor]], centralized: List[bool],
              first_steps: List[bool], *, lr: float, weight_decay: float,
              decoupled: bool, momentum: float, dampening: float,
              nesterov: bool) -> None:
    """One SGD step of tensors that ``fast_path_takes`` (float32/float64,
    gradient and buffer in the parameter's layout, each row one block of
    memory), all on one device; with momentum every buffer is given (a
    first step's is written, not read). One launch per dtype."""
    if not params:
        return
    device = params[0].device
    by_dtype = {}
    for i, param in enumerate(params):
        by_dtype.setdefault(param.dtype, []).append(i)
    for dtype, index in by_dtype.items():
        rows, cols = [], []
        for i in index:
            numel = params[i].numel()
            if centralized[i]:
                rows.append(params[i].shape[0])
                cols.append(numel // params[i].shape[0])
            else:
                cols.append(min(numel, CHUNK))
                rows.append(-(-numel // cols[-1]))
        first_rows, total = [], 0
        for count in rows:
            first_rows.append(total)
            total += count
        # One host-to-device copy: eight rows of len(index) int64 (see
        # PARAMS... above), addresses as integers.
        table = torch.tensor(
            [[params[i].data_ptr() for i in index],
             [grads[i].data_ptr() for i in index],
             [bufs[i].data_ptr() if momentum else 0 for i in index],
             [params[i].numel() for i in index], cols, first_rows,
             [int(centralized[i]) for i in index],
             [int(first_steps[i]) for i in index]],
            dtype=torch.int64).to(device)
        # Each program's tensor, made on the device (no second copy).
        row_tensor = torch.repeat_interleave(
            torch.arange(len(index), device=device),
            (table[NUMELS] + table[COLS] - 1) // table[COLS],
            output_size=total)
        hyper = torch.tensor([lr, weight_decay, momentum, dampening],
                             dtype=dtype).to(device)
        _sgd_rows[(total, )](table, len(index), row_tensor, hyper,
                             DTYPE=TL_DTYPES[dtype], COUPLED=not decoupled,
                             MOMENTUM=bool(momentum),
                             NESTEROV=bool(nesterov), BLOCK=BLOCK)
