"""GC under sharded data parallelism: what each rank's optimizer sees.

- FSDP2 (``fully_shard``) makes each parameter a DTensor sharded
  ``Shard(0)``: a rank holds whole rows (output units), possibly an uneven
  or empty block. GC of the local rows is exact with no communication, so
  :func:`~gc_mm.centralize.centralize_` centralizes :func:`local_rows`, and
  the fast paths, which lay tensors out themselves, leave DTensors to the
  plain path (``fast_path_takes``). A placement that splits rows (a
  ``Shard`` of another dim than the output units', or ``Partial``) is
  refused by :func:`check_sharded_group`, naming the parameter.
- FSDP1 (``FullyShardedDataParallel``, either ``use_orig_params``; the
  wrapper of mmengine's FSDPStrategy) and DeepSpeed ZeRO-1/2 hand the
  optimizer flat 1-D shards: the rows are gone and a row may straddle two
  ranks, so a ``ndim > 1`` test would skip GC without a word.
  :func:`check_sharded_group` refuses them.
"""
from typing import Callable, Dict, List, Optional

from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without torch.distributed
    DTensor = None

# Where to go instead, in every refusal.
INSTEAD = ('Train with FSDP2 (torch.distributed.fsdp.fully_shard), where '
           "gc_mm's GC is exact, or with DDP.")


def is_dtensor(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def _splits_rows(tensor: Tensor, out_dim: int) -> bool:
    """Whether a DTensor's local shard may hold part of a row: a placement
    other than Replicate or a Shard of ``out_dim`` (dims normalized)."""
    for placement in tensor.placements:
        if placement.is_replicate():
            continue
        if not (placement.is_shard()
                and placement.dim % tensor.ndim == out_dim):
            return True
    return False


def _rows_split_error(tensor: Tensor, what: str, out_dim: int) -> str:
    return (f'{what} is a DTensor placed {tuple(tensor.placements)}, which '
            f'splits its rows (output units along dim {out_dim}) between '
            "ranks: gc_mm centralizes each rank's local rows, exact only "
            f'where a rank holds whole rows (Shard({out_dim}), as FSDP2\'s '
            'fully_shard places weights). Shard it along that dim, or '
            'exclude it from GC (paramwise_cfg.gc.exclude).')


def local_rows(tensor: Tensor, out_dim: int = 0) -> Tensor:
    """``tensor`` itself, or for a DTensor its local shard (a view: GC in
    place changes the DTensor), checked to hold whole rows."""
    if not is_dtensor(tensor):
        return tensor
    if _splits_rows(tensor, out_dim):
        raise ValueError(_rows_split_error(
            tensor, f'a tensor of shape {tuple(tensor.shape)}', out_dim))
    return tensor.to_local()


def flat_shard(param: Tensor) -> Optional[str]:
    """What flattened ``param``, if it is a flat 1-D shard of FSDP1: its
    FlatParameter (``use_orig_params=False``), or an original parameter
    FSDP1 set to a 1-D view of one (``use_orig_params=True``). Both carry
    FSDP's ``_fsdp_flattened`` mark; with NO_SHARD and
    ``use_orig_params=True`` a parameter keeps its shape and GC is
    exact."""
    if getattr(param, '_is_flat_param', False):
        return 'a FlatParameter, use_orig_params=False'
    if getattr(param, '_fsdp_flattened', False) and param.ndim == 1:
        return ('a parameter flattened to 1-D, use_orig_params=True, as '
                "mmengine's FSDPStrategy wraps")
    return None


def check_sharded_group(params: List[Tensor], centralized: Callable[
        [Tensor], bool], who: str, index: int, out_dim: int = 0,
                        given: Optional[Dict[int, Tensor]] = None,
                        names: Optional[List[str]] = None) -> None:
    """Raise ValueError, before anything changes, if GC cannot be exact on
    param group ``index`` (whose GC is on; ``centralized`` says which
    tensors it centralizes, rows along ``out_dim``):

    - a flat 1-D shard of FSDP1 (:func:`flat_shard`);
    - a 1-D tensor the optimizer was not ``given`` (where it keeps them,
      by id):
      DeepSpeed ZeRO-1/2 replaces each group's parameters with one flat
      fp32 partition after the optimizer is built;
    - a DTensor whose local shard splits rows (``names``: the group's
      parameter names, where known, to name it).

    One pass over the group, a few attribute reads per tensor.
    """
    for i, param in enumerate(params):
        if param.ndim > 1:
            if (is_dtensor(param) and centralized(param)
                    and _splits_rows(param, out_dim)):
                what = (f'parameter {names[i]!r}' if names else
                        f'a parameter of shape {tuple(param.shape)}')
                raise ValueError(f'{who}: param group {index}: '
                                 + _rows_split_error(param, what, out_dim))
            continue
        what = flat_shard(param)
        if what is not None:
            raise ValueError(
                f"{who}: param group {index} holds FSDP1's flat 1-D shards "
                f"(FullyShardedDataParallel; {what}): the weights' rows are "
                'gone (a row may straddle two ranks), so GC would silently '
                f'do nothing. {INSTEAD}')
        if given is not None and given.get(id(param)) is not param:
            raise ValueError(
                f'{who}: param group {index} holds a 1-D tensor of '
                f'{param.numel()} elements it was not given (DeepSpeed ZeRO '
                "stages 1 and 2 replace each group's parameters with one "
                'flat partition): GC would silently do nothing. Use ZeRO '
                f'stage 0, or: {INSTEAD}')
