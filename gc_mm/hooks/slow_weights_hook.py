"""SlowWeightsHook: evaluate and save a Lookahead optimizer's slow
weights."""
import torch
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from ..optimizers import Lookahead
from .utils import optim_wrappers, unwrap_model


def _lookaheads(runner) -> list:
    """The Lookahead optimizers (Ranger included) the runner trains with."""
    return [wrapper.optimizer for wrapper in optim_wrappers(runner)
            if isinstance(wrapper.optimizer, Lookahead)]


def _ema_on(runner) -> bool:
    """Whether an EMAHook (MMEngine's, whatever its ema_type) is in the
    run."""
    return any(isinstance(hook, EMAHook) for hook in runner.hooks)


@HOOKS.register_module()
class SlowWeightsHook(Hook):
    """Evaluate and save the slow weights of a Lookahead optimizer
    (:class:`~gc_mm.optimizers.Lookahead`, :class:`~gc_mm.optimizers.Ranger`).

    Lookahead's slow weights are the ones its authors (and Ranger's users)
    evaluate; the model holds the fast weights while it trains. This hook:

    - ``val``: copies the slow weights into the model for each validation
      and the fast weights back after it;
    - ``test``: the same around a test run after training;
    - ``checkpoint``: writes the slow weights into each checkpoint's
      ``state_dict`` (what ``load_from``, tools/test.py and deployment read)
      and the fast weights under ``'lookahead_fast_weights'``, which this
      hook puts back into ``state_dict`` when a run resumes from it, so the
      resumed run continues from the fast weights, exactly.

    A parameter without slow weights yet (before the first step) keeps its
    weights. Buffers (BatchNorm statistics) are not Lookahead's: they stay
    as trained. Whatever the switches, a checkpoint that carries fast
    weights is resumed with them. In a run with no Lookahead optimizer the
    hook does nothing.

    With an ``EMAHook`` in the run (MMEngine's, whatever its ``ema_type``:
    mmdet's ``ExpMomentumEMA`` in RTMDet's and YOLOX's configs too), the
    EMA's weights are validated, tested and saved, and this hook steps
    aside (its switches do nothing): the user asked for the EMA, and two
    hooks that swap weights around the same validation would leave the
    model training on from the slow weights. EMAHook averages the model's
    weights after every step, so what is evaluated is the EMA of the fast
    weights (which equal the slow ones at every ``k``-th step), as timm's
    Lookahead with its model EMA does. Checkpoints are EMAHook's:
    ``state_dict`` holds the EMA, ``ema_state_dict`` the fast weights, and
    the slow weights stay in the optimizer's state, so ``--resume``
    continues exactly and the run trains as it would without validation.

    Args:
        val (bool): validate with the slow weights. Defaults to True.
        test (bool): test with the slow weights. Defaults to True.
        checkpoint (bool): save the slow weights as the checkpoint's model
            weights. Defaults to True.

    Example::

        custom_hooks = [dict(type='SlowWeightsHook')]
    """

    # Before hooks of the same stage that read the weights (CheckpointHook
    # saves the best checkpoint after validation, at VERY_LOW).
    priority = 'ABOVE_NORMAL'
    FAST_WEIGHTS_KEY = 'lookahead_fast_weights'

    def __init__(self, val: bool = True, test: bool = True,
                 checkpoint: bool = True):
        for name, value in (('val', val), ('test', test),
                            ('checkpoint', checkpoint)):
            if not isinstance(value, bool):
                raise ValueError(
                    f'SlowWeightsHook: {name} must be a bool, got {value!r}')
        self.val = val
        self.test = test
        self.checkpoint = checkpoint
        self._fast = None  # [(param, fast weights)] while slow ones are in

    @torch.no_grad()
    def _swap_in(self, runner) -> None:
        if self._fast is not None:
            return
        pairs = [pair for optimizer in _lookaheads(runner)
                 for pair in optimizer.slow_weights()]
        self._fast = [(param, param.detach().clone()) for param, _ in pairs]
        for param, slow in pairs:
            param.copy_(slow)

    @torch.no_grad()
    def _swap_out(self) -> None:
        if self._fast is None:
            return
        for param, fast in self._fast:
            param.copy_(fast)
        self._fast = None

    def before_train(self, runner) -> None:
        if _lookaheads(runner) and _ema_on(runner):
            print_log(
                'SlowWeightsHook: EMAHook is on; validation, test and '
                "checkpoints use the EMA of the model's (Lookahead's fast) "
                'weights, the slow weights stay in the optimizer state',
                logger='current')

    def before_val_epoch(self, runner) -> None:
        if self.val and not _ema_on(runner):
            self._swap_in(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._swap_out()

    def before_test_epoch(self, runner) -> None:
        if self.test and not _ema_on(runner):
            self._swap_in(runner)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._swap_out()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if not self.checkpoint or _ema_on(runner):
            return
        names = {id(param): name
                 for name, param in unwrap_model(runner.model).named_parameters()}
        # The fast weights are the model's unless the slow ones are in now.
        fast = {id(param): value for param, value in self._fast or ()}
        state_dict = checkpoint['state_dict']
        fast_weights = {}
        for optimizer in _lookaheads(runner):
            for param, slow in optimizer.slow_weights():
                name = names.get(id(param))
                if name is None or name not in state_dict:
                    continue
                fast_weights[name] = fast.get(id(param),
                                              param).detach().cpu().clone()
                state_dict[name] = slow.detach().to(
                    'cpu', state_dict[name].dtype, copy=True)
        if fast_weights:
            checkpoint[self.FAST_WEIGHTS_KEY] = fast_weights

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        fast_weights = checkpoint.pop(self.FAST_WEIGHTS_KEY, None)
        if fast_weights is not None and runner._resume:
            checkpoint['state_dict'].update(fast_weights)
