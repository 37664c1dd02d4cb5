"""tools/publish_model.py and tools/infer.py on a briefly trained demo model:
the published pair loads in a Python where gc_mm cannot be imported and
predicts what the trained model predicts; infer.py draws and saves the
predictions of published and training checkpoints; bad input is refused
with nothing written."""
import glob
import hashlib
import json
import os
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config

pytest.importorskip('mmdet')  # see conftest.py
import mmcv  # noqa: E402

import gc_mm  # noqa: E402
from conftest import REPO, run_tool  # noqa: E402
from gc_mm.checks import ConfigError  # noqa: E402
from test_tools import DEMO_SMALL, checkpoint, demo_run  # noqa: E402,F401

PUBLISH = osp.join(REPO, 'tools/publish_model.py')
INFER = osp.join(REPO, 'tools/infer.py')
NAME = 'mask_rcnn_r18_fpn_gc_shapes'

sys.path.insert(0, osp.join(REPO, 'tools'))
try:
    import infer
    import publish_model
finally:
    sys.path.pop(0)

# On PYTHONPATH as sitecustomize.py: gc_mm (installed in this Python) can
# no longer be imported, as in an environment with stock MMDetection only.
BLOCK_GC_MM = """
import importlib.abc
import sys


class BlockGcMm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'gc_mm' or name.startswith('gc_mm.'):
            raise ImportError(f'{name} is blocked (stock MMDetection only)')
        return None


sys.meta_path.insert(0, BlockGcMm())
"""

STOCK_PREDICT = """
import sys
import torch
try:
    import gc_mm  # noqa: F401
except ImportError as error:
    print(f'import gc_mm: {error}')
else:
    sys.exit('gc_mm is importable')
from mmdet.apis import inference_detector, init_detector

config, weights, unpublished, out, *images = sys.argv[1:]
try:  # torch's default: weights_only=True
    torch.load(unpublished, map_location='cpu')
except Exception as error:
    print(f'training checkpoint refused: {type(error).__name__}')
model = init_detector(config, weights, device='cpu')
results = []
for image in images:
    instances = inference_detector(model, image).pred_instances
    results.append({key: instances[key] for key in
                    ('bboxes', 'scores', 'labels', 'masks')})
assert not [m for m in sys.modules if m.split('.')[0] == 'gc_mm']
torch.save(dict(classes=list(model.dataset_meta['classes']),
                results=results), out)
"""


@pytest.fixture(scope='module')
def trained(demo_run):
    """The demo run's config (as the run saved it) and checkpoint."""
    cwd, work_dir, proc = demo_run
    return (cwd, osp.join(work_dir, f'{NAME}.py'),
            osp.join(work_dir, 'epoch_1.pth'), proc)


@pytest.fixture(scope='module')
def published(trained, tmp_path_factory):
    cwd, config, ckpt, _ = trained
    out_dir = tmp_path_factory.mktemp('published') / 'zoo'
    proc = run_tool([PUBLISH, config, ckpt, str(out_dir)], cwd=cwd)
    [weights] = glob.glob(str(out_dir / f'{NAME}-*.pth'))
    return weights, str(out_dir / f'{NAME}.py'), proc


@pytest.fixture(scope='module')
def images(trained, balloon):
    cwd = trained[0]
    shapes = sorted(glob.glob(str(cwd / 'data/shapes/val/*.png')))[:4]
    photos = sorted(glob.glob(osp.join(balloon, 'val', '*.jpg')))[:2]
    assert len(shapes) == 4 and len(photos) == 2
    return shapes + photos


def test_demo_draws_its_validation_predictions(trained):
    """The demo's validation draws with MMDetection's DetVisualizationHook,
    and train.py says where (DEMO_SMALL: one batch of 4 images)."""
    cwd, _, _, proc = trained
    [folder] = glob.glob(str(cwd / 'work' / '*' / 'vis_data' / 'vis_image'))
    drawn = glob.glob(osp.join(folder, '*.png'))
    assert len(drawn) == 1
    assert (f'Drawn predictions (1 validation images, ground truth left, '
            f'predictions right): {folder}') in proc.stdout
    # Ground truth and prediction side by side, each at the image's size.
    image = mmcv.imread(drawn[0])
    assert image.shape == (128, 320, 3)


def test_published_checkpoint_is_weights_and_plain_metadata(
        trained, published):
    _, _, ckpt, _ = trained
    weights, config, proc = published
    with open(weights, 'rb') as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert osp.basename(weights) == f'{NAME}-{sha[:8]}.pth'
    assert sorted(os.listdir(osp.dirname(weights))) == sorted(
        [osp.basename(weights), f'{NAME}.py'])  # no temporary left
    # Only what torch's weights_only unpickler takes with no allow-list:
    # gc_mm's is set aside here (the training checkpoint then needs it).
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint
        assert unsafe(weights) == []
        assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe(ckpt)
        got = torch.load(weights, map_location='cpu', weights_only=True)
    finally:
        torch.serialization.add_safe_globals(allowed)
    assert sorted(got) == ['meta', 'state_dict']
    meta = got['meta']
    assert meta['dataset_meta']['classes'] == (
        'circle', 'square', 'triangle', 'hexagon')
    assert meta['config'] == f'{NAME}.py'
    assert (meta['optimizer'], meta['optim_wrapper']) == ('SGD_GC',
                                                          'OptimWrapper')
    assert meta['gc_mm_version'] == gc_mm.__version__
    import mmdet
    assert meta['mmdet_version'] == mmdet.__version__
    assert (meta['epoch'], meta['iter']) == (1, 2)
    original = checkpoint(ckpt)['state_dict']
    assert got['state_dict'].keys() == original.keys()
    for key, value in original.items():
        torch.testing.assert_close(got['state_dict'][key], value, rtol=0,
                                   atol=0, msg=key)
    assert f'Published checkpoint: {weights}' in proc.stdout
    assert ('Note: config used ShapesDataset from gc_mm; the published '
            'config uses CocoDataset with the same classes.') in proc.stdout


def test_published_config_needs_no_gc_mm(published):
    _, config, _ = published
    text = open(config).read()
    for gone in ('gc_mm', 'ShapesDataset', 'SGD_GC', 'GradStatsHook',
                 'RandomStateHook'):
        assert gone not in text, gone
    cfg = Config.fromfile(config)
    for gone in ('custom_imports', 'optim_wrapper', 'param_scheduler',
                 'train_cfg', 'train_dataloader', 'work_dir'):
        assert gone not in cfg, gone
    assert cfg.custom_hooks == [] and cfg.load_from is None
    for loader in ('val_dataloader', 'test_dataloader'):
        dataset = cfg[loader].dataset
        assert dataset.type == 'CocoDataset'
        assert dataset.metainfo.classes == [
            'circle', 'square', 'triangle', 'hexagon']
        assert 'generator' not in dataset
    assert cfg.model.roi_head.bbox_head.num_classes == 4


def test_published_model_predicts_the_same_without_gc_mm(
        trained, published, images, tmp_path):
    """Stock init_detector + inference_detector, in a Python where gc_mm
    cannot be imported, give the predictions of the trained model loaded
    with gc_mm, on shapes and balloon images."""
    from mmdet.apis import inference_detector, init_detector
    cwd, config, ckpt, _ = trained
    weights, published_config, _ = published
    blocker = tmp_path / 'blocker'
    blocker.mkdir()
    (blocker / 'sitecustomize.py').write_text(BLOCK_GC_MM)
    script = tmp_path / 'stock_predict.py'
    script.write_text(STOCK_PREDICT)
    out = tmp_path / 'stock.pth'
    proc = run_tool([str(script), published_config, weights, ckpt, str(out),
                     *images], cwd=tmp_path,
                    env=dict(PYTHONPATH=str(blocker)))
    assert 'import gc_mm: gc_mm is blocked' in proc.stdout
    assert 'training checkpoint refused: UnpicklingError' in proc.stdout
    stock = torch.load(out, weights_only=True)
    assert stock['classes'] == ['circle', 'square', 'triangle', 'hexagon']

    model = init_detector(config, ckpt, palette='random', device='cpu')
    assert len(stock['results']) == len(images)
    for image, got in zip(images, stock['results']):
        want = inference_detector(model, image).pred_instances
        assert len(want) > 0, image  # the comparison compares something
        torch.testing.assert_close(got['labels'], want.labels, rtol=0, atol=0)
        torch.testing.assert_close(got['scores'], want.scores, rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(got['bboxes'], want.bboxes, rtol=1e-5,
                                   atol=1e-3)
        assert got['masks'].shape == want.masks.shape
        assert (got['masks'] != want.masks).float().mean() < 1e-3


def outline(bbox, shape):
    """The pixels (rows, cols) of a box's outline, inside the image."""
    height, width = shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in bbox)
    x1, x2 = np.clip([x1, x2], 0, width - 1)
    y1, y2 = np.clip([y1, y2], 0, height - 1)
    cols = np.arange(x1, x2 + 1)
    rows = np.arange(y1, y2 + 1)
    return (np.concatenate([np.full_like(cols, y1), np.full_like(cols, y2),
                            rows, rows]),
            np.concatenate([cols, cols, np.full_like(rows, x1),
                            np.full_like(rows, x2)]))


@pytest.fixture(scope='module')
def inferred(trained, published, images, tmp_path_factory):
    """infer.py on the published pair, every prediction (--score-thr 0),
    the demo's validation folder and two photos as files."""
    cwd = trained[0]
    weights, config, _ = published
    out_dir = tmp_path_factory.mktemp('infer') / 'out'
    folder = tmp_path_factory.mktemp('shapes')
    for path in images[:4]:
        os.symlink(path, folder / osp.basename(path))
    proc = run_tool([INFER, config, weights, str(folder), *images[4:],
                     '--out-dir', str(out_dir), '--score-thr', '0',
                     '--device', 'cpu'], cwd=cwd)
    return out_dir, proc


def test_infer_draws_every_prediction_and_saves_them(inferred, images):
    out_dir, proc = inferred
    classes = ['circle', 'square', 'triangle', 'hexagon']
    total = 0
    for path in images:
        stem = osp.splitext(osp.basename(path))[0]
        original = mmcv.imread(path)
        drawn = mmcv.imread(out_dir / 'vis' / f'{stem}.png')
        assert drawn.shape == original.shape
        with open(out_dir / 'preds' / f'{stem}.json') as f:
            pred = json.load(f)
        count = len(pred['scores'])
        assert count > 0, path  # there IS a detection drawn
        assert all(len(pred[key]) == count for key in (
            'labels', 'bboxes', 'masks', 'label_names'))
        assert pred['label_names'] == [classes[i] for i in pred['labels']]
        assert pred['masks'][0]['size'] == list(original.shape[:2])
        # Each box's outline is drawn: most of its pixels changed.
        changed = (drawn != original).any(axis=2)
        for bbox in pred['bboxes']:
            assert changed[outline(bbox, original.shape)].mean() > 0.5, bbox
        total += count
    assert (f'{len(images)} images, {total} predictions above score 0.0: '
            in proc.stdout)


def test_infer_honours_the_score_threshold_on_a_training_checkpoint(
        trained, inferred, images, tmp_path):
    """A training checkpoint (gc_mm's allow-list loads it) and its
    training config give the published model's predictions; a threshold
    keeps only the predictions above it, in the PNG and the JSON."""
    _, config, ckpt, _ = trained
    everything, _ = inferred
    scores = []
    for path in images:
        stem = osp.splitext(osp.basename(path))[0]
        with open(everything / 'preds' / f'{stem}.json') as f:
            scores.append(json.load(f)['scores'])
    # The lowest of the images' best scores: that image gets nothing drawn.
    threshold = min(max(s) for s in scores)
    out_dir = tmp_path / 'out'
    run_tool([INFER, config, ckpt, *images, '--out-dir', str(out_dir),
              '--score-thr', repr(threshold), '--device', 'cpu'],
             cwd=tmp_path)
    # The training config's ShapesDataset was not built (it would have
    # written its data into the working directory).
    assert not (tmp_path / 'data').exists()
    kept_total = 0
    for path in images:
        stem = osp.splitext(osp.basename(path))[0]
        with open(everything / 'preds' / f'{stem}.json') as f:
            every = json.load(f)
        with open(out_dir / 'preds' / f'{stem}.json') as f:
            kept = json.load(f)
        above = [i for i, s in enumerate(every['scores']) if s > threshold]
        assert len(kept['scores']) == len(above), path
        np.testing.assert_allclose(kept['scores'],
                                   [every['scores'][i] for i in above],
                                   rtol=1e-5)
        np.testing.assert_allclose(
            np.reshape(kept['bboxes'], (-1, 4)),
            np.reshape([every['bboxes'][i] for i in above], (-1, 4)),
            atol=1e-3)
        drawn = mmcv.imread(out_dir / 'vis' / f'{stem}.png')
        if not above:  # nothing above the threshold: nothing drawn
            assert np.array_equal(drawn, mmcv.imread(path)), path
        kept_total += len(above)
    assert 0 < kept_total < sum(map(len, scores))


@pytest.mark.parametrize('case,message', [
    ('config', "CONFIG: '{missing}' does not exist."),
    ('checkpoint', "CHECKPOINT: checkpoint '{missing}' does not exist."),
    ('no_state_dict', "has no state_dict of tensors"),
    ('other_model', 'does not fit the model of CONFIG (missing: '),
    ('other_classes', 'does not fit the model of CONFIG (shapes: '
     'roi_head.bbox_head.fc_cls.weight [4, '),
])
def test_publish_refuses_bad_input_writing_nothing(trained, tmp_path, case,
                                                   message):
    _, config, ckpt, _ = trained
    missing = str(tmp_path / 'missing.pth')
    if case == 'config':
        config = missing
    elif case == 'checkpoint':
        ckpt = missing
    elif case == 'no_state_dict':
        ckpt = str(tmp_path / 'meta_only.pth')
        torch.save({'meta': {'epoch': 1}}, ckpt)
    elif case == 'other_model':  # the box head is gone
        state = checkpoint(ckpt)['state_dict']
        ckpt = str(tmp_path / 'other.pth')
        torch.save({'state_dict': {k: v for k, v in state.items()
                                   if 'bbox_head' not in k}}, ckpt)
    else:  # the same model trained on 3 classes, not 4
        state = checkpoint(ckpt)['state_dict']
        rows = dict(fc_cls=3 + 1, fc_reg=3 * 4, conv_logits=3)
        for key in state:
            layer = key.split('.')[-2]
            if layer in rows:
                state[key] = state[key][:rows[layer]]
        ckpt = str(tmp_path / 'three_classes.pth')
        torch.save({'state_dict': state}, ckpt)
    out_dir = tmp_path / 'zoo'
    with pytest.raises(ConfigError) as error:
        publish_model.publish(config, ckpt, str(out_dir))
    assert message.format(missing=missing) in str(error.value)
    assert '\n' not in str(error.value)  # one line
    assert not out_dir.exists()


def test_publish_refuses_an_out_dir_that_holds_a_published_model(
        trained, published, tmp_path):
    """A second publish into the same folder is refused by the tool before
    any loading, and the first pair is untouched."""
    cwd, config, ckpt, _ = trained
    weights, published_config, _ = published
    out_dir = osp.dirname(weights)
    before = {name: os.stat(osp.join(out_dir, name)).st_mtime_ns
              for name in os.listdir(out_dir)}
    proc = run_tool([PUBLISH, config, ckpt, out_dir], cwd=cwd, check=False)
    assert proc.returncode != 0
    assert (f"error: OUT_DIR: '{out_dir}' already holds "
            f'{", ".join(sorted(before))}; choose another folder or remove '
            'them.') in proc.stderr
    after = {name: os.stat(osp.join(out_dir, name)).st_mtime_ns
             for name in os.listdir(out_dir)}
    assert after == before


def test_publish_refuses_a_model_made_of_gc_mm_classes(trained, tmp_path):
    """A gc_mm type the published config would need (here in the model) is
    named, and nothing is written."""
    _, config, ckpt, _ = trained
    cfg = Config.fromfile(config)
    cfg.model.backbone.type = 'GradStatsHook'  # any gc_mm registered type
    with pytest.raises(ConfigError, match=(
            r"model\.backbone\.type='GradStatsHook' is a gc_mm class: the "
            'model needs gc_mm')):
        publish_model.inference_config(cfg)


def test_infer_refuses_bad_input_before_loading(trained, published, images,
                                                tmp_path):
    weights, config, _ = published
    empty = tmp_path / 'empty'
    empty.mkdir()
    twin = tmp_path / 'twin'
    twin.mkdir()
    os.symlink(images[0], twin / osp.basename(images[0]))
    for inputs, message in (
            ([str(tmp_path / 'nope.png')],
             f"input '{tmp_path / 'nope.png'}' does not exist."),
            ([str(empty)], f"input folder '{empty}' holds no images"),
            ([images[0], str(twin)], 'would both write 00000.png and '
             '00000.json')):
        with pytest.raises(ConfigError) as error:
            infer.collect_images(inputs)
        assert message in str(error.value)
    out_dir = tmp_path / 'out'
    proc = run_tool([INFER, config, str(tmp_path / 'missing.pth'),
                     images[0], '--out-dir', str(out_dir)], cwd=tmp_path,
                    check=False)
    assert proc.returncode != 0
    assert (f"error: checkpoint: checkpoint '{tmp_path / 'missing.pth'}' "
            'does not exist.') in proc.stderr
    assert not out_dir.exists()


DRAW_TWO_MASKS = """
import sys
import numpy as np
import torch
import gc_mm  # noqa: F401
assert 'mmdet' not in sys.modules  # the fix waits for mmdet's visualizer
from mmengine.structures import InstanceData
from mmdet.structures import DetDataSample
from mmdet.visualization import DetLocalVisualizer

visualizer = DetLocalVisualizer()
visualizer.dataset_meta = dict(classes=('a', 'b'), palette=[(255, 0, 0),
                                                            (0, 255, 0)])
instances = InstanceData(
    bboxes=torch.tensor([[5., 5., 30., 30.], [35., 35., 60., 60.]]),
    scores=torch.tensor([0.9, 0.8]), labels=torch.tensor([0, 0]),
    masks=torch.zeros(2, 64, 64, dtype=torch.bool))
instances.masks[0, 5:30, 5:30] = True
instances.masks[1, 35:60, 35:60] = True
sample = DetDataSample(pred_instances=instances)
np.random.seed(0)
want = np.random.rand(3)
np.random.seed(0)
visualizer.add_datasample('x', np.zeros((64, 64, 3), np.uint8), sample,
                          draw_gt=False)
print('global stream kept:', np.array_equal(np.random.rand(3), want))
image = visualizer.get_image()
print('masks of one class told apart:', not np.array_equal(image[20, 20],
                                                         image[50, 50]))
"""


def test_drawing_masks_leaves_numpy_global_generator(tmp_path):
    """mmdet's visualizer jitters mask colours with numpy's global
    generator; with gc_mm imported it takes its own, so drawing during a
    validation (the demo's DetVisualizationHook) does not change the later
    random augmentation. The jitter still tells instances apart."""
    script = tmp_path / 'draw.py'
    script.write_text(DRAW_TWO_MASKS)
    proc = run_tool([str(script)], cwd=tmp_path)
    assert 'global stream kept: True' in proc.stdout
    assert 'masks of one class told apart: True' in proc.stdout


USER_MODULE = """
from mmdet.models.necks import FPN
from mmdet.registry import MODELS


@MODELS.register_module()
class UserFPN(FPN):
    \"\"\"A user's own neck, registered by their module.\"\"\"
"""

STOCK_LOAD = """
import sys
from mmdet.apis import init_detector
model = init_detector(sys.argv[1], sys.argv[2], device='cpu')
print('loaded', type(model.neck).__name__)
assert not [m for m in sys.modules if m.split('.')[0] == 'gc_mm']
"""


def test_publish_keeps_the_users_own_custom_imports(trained, tmp_path):
    """A model made with the user's own module (imported by custom_imports
    beside gc_mm) is published with that import kept, gc_mm's left out;
    the pair loads without gc_mm where that module is importable, and the
    tool says so."""
    cwd, config, ckpt, _ = trained
    ext = tmp_path / 'ext'
    ext.mkdir()
    (ext / 'user_necks.py').write_text(USER_MODULE)
    user_config = tmp_path / 'user_model.py'
    user_config.write_text(
        f"_base_ = '{config}'\n"
        "custom_imports = dict(imports=['gc_mm', 'gc_mm.datasets', "
        "'user_necks'], allow_failed_imports=False)\n"
        "model = dict(neck=dict(type='UserFPN'))\n")
    out_dir = tmp_path / 'zoo'
    proc = run_tool([PUBLISH, str(user_config), ckpt, str(out_dir)], cwd=cwd,
                    env=dict(PYTHONPATH=str(ext)))
    published = Config.fromfile(str(out_dir / 'user_model.py'),
                                import_custom_modules=False)
    assert published.custom_imports == dict(imports=['user_necks'],
                                            allow_failed_imports=False)
    assert 'gc_mm' not in (out_dir / 'user_model.py').read_text()
    assert ('Note: custom_imports: user_necks kept (not gc_mm): the '
            'published pair needs it importable.') in proc.stdout
    assert ('Both load without gc_mm, with user_necks importable (the '
            "config's custom_imports): ") in proc.stdout
    [weights] = glob.glob(str(out_dir / 'user_model-*.pth'))
    blocker = tmp_path / 'blocker'
    blocker.mkdir()
    (blocker / 'sitecustomize.py').write_text(BLOCK_GC_MM)
    script = tmp_path / 'stock_load.py'
    script.write_text(STOCK_LOAD)
    proc = run_tool([str(script), str(out_dir / 'user_model.py'), weights],
                    cwd=tmp_path, env=dict(PYTHONPATH=f'{blocker}:{ext}'))
    assert 'loaded UserFPN' in proc.stdout


def test_infer_labels_a_checkpoint_without_meta_with_the_configs_classes(
        trained, images, tmp_path):
    """A checkpoint of weights only (no meta.dataset_meta) is labelled with
    the classes of its config, as publish_model.py publishes them, not with
    COCO's."""
    _, config, ckpt, _ = trained
    weights = tmp_path / 'weights_only.pth'
    torch.save({'state_dict': checkpoint(ckpt)['state_dict']}, weights)
    out_dir = tmp_path / 'out'
    run_tool([INFER, config, str(weights), *images[:2], '--out-dir',
              str(out_dir), '--score-thr', '0', '--device', 'cpu'],
             cwd=tmp_path)
    classes = ['circle', 'square', 'triangle', 'hexagon']
    names = []
    for path in images[:2]:
        stem = osp.splitext(osp.basename(path))[0]
        with open(out_dir / 'preds' / f'{stem}.json') as f:
            pred = json.load(f)
        assert pred['label_names'] == [classes[i] for i in pred['labels']]
        names += pred['label_names']
    assert names  # something was labelled
