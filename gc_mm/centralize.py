"""The Gradient Centralization operator, gc_mm's one GC primitive.

Yong et al., "Gradient Centralization: A New Optimization Technique for Deep
Neural Networks", ECCV 2020. For a weight gradient G with one row per output
unit, ``P(G) = G - mean(G over every dim but dim 0)``. Every optimizer and
optim wrapper calls :func:`centralize_`; the one exception is the C++
kernel (gc_mm/kernels/sgd.cpp), which fuses the same maths into SGD's step
and is held to the same float64 reference by the tests.
"""
from typing import Iterable, List, Optional

from torch import Tensor

from .sharding import local_rows

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


def centralize_(tensors: Iterable[Tensor],
                conv_only: bool = False,
                out_dim: int = 0,
                groups: int = 1) -> None:
    """Centralize tensors in place: subtract from each row its mean.

    Args:
        tensors: tensors to centralize; each one with ``ndim > 1`` (``> 3``
            with ``conv_only``) is centralized. The others (biases, norm
            weights, and fc weights in conv-only mode) are left untouched.
        conv_only: centralize only ``ndim > 3`` tensors (the "GCC" rule).
        out_dim: the dim that indexes output units. 0 (the default): conv
            and fc weights, ``(out, in, *kernel)``; each slice of dim 0 is a
            row. 1: transposed-conv weights, ``(in, out / groups,
            *kernel)``; the row of output unit ``o`` of group ``j`` is
            ``t[j * in_g:(j + 1) * in_g, o]`` with ``in_g = in / groups``.
            (The authors' code centralizes transposed convs with the
            default, i.e. per input channel.)
        groups: the transposed conv's groups; with ``out_dim=1`` only.

    An empty tensor is left as it is. A row of length 1 becomes exactly
    zero. A non-finite entry makes its whole row non-finite (the mean
    spreads it); nothing raises. A bad ``out_dim``/``groups`` raises
    ValueError before any tensor changes. A DTensor (FSDP2) is centralized
    in its local shard, which must hold whole rows (:mod:`gc_mm.sharding`).
    """
    min_ndim = 4 if conv_only else 2
    if out_dim != 0 or groups != 1:
        tensors = [t for t in tensors if t.ndim >= min_ndim]
        check_output_layout(tensors, out_dim, groups)
    for tensor in tensors:
        if tensor.ndim < min_ndim:
            continue
        # A DTensor of FSDP2 holds whole rows on each rank: GC of the local
        # shard is exact, with no communication.
        tensor = local_rows(tensor, out_dim)
        if tensor.numel() == 0:
            continue
        if out_dim == 1:
            # Splitting dim 0 into (groups, in_g) is a view in any layout;
            # each (group, output channel) pair is one row.
            blocks = tensor.unflatten(0, (groups, -1))
            blocks.sub_(blocks.mean(dim=(1, *range(3, blocks.ndim)),
                                    keepdim=True))
        # One tensor at a time, mean then subtraction, so the second pass
        # finds the tensor in cache. A contiguous tensor is reduced as a 2-D
        # view (one fast pass); other layouts (channels_last) over the dims.
        elif tensor.is_contiguous():
            rows = tensor.view(tensor.shape[0], -1)
            rows.sub_(rows.mean(dim=1, keepdim=True))
        else:
            tensor.sub_(
                tensor.mean(dim=tuple(range(1, tensor.ndim)), keepdim=True))


def check_output_layout(tensors: List[Tensor], out_dim: int,
                        groups: int) -> None:
    """Raise ValueError if :func:`centralize_` cannot take ``out_dim`` and
    ``groups`` for these tensors."""
    if out_dim not in (0, 1):
        raise ValueError(f'out_dim must be 0 or 1 (the dim that indexes '
                         f'output units), got {out_dim!r}')
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f'groups must be a positive int, got {groups!r}')
    if out_dim == 0 and groups != 1:
        raise ValueError(f'groups applies to out_dim=1 only (transposed '
                         f'convs), got groups={groups} with out_dim=0')
    for tensor in tensors:
        if tensor.shape[0] % groups:
            raise ValueError(
                f'groups={groups} does not divide dim 0 of a tensor of shape '
                f'{tuple(tensor.shape)} (a transposed-conv weight is '
                '(in, out / groups, *kernel))')
