"""The Gradient Centralization operator, gc_mm's one GC primitive.

Yong et al., "Gradient Centralization: A New Optimization Technique for Deep
Neural Networks", ECCV 2020. For a weight gradient G with one row per output
unit, ``P(G) = G - mean(G over every dim but dim 0)``. Every optimizer and
optim wrapper calls :func:`centralize_`; the one exception is the C++
kernel (gc_mm/kernels/sgd.cpp), which fuses the same maths into SGD's step
and is held to the same float64 reference by the tests.
"""
from typing import Iterable, Optional

from torch import Tensor

# A GC mode names which tensors are centralized:
#   'conv_fc': ndim > 1, conv and fully connected weights (the "_GC" rule);
#   'conv':    ndim > 3, conv weights only (the "_GCC" rule);
#   None:      no tensor (GC off).
GC_MODES = ('conv_fc', 'conv', None)
_MIN_NDIM = {'conv_fc': 2, 'conv': 4}


def check_gc_mode(gc_mode, name: str = 'gc_mode') -> Optional[str]:
    """Return ``gc_mode`` if it is one of :data:`GC_MODES`, else raise."""
    if gc_mode not in GC_MODES:
        raise ValueError(f"{name} must be 'conv_fc' (conv and fc weights), "
                         f"'conv' (conv weights only) or None (off), "
                         f'got {gc_mode!r}')
    return gc_mode


def is_centralized(tensor: Tensor, gc_mode: Optional[str]) -> bool:
    """Whether a tensor of this shape is centralized under ``gc_mode``."""
    return gc_mode is not None and tensor.ndim >= _MIN_NDIM[gc_mode]


def centralize_(tensors: Iterable[Tensor], conv_only: bool = False) -> None:
    """Centralize tensors in place: subtract from each row its mean.

    Args:
        tensors: tensors to centralize; each one with ``ndim > 1`` (``> 3``
            with ``conv_only``) is reduced over every dim but dim 0. The
            others (biases, norm weights, and fc weights in conv-only mode)
            are left untouched.
        conv_only: centralize only ``ndim > 3`` tensors (the "GCC" rule).

    An empty tensor is left as it is. A row of length 1 becomes exactly
    zero. A non-finite entry makes its whole row non-finite (the mean
    spreads it); nothing raises.
    """
    min_ndim = 4 if conv_only else 2
    for tensor in tensors:
        if tensor.ndim < min_ndim or tensor.numel() == 0:
            continue
        # One tensor at a time, mean then subtraction, so the second pass
        # finds the tensor in cache. A contiguous tensor is reduced as a 2-D
        # view (one fast pass); other layouts (channels_last) over the dims.
        if tensor.is_contiguous():
            rows = tensor.view(tensor.shape[0], -1)
            rows.sub_(rows.mean(dim=1, keepdim=True))
        else:
            tensor.sub_(
                tensor.mean(dim=tuple(range(1, tensor.ndim)), keepdim=True))
