"""Filter pruning (tools/prune.py, gc_mm.pruning) on real mmdet modules: the
couplings of ResNet, ResNeXt's grouped convolutions, GN and FPN; a pruned
model is a config and a checkpoint that load with strict keys and
weights_only=True and go through the real tools (prune -> test -> fine-tune
-> test in one --rounds run, then resume, publish, infer); bad input is
refused in one line with nothing written."""
import copy
import glob
import json
import os.path as osp
import sys

import pytest
import torch
from mmengine.config import Config

pytest.importorskip('mmdet')  # see conftest.py

import gc_mm  # noqa: E402,F401
from conftest import REPO, run_tool  # noqa: E402
from gc_mm.pruning.model import (build_detector, model_widths,  # noqa: E402
                                 pruned_config)
from gc_mm.pruning.prune import prune_detector  # noqa: E402

DEMO = osp.join(REPO, 'configs/demo/mask_rcnn_r18_fpn_shapes.py')
REBIRTH_GC = osp.join(REPO,
                      'configs/prune/mask_rcnn_r18_fpn_gc_shapes_rebirth.py')
PRUNE = osp.join(REPO, 'tools/prune.py')
TRAIN = osp.join(REPO, 'tools/train.py')
PUBLISH = osp.join(REPO, 'tools/publish_model.py')
INFER = osp.join(REPO, 'tools/infer.py')

sys.path.insert(0, osp.join(REPO, 'tools'))
try:
    import prune as prune_tool
finally:
    sys.path.pop(0)

# The demo on 4 images: one iteration per epoch, and a 4-image test set.
SMALL = """_base_ = '{base}'
train_dataloader = dict(dataset=dict(indices=4))
val_dataloader = dict(dataset=dict(indices=4))
test_dataloader = val_dataloader
randomness = dict(seed=0)
"""
SMALL_FINETUNE = SMALL + """max_epochs = 1
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
default_hooks = dict(checkpoint=dict(interval=1), logger=dict(interval=1))
"""


def image_and_samples(size=128):
    from mmdet.structures import DetDataSample
    meta = dict(img_shape=(size, size), ori_shape=(size, size),
                pad_shape=(size, size), batch_input_shape=(size, size),
                scale_factor=(1.0, 1.0))
    image = torch.randn(1, 3, size, size,
                        generator=torch.Generator().manual_seed(0))
    return image, [DetDataSample(metainfo=meta)]


def predict(model):
    image, samples = image_and_samples()
    with torch.no_grad():
        return model.eval()(image, samples, mode='tensor')


def demo_model(**changes):
    cfg = Config.fromfile(DEMO)
    cfg.merge_from_dict(changes)
    torch.manual_seed(0)
    return cfg, build_detector(cfg)


def out_widths(widths, name):
    return widths[name].get('out_channels', widths[name].get('out_features'))


def test_resnet_fpn_and_heads_couplings():
    """R18-FPN Mask R-CNN at 50% per layer: the stem and layer1 share one
    residual stream, each later stage's stream includes its downsample
    convolution and the FPN lateral reading it; FPN's laterals (added
    top-down) are one group; the parts' output layers keep every filter;
    the inner widths of the heads are halved; L1 keeps the filters with the
    largest L1 norm over their group; the pruned model predicts."""
    _, model = demo_model()
    original = copy.deepcopy(model)
    result = prune_detector(model, 0.5, method='l1')
    w = model_widths(model)
    stream = w['backbone.conv1']['out_channels']
    assert stream == 32 and w['backbone.bn1'] == dict(num_features=32)
    for block in range(2):
        assert w[f'backbone.layer1.{block}.conv2']['out_channels'] == stream
        assert w[f'backbone.layer1.{block}.conv1']['in_channels'] == stream
    assert w['backbone.layer2.0.downsample.0']['in_channels'] == stream
    assert w['neck.lateral_convs.0.conv']['in_channels'] == stream
    for stage, channels in ((2, 128), (3, 256), (4, 512)):
        layer = f'backbone.layer{stage}'
        outs = {w[f'{layer}.0.downsample.0']['out_channels'],
                w[f'{layer}.0.conv2']['out_channels'],
                w[f'{layer}.1.conv2']['out_channels'],
                w[f'neck.lateral_convs.{stage - 1}.conv']['in_channels']}
        assert outs == {channels // 2}
        assert w[f'{layer}.0.conv1']['out_channels'] == channels // 2
    assert {out_widths(w, f'neck.lateral_convs.{i}.conv')
            for i in range(4)} == {32}
    assert [w[f'neck.fpn_convs.{i}.conv'] for i in range(4)] == [
        dict(in_channels=32, out_channels=64)] * 4
    assert result['kept'] == sorted(
        [f'neck.fpn_convs.{i}.conv' for i in range(4)] + [
            'roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg',
            'roi_head.mask_head.conv_logits', 'rpn_head.rpn_cls',
            'rpn_head.rpn_reg'])
    assert w['rpn_head.rpn_conv'] == dict(in_channels=64, out_channels=32)
    assert w['roi_head.bbox_head.shared_fcs.0'] == dict(in_features=3136,
                                                        out_features=128)
    assert w['roi_head.bbox_head.fc_cls'] == dict(in_features=128,
                                                  out_features=5)
    assert w['roi_head.mask_head.upsample'] == dict(in_channels=32,
                                                    out_channels=32)
    assert w['roi_head.mask_head.conv_logits'] == dict(in_channels=32,
                                                       out_channels=4)
    # The first mask conv's group: its filters and the next conv's inputs.
    first = original.roi_head.mask_head.convs[0].conv.weight
    second = original.roi_head.mask_head.convs[1].conv.weight
    group_l1 = (first.abs().sum((1, 2, 3)) / first.abs().sum((1, 2, 3)).mean()
                + second.abs().sum((0, 2, 3)) /
                second.abs().sum((0, 2, 3)).mean())
    kept = sorted(group_l1.topk(32).indices.tolist())
    torch.testing.assert_close(model.roi_head.mask_head.convs[0].conv.weight,
                               first[kept], rtol=0, atol=0)
    params = sum(p.numel() for p in model.parameters())
    assert result['params'] == (
        sum(p.numel() for p in original.parameters()), params)
    bbox_scores, *_ = predict(model)[0]  # runs end to end
    assert bbox_scores.shape[-1] == 5


def test_resnext_groups_and_gn_couplings(tmp_path):
    """ResNeXt-50 32x4d with GN in the backbone, FPN and mask head, pruned
    globally by FPGM: grouped convolutions keep their 32 groups with the
    same share of every group, GN keeps its groups; the config written for
    it rebuilds the same model (strict keys, same predictions)."""
    gn = dict(type='GN', num_groups=32, requires_grad=True)
    cfg, model = demo_model(**{
        'model.backbone': dict(type='ResNeXt', depth=50, groups=32,
                               base_width=4, norm_cfg=gn),
        'model.neck.in_channels': [256, 512, 1024, 2048],
        'model.neck.norm_cfg': gn,
        'model.roi_head.mask_head.norm_cfg': gn})
    before = model_widths(model)
    prune_detector(model, 0.3, method='fpgm', global_pruning=True,
                   keep=['backbone.conv1'])
    after = model_widths(model)
    modules = dict(model.named_modules())
    grouped = [n for n, m in modules.items()
               if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(grouped) == 16  # every Bottleneck's conv2
    assert any(after[n] != before[n] for n in grouped)
    for name in grouped:  # the same number of channels in every group
        conv = modules[name]
        assert conv.groups == 32 and conv.in_channels % 32 == 0
        assert conv.out_channels % 32 == 0
        assert conv.weight.shape[1] == conv.in_channels // 32
    norms = [m for m in modules.values() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.num_channels % 32 == 0
                         for m in norms)
    assert after['backbone.conv1'] == before['backbone.conv1']  # --keep
    removed = sum(before[n]['out_channels'] - w['out_channels']
                  for n, w in after.items() if 'out_channels' in w)
    assert removed > 0
    # The pruned architecture as a config: same keys, same predictions.
    widths = {n: w for n, w in after.items() if w != before[n]}
    rebuilt_cfg = copy.deepcopy(cfg)
    rebuilt_cfg.model = pruned_config(cfg.model.to_dict(), widths)
    rebuilt = build_detector(rebuilt_cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    for a, b in zip(predict(model)[0], predict(rebuilt)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(scope='module')
def rounds(tmp_path_factory):
    """One --rounds 1 run of tools/prune.py on a demo model: evaluate it,
    prune 50% (stem kept), evaluate, fine-tune one iteration with the GC
    rebirth recipe (tools/train.py), evaluate."""
    cwd = tmp_path_factory.mktemp('prune')
    small = cwd / 'small.py'
    small.write_text(SMALL.format(base=DEMO))
    finetune = cwd / 'small_finetune.py'
    finetune.write_text(SMALL_FINETUNE.format(base=REBIRTH_GC))
    cfg, model = demo_model()
    original = cwd / 'original.pth'
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=dict(
                        classes=['square', 'circle', 'triangle', 'star']))),
               original)
    proc = run_tool([PRUNE, str(small), str(original), '--ratio', '0.5',
                     '--keep', 'backbone.conv1', '--rounds', '1',
                     '--finetune-config', str(finetune), '--out',
                     str(cwd / 'out')], cwd=cwd)
    folder = cwd / 'out' / 'round1'
    return dict(cwd=cwd, proc=proc, small=str(small), original=str(original),
                config=str(folder / 'small_round1.py'),
                weights=str(folder / 'small_round1.pth'),
                finetune=str(folder / 'finetune'),
                params=sum(p.numel() for p in model.parameters()))


def test_rounds_prune_finetune_and_evaluate(rounds):
    out = rounds['proc'].stdout
    assert 'original: bbox AP' in out and 'segm AP' in out
    assert 'Round 1/1: pruning 50.0% of the remaining filters' in out
    assert '  fine-tuned: bbox AP' in out
    table = out[out.index('round      params'):].splitlines()
    assert table[1].startswith('original') and table[2].startswith('round 1')
    cfg = Config.fromfile(rounds['config'])
    model = build_detector(cfg)
    params = sum(p.numel() for p in model.parameters())
    assert f'{params:,}' in table[2]
    # Half the filters of most layers: a quarter of their weights stay.
    assert 0.25 < params / rounds['params'] < 0.3
    assert osp.isfile(osp.join(rounds['finetune'], 'epoch_1.pth'))
    # The stem was kept whole (--keep backbone.conv1).
    assert 'backbone.conv1' not in cfg.model.pruned_shapes
    assert cfg.model.pruned_shapes['backbone.layer2.0.conv1'] == dict(
        in_channels=64, out_channels=64)


def test_pruned_pair_loads_strict_with_weights_only(rounds):
    """The written config rebuilds the pruned model (gc_mm.pruning's
    PrunedModel, its only gc_mm need beyond the recipe's) and its weights
    load into it with strict keys from a weights_only=True load; the
    fine-tuned checkpoint does too."""
    cfg = Config.fromfile(rounds['config'])
    assert cfg.model.type == 'PrunedModel'
    assert cfg.model.pruned_type == 'MaskRCNN'
    assert 'gc_mm.pruning' in cfg.custom_imports.imports
    assert cfg.load_from == rounds['weights']
    model = build_detector(cfg)
    checkpoint = torch.load(rounds['weights'], map_location='cpu',
                            weights_only=True)
    model.load_state_dict(checkpoint['state_dict'], strict=True)
    assert checkpoint['meta']['dataset_meta']['classes'][0] == 'square'
    assert checkpoint['meta']['pruning']['ratio'] == 0.5
    tuned = torch.load(osp.join(rounds['finetune'], 'epoch_1.pth'),
                       map_location='cpu', weights_only=True)
    model.load_state_dict(tuned['state_dict'], strict=True)


def test_pruned_model_resumes(rounds, tmp_path):
    """--resume of the fine-tuning continues from its epoch_1.pth into a
    second epoch, with the pruned model."""
    work_dir = tmp_path / 'resumed'
    run_tool([TRAIN, rounds['config'], '--work-dir', str(work_dir),
              '--resume', osp.join(rounds['finetune'], 'epoch_1.pth'),
              '--cfg-options', 'train_cfg.max_epochs=2'], cwd=rounds['cwd'])
    log = glob.glob(str(work_dir / '*' / '*.log'))
    text = open(log[0]).read()
    assert 'resumed epoch: 1, iter: 1' in text
    checkpoint = torch.load(work_dir / 'epoch_2.pth', map_location='cpu',
                            weights_only=True)
    assert checkpoint['meta']['epoch'] == 2
    model = build_detector(Config.fromfile(rounds['config']))
    model.load_state_dict(checkpoint['state_dict'], strict=True)


def test_pruned_model_publishes_and_infers(rounds, tmp_path):
    """publish_model.py keeps gc_mm.pruning (only) in the published config
    and says so; infer.py draws the published pair's predictions."""
    zoo = tmp_path / 'zoo'
    proc = run_tool([PUBLISH, rounds['config'],
                     osp.join(rounds['finetune'], 'epoch_1.pth'), str(zoo)],
                    cwd=rounds['cwd'])
    assert 'custom_imports keeps gc_mm.pruning' in proc.stdout
    assert 'Both load with gc_mm installed (for gc_mm.pruning' in proc.stdout
    [weights] = glob.glob(str(zoo / 'small_round1-*.pth'))
    published = Config.fromfile(zoo / 'small_round1.py')
    assert published.custom_imports.imports == ['gc_mm.pruning']
    assert 'optim_wrapper' not in published
    image = sorted(glob.glob(str(rounds['cwd'] / 'data/shapes/val/*.png')))[0]
    run_tool([INFER, str(zoo / 'small_round1.py'), weights, image,
              '--out-dir', str(tmp_path / 'outputs'), '--device', 'cpu',
              '--score-thr', '0'], cwd=rounds['cwd'])
    [preds] = glob.glob(str(tmp_path / 'outputs' / 'preds' / '*.json'))
    assert 'scores' in json.load(open(preds))


def refused(monkeypatch, *args) -> str:
    """tools/prune.py's one-line refusal of ``args``."""
    monkeypatch.setattr(sys, 'argv', ['prune.py', *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        prune_tool.main()
    message = str(exit_info.value.code)
    assert message.startswith('error: ') and '\n' not in message
    return message


def test_bad_input_is_refused_in_one_line_with_nothing_written(
        rounds, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    small, original = rounds['small'], rounds['original']
    assert refused(monkeypatch, small, original, '--ratio', '1.5', '--out',
                   out) == ('error: --ratio 1.5: must be in (0, 1), the '
                            'share of filters removed.')
    assert refused(monkeypatch, small, original, '--ratio', '0',
                   '--out', out).startswith('error: --ratio 0.0: must be')
    assert refused(monkeypatch, small, original, '--ratio', '0.3', '--keep',
                   'backbone.conv1', 'backbone.layer9*', '--out', out) == (
        "error: --keep 'backbone.layer9*' matches no module of the model "
        '(its modules are named like backbone.layer1.0.conv1; top level: '
        'data_preprocessor, backbone, neck, rpn_head, roi_head).')
    # The pruned weights do not fit the unpruned config.
    message = refused(monkeypatch, small, rounds['weights'], '--ratio',
                      '0.3', '--out', out)
    assert message.startswith(
        f"error: CHECKPOINT: '{rounds['weights']}' does not fit the model "
        'of the config (shapes: backbone.layer1.0.conv1.weight [32, 64, 3, '
        '3] (model [64, 64, 3, 3])')
    assert refused(monkeypatch, small, original, '--ratio', '0.3',
                   '--rounds', '2', '--out', out) == (
        'error: --rounds needs --finetune-config (the recipe each round '
        'fine-tunes with).')
    assert not out.exists()


def test_benchmark_measures_both_models(rounds, tmp_path, monkeypatch):
    """benchmark_pruned.py measures the original and the pruned model in
    one run: their parameters and FLOPs, checkpoint sizes and latencies
    (timings are reported, not asserted)."""
    sys.path.insert(0, osp.join(REPO, 'tools', 'analysis'))
    try:
        import benchmark_pruned
    finally:
        sys.path.pop(0)
    report = tmp_path / 'bench.json'
    monkeypatch.chdir(rounds['cwd'])  # the demo data: data/shapes/
    monkeypatch.setattr(sys, 'argv', [
        'benchmark_pruned.py', rounds['small'], rounds['original'],
        rounds['config'], rounds['weights'], '--repeats', '1', '--warmup',
        '0', '--json', str(report)])
    benchmark_pruned.main()
    result = json.load(open(report))
    model = build_detector(Config.fromfile(rounds['config']))
    assert result['original']['params'] == rounds['params']
    assert result['pruned']['params'] == sum(
        p.numel() for p in model.parameters())
    assert 0 < result['pruned']['flops'] < result['original']['flops']
    assert result['pruned']['checkpoint_bytes'] == osp.getsize(
        rounds['weights'])
    assert result['pruned']['latency_ms'] > 0
