"""This stack's fixes: torchvision:// without torchvision, atomic local
writes, checkpoints that load with weights_only=True."""
import io
import os

import pytest
import torch
from mmengine.fileio import LocalBackend
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import CheckpointLoader

import gc_mm  # noqa: F401
from gc_mm.compat import _load_from_torchvision, torchvision_url


def test_torchvision_urls_resolve_without_torchvision():
    assert torchvision_url('resnet50') == (
        'https://download.pytorch.org/models/resnet50-0676ba61.pth')
    assert CheckpointLoader._get_checkpoint_loader(
        'torchvision://resnet50') is _load_from_torchvision
    with pytest.raises(KeyError, match="unknown torchvision model 'resnet5'"):
        CheckpointLoader.load_checkpoint('torchvision://resnet5')


def test_local_writes_are_atomic(tmp_path):
    target = tmp_path / 'epoch_1.pth'
    LocalBackend().put(b'complete', target)
    assert target.read_bytes() == b'complete'
    with pytest.raises(TypeError):
        LocalBackend().put(12345, tmp_path / 'epoch_2.pth')  # write fails
    # Nothing half-written: no target, no temporary file left behind.
    assert sorted(os.listdir(tmp_path)) == ['epoch_1.pth']
    LocalBackend().put_text('latest', tmp_path / 'last_checkpoint')
    assert (tmp_path / 'last_checkpoint').read_text() == 'latest'


def test_message_hub_state_loads_with_weights_only():
    hub = MessageHub.get_instance('test_compat')
    hub.update_scalar('train/loss', 0.5)
    hub.update_scalar('train/loss', 1.5)
    buffer = io.BytesIO()
    torch.save({'message_hub': hub.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)['message_hub']
    history = loaded['log_scalars']['train/loss']
    assert isinstance(history, HistoryBuffer) and history.mean() == 1.0
    assert history.current() == 1.5  # statistics methods restored
