"""RandomStateHook in a real runner: a run that validates every epoch,
with data workers or without, persistent or not, resumes bit-equal to the
uninterrupted run and trains as the run without validation."""
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import gc_mm  # noqa: F401  (registers the hooks)
from test_lookahead import ToyCount  # noqa: F401  (registers the metric)


class NoisyPairs(Dataset):
    """Eight samples, each drawn with a random 'augmentation' from the
    loading process's numpy and torch generators (a worker's, with data
    workers), as mmdet's RandomFlip and friends draw."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.inputs = rng.standard_normal((8, 2)).astype(np.float32)
        self.labels = rng.standard_normal((8, 1)).astype(np.float32)

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        jitter = np.float32(np.random.uniform(-0.1, 0.1))
        noise = torch.rand(1).item() * 0.1
        return dict(inputs=torch.from_numpy(self.inputs[index] + jitter),
                    labels=torch.from_numpy(self.labels[index]) + noise)


class NoisyModel(BaseModel):
    """A linear regression whose loss draws from torch's global generator
    in the main process (as an R-CNN's RoI sampler does)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[0.5, -0.3]]))
            self.linear.bias.fill_(0.1)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.linear(inputs)
        if mode == 'loss':
            keep = (torch.rand_like(out) > 0.3).float()
            return dict(loss=(keep * (out - labels)**2).mean())
        if mode == 'predict':
            return list(out)
        return out


def noisy_runner(work_dir, val_interval=1, workers=0, max_epochs=3,
                 resume_from=None):
    loader = dict(dataset=NoisyPairs(), batch_size=2, num_workers=workers,
                  persistent_workers=workers > 0,
                  sampler=dict(type='DefaultSampler', shuffle=True),
                  collate_fn=dict(type='default_collate'))
    return Runner(
        model=NoisyModel(), work_dir=str(work_dir),
        experiment_name=osp.basename(str(work_dir)),
        train_dataloader=loader, val_dataloader=loader,
        val_evaluator=dict(type='ToyCount'),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs,
                       val_interval=val_interval),
        val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1,
                                          momentum=0.9)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           interval=1)),
        custom_hooks=[dict(type='RandomStateHook')],
        randomness=dict(seed=0),
        load_from=resume_from, resume=resume_from is not None,
        default_scope='mmengine')


def weights(runner):
    return {name: value.detach().clone()
            for name, value in runner.model.state_dict().items()}


def assert_equal(got, want):
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0,
                                   msg=name)


@pytest.mark.parametrize('workers', [0, 2], ids=['no_workers',
                                                 'persistent_workers'])
def test_validating_every_epoch_resumes_bit_equal(tmp_path, workers):
    """Three epochs validating after each: the run ends as the one without
    validation, and a run resumed from epoch_1.pth (whose validation it
    skips) ends bit-equal to the uninterrupted one; with two persistent
    workers per loader too."""
    straight = noisy_runner(tmp_path / 'straight', workers=workers)
    straight.train()
    want = weights(straight)
    quiet = noisy_runner(tmp_path / 'quiet', val_interval=10,
                         workers=workers)
    quiet.train()
    assert_equal(weights(quiet), want)
    resumed = noisy_runner(
        tmp_path / 'resumed', workers=workers,
        resume_from=osp.join(straight.work_dir, 'epoch_1.pth'))
    resumed.train()
    assert_equal(weights(resumed), want)
