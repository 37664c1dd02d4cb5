"""A hook for the tool tests: each rank saves its model and optimizer state
at a stage of training (imported through --cfg-options custom_imports)."""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class StateDumpHook(Hook):

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def _dump(self, runner, stage: str) -> None:
        model = runner.model.module if hasattr(runner.model,
                                               'module') else runner.model
        torch.save(
            dict(model=model.state_dict(),
                 params={k: p.detach()
                         for k, p in model.named_parameters()},
                 optimizer=runner.optim_wrapper.state_dict(),
                 iter=runner.iter, epoch=runner.epoch),
            osp.join(self.out_dir, f'{stage}_rank{get_rank()}.pth'))

    def before_train(self, runner) -> None:
        # After load_or_resume: the state a resumed run starts from.
        self._dump(runner, 'before_train')

    def after_train(self, runner) -> None:
        self._dump(runner, 'after_train')
