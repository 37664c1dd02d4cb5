"""A hook that makes ``--resume`` continue exactly where training stopped.

MMEngine checkpoints the model, optimizer, schedulers and message hub, but
not the random number generators: a resumed run samples other RoIs (and
other random augmentations) than the uninterrupted run would have.
tools/train.py adds this hook to every run.
"""
import random

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save the python, numpy, torch (and CUDA) generator states in each
    checkpoint; restore them when training resumes from it."""

    priority = 'VERY_LOW'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = dict(
            python=random.getstate(),
            numpy=np.random.get_state(),
            torch=torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state['cuda'] = torch.cuda.get_rng_state_all()
        checkpoint['random_state'] = state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get('random_state')
        if state is None or not runner._resume:  # load_from: a new run
            return
        random.setstate(state['python'])
        np.random.set_state(state['numpy'])
        torch.set_rng_state(state['torch'])
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])
