"""The fused CPU steps of the adaptive families, and of torch.optim's own
SGD, Adam and AdamW for GCOptimWrapper: GC at no cost.

SGD_GC calls :func:`sgd_steps` (gc_mm/kernels/sgd.cpp); Adam_GC,
AdamW_GC, their "2" variants, Adagrad_GC and RAdam_GC call
:func:`adaptive_steps` (gc_mm/kernels/adaptive.cpp, one call per param
group) for the CPU tensors :func:`fast_path_takes`, with their own rule's
numbers (bias corrections, rectification, lr decay).
:func:`torch_step_with_gc` is torch's SGD, Adam or AdamW step on
centralized gradients in one pass per tensor (the SGD and adaptive
kernels), reading and writing the torch optimizer's own state, for
:class:`~gc_mm.GCOptimWrapper`.

The kernels leave the gradients as backward left them, and run where they
were compiled at install (``kernels.installed``) or, with ``fused=True``,
compiled on first use.
"""
import math
from typing import Callable, List, Optional, Set

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import (_global_optimizer_post_hooks,
                                   _global_optimizer_pre_hooks)

from .. import kernels
from ..sharding import is_dtensor

# The dtypes the kernels are compiled for (AT_DISPATCH_FLOATING_TYPES).
KERNEL_DTYPES = (torch.float32, torch.float64)


def rows_order(tensor: Tensor) -> Optional[List[int]]:
    """The dims of ``tensor`` in memory order, dim 0 first, if the tensor
    is contiguous under that permutation (e.g. channels_last: 0, 2, 3, 1),
    else None.

    GC's rows are the slices of dim 0 and the updates are elementwise, so
    the fast paths work on such a permuted view as on a contiguous tensor:
    each row is one block of memory, in whatever order it holds its
    elements.
    """
    if tensor.is_contiguous():
        return list(range(tensor.ndim))
    order = [0] + sorted(range(1, tensor.ndim),
                         key=lambda dim: tensor.stride(dim), reverse=True)
    return order if tensor.permute(order).is_contiguous() else None


def fast_path_takes(param: Tensor, *tensors: Optional[Tensor]) -> bool:
    """Whether the fast paths (the C++ kernels, which also need the CPU:
    their callers check it; SGD's multi-tensor path anywhere) can update
    ``param`` with these tensors (gradient, state; None for an absent
    one): a non-empty float32/float64 tensor, not a DTensor, whose tensors
    share its device, dtype and memory layout, with each row one block of
    memory."""
    # Called per tensor and step, so written as plain loops (generator
    # expressions cost more than the checks), the common case (all
    # contiguous) without a permuted view.
    dtype, on_cpu = param.dtype, param.is_cpu
    if dtype not in KERNEL_DTYPES or not param.numel() or is_dtensor(param):
        # A DTensor (FSDP2) takes the plain path, which centralizes its
        # local rows: these paths would lay out (and gather) the whole one.
        return False
    order = None if param.is_contiguous() else rows_order(param)
    if order is None and not param.is_contiguous():
        return False
    for t in tensors:
        if t is None:
            continue
        if t.dtype != dtype or not (t.is_cpu if on_cpu else
                                    t.device == param.device):
            return False
        if not (t.is_contiguous() if order is None else
                t.permute(order).is_contiguous()):
            return False
    return True


def in_memory_order(param: Tensor, *tensors: Optional[Tensor]) -> list:
    """``param`` and ``tensors`` as views whose dims are in memory order
    (contiguous), for the kernels, which take rows as blocks of memory."""
    if param.is_contiguous():
        return [param, *tensors]
    order = rows_order(param)
    return [t if t is None else t.permute(order) for t in (param, *tensors)]


def kernel_path(fused: Optional[bool], kernel: str) -> bool:
    """Whether a group's CPU tensors take the kernel ``kernel``:
    ``fused=True`` always (built on first use if it was not installed),
    None where it was installed, False never."""
    if fused is None:
        return kernels.installed(kernel) is not None
    return fused


def check_path_option(group: dict, name: str = 'fused') -> None:
    """Raise ValueError unless a group's path option (``fused``,
    ``foreach``) is None (automatic), True or False."""
    if not (group[name] is None or isinstance(group[name], bool)):
        raise ValueError(f'{name} must be None (automatic), True or False, '
                         f'got {group[name]!r}')


def sgd_steps(params: List[Tensor], grads: List[Tensor],
              momentum_buffers: List[Optional[Tensor]],
              centralize: List[bool], first_steps: List[bool], *, lr: float,
              weight_decay: float, decay: str, momentum: float,
              dampening: float, nesterov: bool) -> None:
    """One call of the SGD kernel for a list of tensors (see
    gc_mm/kernels/sgd.cpp for the rule): per tensor ``centralize`` and
    ``first_steps`` (its buffer is written, not read); a buffer is None
    when momentum is 0; ``decay`` 'inside_gc', 'after_gc' or
    'decoupled'."""
    laid_out = [in_memory_order(*tensors) for tensors in zip(
        params, grads, momentum_buffers)]
    kernels.load('sgd').sgd_gc_steps(
        *(list(tensors) for tensors in zip(*laid_out)), centralize,
        first_steps, lr, weight_decay, decay, momentum, dampening, nesterov)


def adaptive_steps(params: List[Tensor], grads: List[Tensor],
                   exp_avgs: List[Optional[Tensor]],
                   exp_avg_sqs: List[Tensor],
                   max_exp_avg_sqs: List[Optional[Tensor]],
                   centers: List[str], *, weight_decay: float, decay: str,
                   beta1: float, beta2: float, denom_scales: List[float],
                   eps: float, step_sizes: List[float], lr: float = 0.,
                   new1: float = None, new2: float = None) -> None:
    """One call of the adaptive kernel for a list of tensors (see
    gc_mm/kernels/adaptive.cpp for the rule): per tensor ``centers``
    ('none', 'gradient' or 'update'), ``denom_scales`` and ``step_sizes``;
    ``decay`` 'inside_gc', 'after_gc', 'decoupled' (``w *= 1 - lr * wd``)
    or 'in_update'; ``new1``/``new2`` default to 1 - beta."""
    laid_out = [in_memory_order(*tensors) for tensors in zip(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)]
    keep = 1 - lr * weight_decay if decay == 'decoupled' else 1.
    kernels.load('adaptive').adaptive_gc_steps(
        *(list(tensors) for tensors in zip(*laid_out)), centers,
        weight_decay, decay, keep, beta1, 1 - beta1 if new1 is None else new1,
        beta2, 1 - beta2 if new2 is None else new2, denom_scales, eps,
        step_sizes)


# torch.optim's optimizers GCOptimWrapper steps itself, by class (exact:
# a subclass may change the step).
_TORCH_KERNELS = {torch.optim.SGD: 'sgd', torch.optim.Adam: 'adaptive',
                  torch.optim.AdamW: 'adaptive'}


def _plain_torch_options(optimizer: Optimizer) -> bool:
    """Whether every group of a torch SGD/Adam/AdamW asks for the plain
    rule (no maximize, no differentiable or capturable step, float
    hyper-parameters), and no step hook would be skipped."""
    if (optimizer._optimizer_step_pre_hooks
            or optimizer._optimizer_step_post_hooks
            or _global_optimizer_pre_hooks or _global_optimizer_post_hooks):
        return False
    for group in optimizer.param_groups:
        if (group.get('maximize') or group.get('differentiable')
                or group.get('capturable') or torch.is_tensor(group['lr'])):
            return False
        if 'betas' in group and any(torch.is_tensor(b)
                                    for b in group['betas']):
            return False
    return True


def torch_step_with_gc(optimizer: Optimizer, centralized: Set[Tensor],
                       before: Optional[Callable[[], None]] = None) -> bool:
    """Torch's SGD, Adam or AdamW step on centralized gradients, fused:
    ``centralized`` holds the gradients GC centralizes (rows along dim 0),
    the others are used as they are. Updates the parameters and the
    optimizer's own state exactly as ``optimizer.step()`` would after GC of
    the gradients, to float rounding, and returns True, calling ``before``
    (if given) once its checks passed, before anything changes. Returns
    False, with nothing changed and ``before`` not called, where it cannot
    (another optimizer or option, a parameter the kernel cannot take, state
    torch has not made yet: the first step), so the caller centralizes and
    calls ``optimizer.step()`` instead."""
    kernel = _TORCH_KERNELS.get(type(optimizer))
    if (kernel is None or kernels.installed(kernel) is None
            or not _plain_torch_options(optimizer)):
        return False
    calls = []  # (group, [(param, its tensors)])
    for group in optimizer.param_groups:
        group_calls = []
        for param in group['params']:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                return False
            # .get: indexing the state (a defaultdict) would add an entry.
            state = optimizer.state.get(param, {})
            # The state torch's step reads under the group's options now
            # (they may change between steps: a momentum scheduler reaching
            # 0, amsgrad switched off); what it ignores is ignored here.
            if kernel == 'sgd':
                buf = (state.get('momentum_buffer') if group['momentum']
                       else None)
                if group['momentum'] and buf is None:
                    return False  # torch makes it on the first step
                tensors = (param.grad, buf)
            else:
                if ('step' not in state or not torch.is_tensor(state['step'])
                        or (group['amsgrad']
                            and 'max_exp_avg_sq' not in state)):
                    return False  # torch's step makes or reports it
                tensors = (param.grad, state['exp_avg'], state['exp_avg_sq'],
                           state['max_exp_avg_sq'] if group['amsgrad']
                           else None)
            if not (param.is_cpu and fast_path_takes(param, *tensors)):
                return False
            group_calls.append((param, tensors))
        if group_calls:
            calls.append((group, group_calls))
    if before is not None:
        before()
    for group, group_calls in calls:
        if kernel == 'sgd':
            _torch_sgd_steps(group, group_calls, centralized)
        else:
            _torch_adam_steps(optimizer, group, group_calls, centralized)
    return True


def _torch_sgd_steps(group: dict, calls: list,
                     centralized: Set[Tensor]) -> None:
    """torch.optim.SGD's step on P(g): d = P(g) + wd * w, then momentum."""
    params = [param for param, _ in calls]
    grads, bufs = (list(t) for t in zip(*(tensors for _, tensors in calls)))
    sgd_steps(params, grads, bufs, [grad in centralized for grad in grads],
              [False] * len(calls), lr=group['lr'],
              weight_decay=group['weight_decay'], decay='after_gc',
              momentum=group['momentum'], dampening=group['dampening'],
              nesterov=group['nesterov'])


def _torch_adam_steps(optimizer: Optimizer, group: dict, calls: list,
                      centralized: Set[Tensor]) -> None:
    """torch.optim.Adam/AdamW's step on P(g): coupled decay added after GC
    (Adam), or w *= 1 - lr * wd (AdamW). Torch keeps a step count tensor
    per parameter: they are counted together (a call per tensor costs more
    than the step of a small one)."""
    steps = [optimizer.state[param]['step'] for param, _ in calls]
    torch._foreach_add_(steps, 1)
    counts = torch.stack(steps).tolist()
    beta1, beta2 = group['betas']
    decoupled = group.get('decoupled_weight_decay',
                          isinstance(optimizer, torch.optim.AdamW))
    params = [param for param, _ in calls]
    grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = (
        list(t) for t in zip(*(tensors for _, tensors in calls)))
    adaptive_steps(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
        ['gradient' if p.grad in centralized else 'none' for p in params],
        weight_decay=group['weight_decay'],
        decay='decoupled' if decoupled else 'after_gc', beta1=beta1,
        beta2=beta2, denom_scales=[1 / math.sqrt(1 - beta2**t)
                                   for t in counts],
        eps=group['eps'], step_sizes=[group['lr'] / (1 - beta1**t)
                                      for t in counts],
        lr=group['lr'])
