"""A hook for the distributed test: each rank saves its parameters."""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class SaveRankParamsHook(Hook):

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def after_train(self, runner):
        model = runner.model.module if hasattr(runner.model,
                                               'module') else runner.model
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state['iter'] = torch.tensor(runner.iter)
        torch.save(state, osp.join(self.out_dir, f'rank{get_rank()}.pth'))
