"""Benchmark GC optimizer steps against torch.optim and the authors' loop.

Builds the trainable parameters of a real detector from a config (default
Mask R-CNN R50-FPN), or from their shapes saved in a JSON file (``--shapes``;
no mmdet needed), fills random gradients and times one optimizer step of
each variant, interleaved, after warm-up (CUDA: CUDA events); prints medians
and ratios and writes JSON (and ``--markdown``, a table). ``--e2e N`` also trains a config and its GC twin
(``--e2e-config``, ``--e2e-twin``; the demo pair by default) for N
iterations each through the MMEngine runner, then times each one's optim
wrapper on its own model: GC changes only the step, so the step-time
difference over the iteration time is GC's overhead per iteration.

    python tools/analysis/benchmark_gc.py                       # CPU
    python tools/analysis/benchmark_gc.py --device cuda
    python tools/analysis/benchmark_gc.py --shapes tools/analysis/shapes/mask_rcnn_r50_fpn.json --device cuda
    python tools/analysis/benchmark_gc.py --config configs/mask_rcnn_r50_gc.py --dump-shapes r50.json
    python tools/analysis/benchmark_gc.py --config configs/faster_rcnn_x101_64x4d.py
    python tools/analysis/benchmark_gc.py --e2e 20 --skip-steps
    python tools/analysis/benchmark_gc.py --families adamw --only AdamW_GC
"""
import argparse
import json
import math
import os.path as osp
import platform
import re
import statistics
import time

import torch
from mmengine.config import Config
from torch.profiler import ProfilerActivity, profile

import gc_mm
from gc_mm import GCOptimWrapper, kernels
from gc_mm.compat import silence_pkg_resources_warning

# Before Config.fromfile, whose mmengine imports pkg_resources.
silence_pkg_resources_warning()


def build_model(config: str):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    return cfg, MODELS.build(cfg.model)


def trainable_shapes(config: str):
    _, model = build_model(config)
    return [p.shape for p in model.parameters() if p.requires_grad]


def dump_shapes(config: str, path: str) -> dict:
    """Write the trainable parameters of ``config``'s model, in the order
    its optimizer steps them, each with its shape and whether its gradient
    gets GC there (as the config's optim wrapper and optimizer decide), so
    that ``--shapes`` times real shapes without mmdet."""
    from mmengine.optim import build_optim_wrapper

    from gc_mm.centralize import is_centralized
    from gc_mm.constructor import applied_gc_mode
    from gc_mm.optimizers import inner_optimizer
    cfg, model = build_model(config)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    names = {id(p): name for name, p in model.named_parameters()}
    params = []
    for group in inner_optimizer(wrapper.optimizer).param_groups:
        mode = applied_gc_mode(wrapper, group)
        for p in group['params']:
            if not p.requires_grad:  # frozen stages: never stepped
                continue
            entry = dict(name=names[id(p)], shape=list(p.shape),
                         gc=is_centralized(p, mode))
            if entry['gc'] and group.get('gc_out_dim', 0):
                entry['gc_out_dim'] = group['gc_out_dim']
            params.append(entry)
    spec = dict(config=config, model=cfg.model.type,
                backbone=cfg.model.backbone.type,
                optimizer=type(inner_optimizer(wrapper.optimizer)).__name__,
                tensors=len(params),
                parameters=sum(math.prod(p['shape']) for p in params),
                gc_tensors=sum(p['gc'] for p in params), params=params)
    # One parameter a line: small, and its diffs readable.
    head = json.dumps({k: v for k, v in spec.items() if k != 'params'},
                      indent=1)
    with open(path, 'w') as f:
        f.write(head[:-2] + ',\n "params": [\n' +
                ',\n'.join('  ' + json.dumps(p) for p in params) + '\n ]\n}\n')
    return spec


def load_shapes(path: str):
    """The shapes of a ``--dump-shapes`` file, and the file's contents."""
    try:
        with open(path) as f:
            spec = json.load(f)
        shapes = [torch.Size(p['shape']) for p in spec['params']]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f'--shapes {path}: not a shapes file written by '
                         f'--dump-shapes ({error!r})')
    return shapes, spec


class AuthorsSGD_GC(torch.optim.Optimizer):
    """The authors' SGD_GC, re-implemented as their loop runs: per tensor,
    in place on the gradient: grad += wd*w, subtract the row mean, momentum,
    update."""

    def __init__(self, params, lr, momentum=0., weight_decay=0.):
        super().__init__(params, dict(lr=lr, momentum=momentum,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']:
                d_p = p.grad
                if group['weight_decay'] != 0:
                    d_p.add_(p, alpha=group['weight_decay'])
                if d_p.dim() > 1:
                    d_p.add_(-d_p.mean(dim=tuple(range(1, d_p.dim())),
                                       keepdim=True))
                state = self.state[p]
                if 'momentum_buffer' not in state:
                    buf = state['momentum_buffer'] = d_p.clone()
                else:
                    buf = state['momentum_buffer']
                    buf.mul_(group['momentum']).add_(d_p)
                p.add_(buf, alpha=-group['lr'])


class AuthorsAdam_GC(torch.optim.Optimizer):
    """The authors' Adam_GC loop: per tensor, in place on the gradient."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group['betas']
            for p in group['params']:
                grad = p.grad
                state = self.state[p]
                if not state:
                    state['step'] = 0
                    state['exp_avg'] = torch.zeros_like(p)
                    state['exp_avg_sq'] = torch.zeros_like(p)
                state['step'] += 1
                bc1 = 1 - beta1**state['step']
                bc2 = 1 - beta2**state['step']
                if group['weight_decay'] != 0:
                    grad.add_(p, alpha=group['weight_decay'])
                if grad.dim() > 1:
                    grad.add_(-grad.mean(dim=tuple(range(1, grad.dim())),
                                         keepdim=True))
                state['exp_avg'].mul_(beta1).add_(grad, alpha=1 - beta1)
                state['exp_avg_sq'].mul_(beta2).addcmul_(
                    grad, grad, value=1 - beta2)
                denom = (state['exp_avg_sq'].sqrt() / bc2**0.5).add_(
                    group['eps'])
                p.addcdiv_(state['exp_avg'], denom, value=-group['lr'] / bc1)


SGD = dict(lr=0.02, momentum=0.9, weight_decay=1e-4)
ADAM = dict(lr=1e-4, weight_decay=1e-4)
ADAGRAD = dict(lr=1e-2, weight_decay=1e-4)
# Ranger's hyper-parameters, decay decoupled (torch's RAdamW) everywhere.
RADAM = dict(lr=1e-3, betas=(0.95, 0.999), eps=1e-5, weight_decay=1e-4,
             decoupled_weight_decay=True)
# RAdam's first five steps (b2 = 0.999) are un-adapted, and cheaper: the
# radam family's warm-up covers them, so every timed step is rectified.
RADAM_RECTIFIED_FROM = 6
FAMILIES = ('sgd', 'adam', 'adamw', 'adagrad', 'radam')


def torch_fuses(cls, device: torch.device) -> bool:
    """Whether torch.optim's ``cls`` has a fused (one kernel per step)
    implementation for tensors on this device."""
    param = torch.zeros(1, device=device, requires_grad=True)
    param.grad = torch.zeros_like(param)
    try:  # torch checks the device in the constructor or the first step
        cls([param], lr=0.1, fused=True).step()
    except (RuntimeError, ValueError, TypeError):  # TypeError: no fused=
        return False
    return True


def torch_variants(cls, hp, device):
    """``torch <cls> <implementation>`` -> a maker, for each implementation
    torch has of ``cls`` on this device."""
    implementations = {'foreach': dict(foreach=True),
                       'for-loop': dict(foreach=False)}
    if torch_fuses(cls, device):
        implementations['fused'] = dict(fused=True)
    return {f'torch {cls.__name__} {name}': (
        lambda p, options=options: cls(p, **options, **hp))
        for name, options in implementations.items()}


def wrapped(torch_makers):
    """GCOptimWrapper around torch's fused and for-loop implementations."""
    return {f'GCOptimWrapper({name[len("torch "):]})': (
        lambda p, make=make: GCOptimWrapper(make(p)))
        for name, make in torch_makers.items() if 'foreach' not in name}


def variants(family: str, device: torch.device):
    """name -> function(params) returning an optimizer or optim wrapper.
    torch's own steps are named ``torch ...``; the fastest of them is the
    family's baseline."""
    reg = gc_mm.optimizers
    on_cpu = device.type == 'cpu'
    if family == 'sgd':
        sgd = torch_variants(torch.optim.SGD, SGD, device)
        # Each path of SGD_GC, asked for by name; the one its defaults pick
        # on this device (SGD_GC.path, the optimizer's own routing) is
        # labelled so.
        paths = {
            'multi-tensor': dict(foreach=True),
            'plain path': dict(fused=False, foreach=False),
        }
        if on_cpu:  # the C++ kernel is for CPU tensors only
            paths['C++ kernel'] = dict(fused=True)
        elif device.type == 'cuda' and kernels.triton_available():
            paths['Triton kernel'] = dict(fused=True)
        defaults = reg.SGD_GC([torch.zeros(1, device=device)]).defaults
        default = {
            'fused': 'C++ kernel', 'multi_tensor': 'multi-tensor',
            'plain': 'plain path'
        }[reg.SGD_GC.path(defaults, on_cpu)]
        gc = {}
        for path, options in paths.items():
            label = f'default: {path}' if path == default else path
            gc[f'gc_mm SGD_GC ({label})'] = (
                lambda p, options=options: reg.SGD_GC(p, **options, **SGD))
        gc["authors' SGD_GC (per tensor)"] = lambda p: AuthorsSGD_GC(
            p, **SGD)
        return {**sgd, **gc, **wrapped(sgd)}
    if family == 'radam':
        return radam_variants(device)
    cls, names, hp = {
        'adam': (torch.optim.Adam, ('Adam_GC', 'Adam_GCC', 'Adam_GC2',
                                    'Adam_GCC2'), ADAM),
        'adamw': (torch.optim.AdamW, ('AdamW_GC', 'AdamW_GCC', 'AdamW_GC2',
                                      'AdamW_GCC2'), ADAM),
        'adagrad': (torch.optim.Adagrad, ('Adagrad_GC', 'Adagrad_GCC'),
                    ADAGRAD),
    }[family]
    base = torch_variants(cls, hp, device)
    gc = {f'gc_mm {name}': (lambda p, name=name: getattr(reg, name)(p, **hp))
          for name in names}
    if family == 'adam':
        gc["authors' Adam_GC (per tensor)"] = lambda p: AuthorsAdam_GC(
            p, **ADAM)
    # GCOptimWrapper's goal is set for torch's SGD, Adam and AdamW.
    return {**base, **gc, **(wrapped(base) if family != 'adagrad' else {})}


def radam_variants(device):
    """torch's RAdam (no fused RAdam in torch 2.13) and gc_mm's RAdam
    family: GC on the gradient or the update, GC off, and Lookahead (Ranger
    synchronizes every 6th step; k=1 synchronizes every step)."""
    reg = gc_mm.optimizers
    radam = torch_variants(torch.optim.RAdam, RADAM, device)
    radam.update({
        'gc_mm RAdam_GC (GC off)': lambda p: reg.RAdam_GC(
            p, gc_mode=None, **RADAM),
        'gc_mm RAdam_GC (gradient)': lambda p: reg.RAdam_GC(p, **RADAM),
        'gc_mm RAdam_GC (update)': lambda p: reg.RAdam_GC(
            p, gc_loc='update', **RADAM),
        'gc_mm Ranger (k=6)': lambda p: reg.Ranger(p, **RADAM),
        'gc_mm Ranger (k=1)': lambda p: reg.Ranger(p, k=1, **RADAM),
        'gc_mm Lookahead(torch RAdam for-loop)': lambda p: reg.Lookahead(
            p, k=6, optimizer=dict(type='RAdam', foreach=False, **RADAM)),
    })
    return radam


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def timed_step(optimizer, device) -> float:
    """Seconds of one step, from a synchronized start: CUDA events on the
    GPU (what the GPU spent between the step's first and last launch, the
    CPU's launch time included where the GPU waited for it), the wall clock
    elsewhere."""
    sync(device)
    if device.type != 'cuda':
        start = time.perf_counter()
        optimizer.step()
        return time.perf_counter() - start
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    optimizer.step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_steps(shapes, family, device, repeats, warmup, only=None):
    """Times the family's variants whose names match ``only`` (a regular
    expression; torch's own steps, the baselines, always)."""
    optimizers = {}
    for name, make in variants(family, device).items():
        if only and not (name.startswith('torch ') or re.search(only, name)):
            continue
        params = [torch.randn(s, device=device, requires_grad=True)
                  for s in shapes]
        optimizers[name] = make(params)
    if family == 'radam':
        warmup = max(warmup, RADAM_RECTIFIED_FROM - 1)
    return time_interleaved(optimizers, device, repeats, warmup)


def step_transient_bytes(step, device) -> int:
    """Peak memory a step allocates beyond what it started with: CUDA's
    allocator statistics, or on CPU the allocations torch's profiler
    records (their running sum's maximum)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        step()
    events = sorted((e for e in p.profiler.kineto_results.events()
                     if e.name() == '[memory]'), key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def time_interleaved(optimizers, device, repeats, warmup):
    """Median step time of each optimizer (or optim wrapper), steps
    interleaved, and the memory one step allocates for itself. Each is fed
    the same random gradients (one seeded copy per parameter-shape list,
    shared, so that a large model's variants fit in memory), restored
    before every step."""
    grads0, grads = {}, {}
    for name, optimizer in optimizers.items():
        params = [p for group in optimizer.param_groups
                  for p in group['params']]
        key = tuple((p.shape, p.dtype) for p in params)
        if key not in grads0:
            torch.manual_seed(0)
            grads0[key] = [torch.randn_like(p) * 1e-3 for p in params]
        for p, g in zip(params, grads0[key]):
            p.grad = g.clone()
        grads[name] = ([p.grad for p in params], grads0[key])
    times = {name: [] for name in optimizers}
    for r in range(warmup + repeats):
        for name, optimizer in optimizers.items():  # interleaved
            # Some GC steps work in place on the gradients: restore them.
            torch._foreach_copy_(*grads[name])
            seconds = timed_step(optimizer, device)
            if r >= warmup:
                times[name].append(seconds)
    results = {}
    for name, optimizer in optimizers.items():
        torch._foreach_copy_(*grads[name])
        transient = step_transient_bytes(optimizer.step, device)
        state = getattr(optimizer, 'optimizer', optimizer).state
        results[name] = dict(
            ms=statistics.median(times[name]) * 1e3,
            state_mb=sum(t.nbytes for s in state.values()
                         for t in s.values() if torch.is_tensor(t)) / 2**20,
            transient_mb=transient / 2**20)
    return results


def time_e2e(base_config, twin_config, iters, repeats, step_repeats):
    """Median iteration time of a config and its GC twin, and the median
    step time of each one's own optim wrapper on its model's parameters."""
    from mmengine.runner import Runner
    base = Config.fromfile(base_config)
    twin = Config.fromfile(twin_config)
    iterations, optim_wrappers = {}, {}
    for r in range(repeats):
        for label, cfg in (('baseline', base), ('GC twin', twin)):
            cfg = cfg.copy()
            cfg.work_dir = f'/tmp/gc_mm_bench/{label.replace(" ", "_")}'
            cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters,
                                 val_interval=iters + 1)
            cfg.param_scheduler = []
            cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
            cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
            cfg.default_hooks.checkpoint = dict(type='CheckpointHook',
                                                interval=10**9)
            cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
            cfg.log_level = 'WARNING'
            runner = Runner.from_cfg(cfg)
            runner.train()
            history = runner.message_hub.get_scalar('train/time').data[0]
            # Skip the first iterations (allocations, data loading warm-up).
            iterations.setdefault(label, []).extend(list(history[2:]))
            optim_wrappers[label] = runner.optim_wrapper
    result = {k: statistics.median(v) * 1e3 for k, v in iterations.items()}
    # GC changes nothing in an iteration but the optimizer step, so the
    # step-time difference over the iteration time is its overhead, measured
    # far more precisely than the difference of two noisy iteration times.
    device = next(iter(runner.model.parameters())).device
    steps = time_interleaved(optim_wrappers, device, step_repeats, warmup=3)
    result.update({f'{k} step': v['ms'] for k, v in steps.items()})
    result.update({f'{k} optimizer': type(v.optimizer).__name__
                   for k, v in optim_wrappers.items()})
    return result


def table(title, results, baselines):
    print(f'\n{title}')
    print(f'{"variant":38s} {"ms":>8s} ' +
          ' '.join(f'{"x " + b[:19]:>21s}' for b in baselines) +
          f' {"state MB":>9s} {"transient MB":>12s}')
    for name, r in results.items():
        print(f'{name:38s} {r["ms"]:8.2f} ' + ' '.join(
            f'{r["ms"] / results[b]["ms"]:21.3f}' for b in baselines) +
              f' {r["state_mb"]:9.1f} {r["transient_mb"]:12.1f}')


def markdown(report) -> str:
    """The step tables of a report, in Markdown: each variant's median
    against torch's fused step of the family's base optimizer (where torch
    has one on the device) and its fastest step."""
    what = report['config'] + (f' ({report["model"]}, {report["backbone"]})'
                               if 'backbone' in report else '')
    lines = [f'### {what}: {report["tensors"]} tensors, '
             f'{report["parameters"] / 1e6:.1f}M parameters, '
             f'{report.get("gpu") or report["machine"]}, torch '
             f'{report["torch"]}' +
             (f', CUDA {report["cuda"]}' if report.get('cuda') else ''), '',
             '| family | variant | ms | × torch fused | × fastest torch '
             '| transient MB |', '| --- | --- | ---: | ---: | ---: | ---: |']
    for family in FAMILIES:
        results = report.get(family)
        if not results:
            continue
        torch_names = [n for n in results if n.startswith('torch ')]
        fastest = min(torch_names, key=lambda n: results[n]['ms'])
        fused = next((n for n in torch_names if n.endswith(' fused')), None)
        for name, r in results.items():
            vs_fused = (f'{r["ms"] / results[fused]["ms"]:.2f}'
                        if fused else '–')
            lines.append(f'| {family} | {name} | {r["ms"]:.3f} | {vs_fused} '
                         f'| {r["ms"] / results[fastest]["ms"]:.2f} '
                         f'| {r["transient_mb"]:.1f} |')
    return '\n'.join(lines) + '\n'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default='configs/mask_rcnn_r50.py')
    parser.add_argument('--shapes', metavar='FILE',
                        help='time tensors of the shapes in FILE (written by '
                        '--dump-shapes) instead of building --config\'s '
                        'model (no mmdet needed)')
    parser.add_argument('--dump-shapes', metavar='FILE',
                        help="write --config's trainable parameter shapes, "
                        'and which get GC, to FILE and exit (needs mmdet)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--families', nargs='+', default=list(FAMILIES),
                        choices=FAMILIES)
    parser.add_argument('--only', metavar='REGEX',
                        help="time only the variants whose names match (and "
                        "torch's own steps, the baselines), e.g. to fit a "
                        'large model in memory')
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--e2e', type=int, default=0,
                        help='also time N training iterations of --e2e-config '
                        'and its _gc twin')
    parser.add_argument('--e2e-repeats', type=int, default=3,
                        help='interleaved baseline/GC runs of --e2e')
    parser.add_argument('--e2e-step-repeats', type=int, default=15,
                        help='optimizer steps timed per config after --e2e')
    parser.add_argument('--e2e-config',
                        default='configs/demo/mask_rcnn_r18_fpn_shapes.py',
                        help='the baseline of --e2e')
    parser.add_argument('--e2e-twin',
                        default='configs/demo/mask_rcnn_r18_fpn_gc_shapes.py',
                        help='the GC twin of --e2e-config')
    parser.add_argument('--skip-steps', action='store_true')
    parser.add_argument('--json', default='benchmark_gc.json')
    parser.add_argument('--markdown', metavar='FILE',
                        help='also write the step tables to FILE, in Markdown')
    args = parser.parse_args()
    if args.dump_shapes:
        spec = dump_shapes(args.config, args.dump_shapes)
        print(f'{args.config}: {spec["tensors"]} trainable tensors '
              f'({spec["gc_tensors"]} with GC under {spec["optimizer"]}), '
              f'{spec["parameters"] / 1e6:.1f}M parameters -> '
              f'{args.dump_shapes}')
        return
    if args.shapes and args.e2e:
        parser.error('--e2e trains a config through mmdet; --shapes is for '
                     'the step timings alone')
    shapes, spec = load_shapes(args.shapes) if args.shapes else (None, None)
    if args.e2e:
        for path in (args.e2e_config, args.e2e_twin):
            if not osp.isfile(path):
                parser.error(f'config not found: {path}')
        if osp.samefile(args.e2e_config, args.e2e_twin):
            parser.error('--e2e-config and --e2e-twin are the same file')
    device = torch.device(args.device)
    report = dict(config=spec['config'] if spec else args.config,
                  device=str(device),
                  machine=platform.processor() or platform.machine(),
                  torch=torch.__version__, threads=torch.get_num_threads())
    if spec:
        report.update(shapes=args.shapes, model=spec['model'],
                      backbone=spec['backbone'],
                      gc_tensors=spec['gc_tensors'])
    if device.type == 'cuda':
        report.update(gpu=torch.cuda.get_device_name(device),
                      cuda=torch.version.cuda)
    if not args.skip_steps:
        if device.type == 'cpu':
            # Installed, or else built on first use (then cached): their
            # start-up cost, apart.
            for name in kernels.KERNELS:
                start = time.perf_counter()
                kernels.load(name)
                seconds = time.perf_counter() - start
                installed = kernels.installed(name) is not None
                report[f'{name}_kernel_load_s'] = seconds
                report[f'{name}_kernel_installed'] = installed
                print(f'{name} kernel: ' + (
                    'installed' if installed else
                    'not installed, built on first use (or loaded from the '
                    'cache)') + f', ready in {seconds:.2f} s')
        if shapes is None:
            shapes = trainable_shapes(args.config)
        report['tensors'] = len(shapes)
        report['parameters'] = sum(torch.Size(s).numel() for s in shapes)
        print(f'{report["config"]}: {len(shapes)} trainable tensors, '
              f'{report["parameters"] / 1e6:.1f}M parameters, {device}')
        for family in args.families:
            results = time_steps(shapes, family, device, args.repeats,
                                 args.warmup, args.only)
            fastest_torch = min((n for n in results if n.startswith('torch')),
                                key=lambda n: results[n]['ms'])
            authors = [n for n in results if n.startswith("authors'")]
            table(f'{family}: median step time over {args.repeats} repeats '
                  '(transient: peak memory the step allocates)',
                  results, [fastest_torch] + authors[:1])
            report[family] = results
    if args.e2e:
        medians = time_e2e(args.e2e_config, args.e2e_twin, args.e2e,
                           args.e2e_repeats, args.e2e_step_repeats)
        overhead = medians['GC twin'] / medians['baseline'] - 1
        step_overhead = (medians['GC twin step'] -
                         medians['baseline step']) / medians['baseline']
        print(f'\nend to end ({args.e2e_config} vs {args.e2e_twin}, '
              f'{args.e2e} iterations x {args.e2e_repeats}, interleaved):\n'
              f'  optimizers: baseline {medians["baseline optimizer"]}, GC '
              f'twin {medians["GC twin optimizer"]}\n'
              f'  iteration: baseline {medians["baseline"]:.1f} ms, GC twin '
              f'{medians["GC twin"]:.1f} ms, overhead {overhead:+.2%}\n'
              f'  optimizer step (median of {args.e2e_step_repeats}): '
              f'baseline {medians["baseline step"]:.2f} ms, GC twin '
              f'{medians["GC twin step"]:.2f} ms; the difference is '
              f'{step_overhead:+.2%} of a baseline iteration')
        report['e2e'] = dict(config=args.e2e_config, twin=args.e2e_twin,
                             **medians,
                             overhead=overhead, step_overhead=step_overhead)
    with open(args.json, 'w') as f:
        json.dump(report, f, indent=2)
    print(f'\nwrote {args.json}')
    if args.markdown and not args.skip_steps:
        with open(args.markdown, 'w') as f:
            f.write(markdown(report))
        print(f'wrote {args.markdown}')


if __name__ == '__main__':
    main()
