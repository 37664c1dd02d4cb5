"""This stack's fixes: torchvision:// without torchvision, atomic local
writes, checkpoints that load with weights_only=True."""
import importlib
import io
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from mmengine.fileio import LocalBackend
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import CheckpointLoader

import gc_mm  # noqa: F401
from conftest import HAS_ALLOW_LIST, needs_allow_list
from gc_mm.compat import (_load_from_torchvision, allow_checkpoint_globals,
                          silence_pkg_resources_warning, torchvision_url)


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


@needs_allow_list
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


def hub_checkpoint(**save_options) -> bytes:
    """A checkpoint's message hub with numpy arrays and scalars in it."""
    hub = MessageHub.get_instance('test_compat_numpy')
    hub.update_scalar('train/loss', np.float32(0.25))
    hub.update_scalar('train/loss', np.float64(0.75))
    hub.update_info('iou_thrs', np.linspace(0.5, 0.95, 10))
    hub.update_info('best_score', np.float64(0.5))
    buffer = io.BytesIO()
    torch.save({'message_hub': hub.state_dict()}, buffer, **save_options)
    return buffer.getvalue()


def check_hub(data: bytes) -> None:
    loaded = torch.load(io.BytesIO(data), weights_only=True)['message_hub']
    assert loaded['log_scalars']['train/loss'].mean() == 0.5
    info = loaded['runtime_info']
    np.testing.assert_array_equal(info['iou_thrs'], np.linspace(0.5, 0.95, 10))
    assert info['best_score'] == np.float64(0.5)
    assert type(info['best_score']) is np.float64


@needs_allow_list
def test_numpy_arrays_and_scalars_load_with_weights_only():
    check_hub(hub_checkpoint())


@needs_allow_list
def test_checkpoints_written_with_numpy_1_load_with_weights_only():
    """numpy 1 pickled arrays and scalars through numpy.core.multiarray
    (numpy 2: numpy._core.multiarray); the legacy format keeps the pickle
    uncompressed, so its names can be rewritten as numpy 1 wrote them."""
    data = hub_checkpoint(_use_new_zipfile_serialization=False)
    numpy_2 = b'numpy._core.multiarray\n'
    assert data.count(numpy_2) >= 2  # _reconstruct and scalar
    check_hub(data.replace(numpy_2, b'numpy.core.multiarray\n'))


def test_mmengine_loads_its_checkpoints_with_gc_mm_imported(tmp_path):
    """mmengine's own loader (torch.load with torch's default weights_only)
    on a checkpoint with a message hub, numpy values and a numpy-1 name,
    on every supported torch (torch 2.4 failed on every load: it takes no
    (function, name) allow-list entries)."""
    data = hub_checkpoint(_use_new_zipfile_serialization=False)
    path = tmp_path / 'epoch_1.pth'
    path.write_bytes(
        data.replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n'))
    loaded = CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    hub = loaded['message_hub']
    assert hub['log_scalars']['train/loss'].mean() == 0.5
    assert hub['runtime_info']['best_score'] == np.float64(0.5)
    path.write_bytes(hub_checkpoint())
    loaded = CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert loaded['message_hub']['log_scalars']['train/loss'].mean() == 0.5


def test_weights_only_stays_safe_without_an_allow_list():
    """Where torch has an allow-list gc_mm fills it; where it has none
    (torch < 2.4) weights_only=True still refuses mmengine's types: gc_mm
    never turns the safety off."""
    assert allow_checkpoint_globals() is HAS_ALLOW_LIST
    if HAS_ALLOW_LIST:
        check_hub(hub_checkpoint())
    else:
        with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
            torch.load(io.BytesIO(hub_checkpoint()), weights_only=True)


def test_only_the_pkg_resources_deprecation_is_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        silence_pkg_resources_warning()
        import pkg_resources
        importlib.reload(pkg_resources)  # what mmengine's is_installed does
        warnings.warn('another warning', UserWarning)
        warnings.warn('pkg_resources is deprecated', DeprecationWarning)
    assert [str(w.message) for w in caught] == [
        'another warning', 'pkg_resources is deprecated']


def test_mmcv_nms_runs_in_float32_under_cpu_autocast():
    """mmcv's CPU NMS takes float32 only; under CPU autocast its bfloat16
    inputs go in as float32 (without torch.amp.custom_fwd, which torch < 2.4
    does not have), outside autocast nothing changes."""
    ops = pytest.importorskip('mmcv.ops')
    from gc_mm.compat import enable_cpu_autocast_for_mmcv_ops
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.],
                          [20., 20., 30., 30.]]).bfloat16()
    scores = torch.tensor([0.9, 0.8, 0.7]).bfloat16()
    enable_cpu_autocast_for_mmcv_ops()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, keep = ops.nms(boxes, scores, 0.5)
    assert keep.tolist() == [0, 2]
    with pytest.raises(RuntimeError, match='Float'):
        ops.nms(boxes, scores, 0.5)  # autocast off: mmcv's own check
