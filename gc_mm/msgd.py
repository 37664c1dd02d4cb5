"""MSGD: multiplicative noise on the losses of sub-batches, for SGD-like
noise in large-batch training.

Wu, Hu, Xiong, Huan, Braverman and Zhu, "On the Noisy Gradient Descent that
Generalizes as SGD", ICML 2020: the noise of SGD is the matrix of
per-sample gradients times a random vector; other random weight vectors
(Gaussian, Bernoulli, ...) with the same mean and covariance regularize as
well, and restore SGD-like generalization when the batch is large.

Here the sub-batches are the micro-batches of gradient accumulation
(``accumulative_counts`` = n) and the DDP ranks (R of them): the loss of
micro-batch ``i`` on rank ``r`` is multiplied by a random weight
``w[r, i]`` before backward, so the gradient the optimizer applies is

    g = sum_{r, i} w[r, i] * g[r, i] / (R * n)

where ``g[r, i]`` is the gradient of that micro-batch's (mean) loss: the
``1 / n`` is MMEngine's loss scaling under accumulation (for the last
update of a run whose length is not a multiple of ``n``, ``n`` is the
number of micro-batches left, as MMEngine scales them), the ``1 / R`` DDP's
gradient averaging. With every ``w = 1`` it is the plain large-batch
gradient.
"""
import math
from typing import Optional

import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import Tensor
from torch.optim import Optimizer

MSGD_DISTRIBUTIONS = ('gaussian', 'bernoulli')


def msgd_weights(seed: int, update: int, world_size: int, counts: int,
                 variance: float, distribution: str) -> Tensor:
    """The ``(world_size, counts)`` weights of one update, float64: mean 1,
    variance ``variance``. The same numbers on every rank (a function of
    ``seed`` and the update's index only, so a resumed run draws what the
    uninterrupted one would have)."""
    state = np.random.SeedSequence([seed, update]).generate_state(2)
    generator = torch.Generator().manual_seed(
        int(state[0]) << 32 | int(state[1]))
    shape = (world_size, counts)
    if distribution == 'gaussian':
        return 1 + math.sqrt(variance) * torch.randn(
            shape, generator=generator, dtype=torch.float64)
    # Bernoulli resampling: a sub-batch is kept with probability p and its
    # weight is then 1 / p (mean 1, variance (1 - p) / p).
    keep = 1 / (1 + variance)
    return torch.bernoulli(torch.full(shape, keep, dtype=torch.float64),
                           generator=generator) / keep


@OPTIM_WRAPPERS.register_module()
class MSGDOptimWrapper(OptimWrapper):
    """OptimWrapper that multiplies each micro-batch's loss, on each rank,
    by a random weight (MSGD, Wu et al., ICML 2020; see the module
    docstring for the applied gradient).

    The weights of update ``u`` are drawn from a generator seeded with
    ``(seed, u)``: the same on every rank, independent of the global random
    state, and the same after ``--resume`` (``u`` follows from the
    iteration). They are logged through the message hub: the info
    ``msgd_weights`` holds the current update's ``R x n`` weights (a list
    of lists, rank-major) and the scalar ``train/msgd_weight`` the weight
    of this rank's current micro-batch (in the training log and
    ``vis_data/scalars.json``, averaged over the logging interval like every
    training scalar).

    Off unless configured: the noise is this wrapper's, and a config that
    does not use it trains as before. A Gaussian weight can be negative
    (that micro-batch's gradient is subtracted), as in the paper; with
    ``'bernoulli'`` an update whose sub-batches are all dropped applies a
    zero gradient (with probability ``(1 - p)^(R n)``). GC stays in the
    optimizer (e.g. ``SGD_GC``), which centralizes the weighted gradient;
    this wrapper does not combine with GCOptimWrapper or AMP.

    Args:
        optimizer (Optimizer): the optimizer.
        variance (float): the weights' variance (>= 0; 0: no noise).
        distribution (str): 'gaussian' (``w = 1 + sqrt(variance) * z``) or
            'bernoulli' (resampling: ``w = b / p`` with ``b ~ Bernoulli(p)``,
            ``p = 1 / (1 + variance)``). Defaults to 'gaussian'.
        seed (int): the weights' seed. Defaults to 0.
        **kwargs: the arguments of :class:`mmengine.optim.OptimWrapper`
            (``accumulative_counts``, ``clip_grad``).

    Example::

        optim_wrapper = dict(
            type='MSGDOptimWrapper', variance=0.5, accumulative_counts=4,
            optimizer=dict(type='SGD_GC', lr=0.02, momentum=0.9,
                           weight_decay=1e-4))
    """

    def __init__(self,
                 optimizer: Optimizer,
                 variance: float,
                 distribution: str = 'gaussian',
                 seed: int = 0,
                 **kwargs):
        if (isinstance(variance, bool)
                or not isinstance(variance, (int, float))
                or not math.isfinite(variance) or variance < 0):
            raise ValueError('MSGDOptimWrapper: variance must be a finite '
                             f'number >= 0, got {variance!r}')
        if distribution not in MSGD_DISTRIBUTIONS:
            raise ValueError(f'MSGDOptimWrapper: distribution must be one of '
                             f'{MSGD_DISTRIBUTIONS}, got {distribution!r}')
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError('MSGDOptimWrapper: seed must be an int >= 0, got '
                             f'{seed!r}')
        super().__init__(optimizer=optimizer, **kwargs)
        self.variance = float(variance)
        self.distribution = distribution
        self.seed = seed
        self._drawn: Optional[tuple] = None  # (update, weights)

    def current_weights(self) -> Tensor:
        """The ``(world_size, accumulative_counts)`` weights of the update
        the next micro-batch belongs to."""
        update = self._inner_count // self._accumulative_counts
        if self._drawn is None or self._drawn[0] != update:
            weights = msgd_weights(self.seed, update, get_dist_info()[1],
                                   self._accumulative_counts, self.variance,
                                   self.distribution)
            self._drawn = (update, weights)
            MessageHub.get_current_instance().update_info(
                'msgd_weights', weights.tolist(), resumed=False)
        return self._drawn[1]

    def scale_loss(self, loss: Tensor) -> Tensor:
        """MMEngine's scaling for accumulation (``1 / n``), times this rank's
        weight for the micro-batch."""
        loss = super().scale_loss(loss)
        rank = get_dist_info()[0]
        weight = self.current_weights()[
            rank, self._inner_count % self._accumulative_counts].item()
        MessageHub.get_current_instance().update_scalar(
            'train/msgd_weight', weight)
        return loss * weight
