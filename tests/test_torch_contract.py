"""torch.optim's own contract, checked on every gc_mm optimizer and path.

The invariants of torch's optimizer test suite (``test/test_optim.py``,
class ``TestOptimRenewed``, torch 2.13) that apply to gc_mm, adapted: each
test names the torch test it mirrors. torch's suite is driven by
``OptimizerInfo`` entries (torch/testing/_internal/common_optimizers.py);
:data:`INFOS` is the same for gc_mm's families: the options each is tried
with and the implementations (``foreach``, ``fused``) it has. torch's
machinery itself is not imported: it needs torch's test dependencies
(expecttest, ...) and changes between the torch versions gc_mm supports.

Not mirrored, and why: complex parameters (gc_mm refuses them, see
test_optimizers.py), ``maximize``/``capturable``/``differentiable`` (gc_mm
has none of these options), torch's error inputs (gc_mm's own are in each
family's tests), CUDA-only and memory tests.

GC changes the numbers by design, so nothing here compares gc_mm with
torch's optimizers (test_optimizers.py and test_radam.py do that where the
formulas coincide, GC off): every comparison is between gc_mm's own paths,
options or copies, as torch's suite compares its own implementations.
"""
import copy
import functools
import io
from typing import NamedTuple, Tuple

import pytest
import torch
from mmengine.registry import OPTIMIZERS
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.lr_scheduler import StepLR
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

import gc_mm.optimizers  # noqa: F401 (registers the optimizers)


class Info(NamedTuple):
    """gc_mm's OptimizerInfo: a name, how to build it, the options it is
    tried with, its implementations, whether torch's counterpart takes
    sparse gradients."""
    name: str
    inputs: Tuple[dict, ...]
    impls: Tuple[str, ...] = ('fused', )
    # Lookahead around this inner type (the options go to the inner one).
    inner: str = None
    supports_sparse: bool = False

    def build(self, params, **kwargs):
        if self.inner is None:
            return OPTIMIZERS.build(dict(type=self.name, params=params,
                                         **kwargs))
        return OPTIMIZERS.build(dict(
            type='Lookahead', params=params, k=2, alpha=0.5,
            optimizer=dict(type=self.inner, **kwargs)))


SGD_INPUTS = (dict(lr=0.01), dict(lr=0.01, momentum=0.9, weight_decay=0.01),
              dict(lr=0.005, momentum=0.9, nesterov=True, weight_decay=1e-3),
              dict(lr=0.005, momentum=0.8, dampening=0.3, weight_decay=0.1))
ADAM_INPUTS = (dict(lr=0.01), dict(lr=0.01, weight_decay=0.1, amsgrad=True))
ADAGRAD_INPUTS = (dict(lr=0.1), dict(lr=0.1, lr_decay=0.05,
                                     weight_decay=0.01,
                                     initial_accumulator_value=0.1))
RADAM_INPUTS = (dict(lr=0.01), dict(lr=0.01, weight_decay=0.1,
                                    decoupled_weight_decay=True),
                dict(lr=0.01, weight_decay=0.1, gc_loc='update'))

INFOS = [
    *(Info(name, SGD_INPUTS, ('foreach', 'fused'), supports_sparse=True)
      for name in ('SGD_GC', 'SGD_GCC', 'SGDW_GC', 'SGDW_GCC')),
    *(Info(name, ADAM_INPUTS) for name in (
        'Adam_GC', 'Adam_GCC', 'Adam_GC2', 'Adam_GCC2', 'AdamW_GC',
        'AdamW_GCC', 'AdamW_GC2', 'AdamW_GCC2')),
    *(Info(name, ADAGRAD_INPUTS, supports_sparse=True)
      for name in ('Adagrad_GC', 'Adagrad_GCC')),
    Info('RAdam_GC', RADAM_INPUTS),
    Info('Ranger', (dict(lr=0.01), dict(lr=0.01, weight_decay=0.1, k=3))),
    Info('Lookahead', SGD_INPUTS[1:3], ('foreach', 'fused'), inner='SGD_GC'),
    Info('Lookahead', ADAM_INPUTS, inner='AdamW_GC2'),
]


def info_id(info):
    return info.name if info.inner is None else f'Lookahead({info.inner})'


def optims(infos=None):
    """torch's ``@optims``: one test per family."""
    infos = INFOS if infos is None else infos
    return pytest.mark.parametrize('info', infos, ids=[info_id(i)
                                                       for i in infos])


def all_inputs(info):
    """torch's _get_optim_inputs_including_global_cliquey_kwargs: each input,
    and the last (the most options) once more per implementation flag set
    (torch: every input; fewer here to keep the run short)."""
    for kwargs in info.inputs:
        yield dict(kwargs)
    for impl in info.impls:
        yield dict(info.inputs[-1], **{impl: True})


def assert_equal(got, want):
    """Nested state dicts equal: tensors to the bit, the rest by ==."""
    if torch.is_tensor(want):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_equal(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_equal(g, w)
    else:
        assert got == want


def weight_bias(dtype=torch.float32, contiguous=True):
    if contiguous:
        return (Parameter(torch.randn(10, 5, dtype=dtype)),
                Parameter(torch.randn(10, dtype=dtype)))
    return (Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0]),
            Parameter(torch.randn(10, 2, dtype=dtype)[..., 0]))


def fwd_bwd(optimizer, weight, bias, inpt):
    optimizer.zero_grad()
    loss = (weight.mv(inpt) + bias).pow(2).sum()
    loss.backward()
    return loss


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@optims()
@pytest.mark.parametrize('contiguous', [True, False])
@pytest.mark.parametrize('with_lrsched', [True, False])
def test_forloop_goes_right_direction(info, contiguous, with_lrsched):
    """torch: test_forloop_goes_right_direction."""
    for kwargs in info.inputs:
        weight, bias = weight_bias(contiguous=contiguous)
        inpt = torch.randn(5)
        optimizer = info.build([weight, bias], **kwargs)
        scheduler = (StepLR(optimizer, gamma=0.9, step_size=10)
                     if with_lrsched else None)
        initial = fwd_bwd(optimizer, weight, bias, inpt).item()
        for _ in range(20):
            fwd_bwd(optimizer, weight, bias, inpt)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        assert fwd_bwd(optimizer, weight, bias, inpt).item() < initial


@optims()
def test_param_groups_weight_decay_and_lr(info):
    """torch: test_param_groups_weight_decay and test_param_groups_lr."""
    for kwargs in all_inputs(info):
        weight, bias = weight_bias()
        irrelevant = Parameter(torch.randn(2))
        irrelevant_before = irrelevant.detach().clone()
        inpt = torch.randn(5)
        kwargs.setdefault('lr', 1e-3)
        optimizer = info.build([
            dict(params=[weight], **kwargs),
            dict(params=[bias], **dict(kwargs, weight_decay=0.)),
            dict(params=[irrelevant], lr=1e-28)])
        initial = fwd_bwd(optimizer, weight, bias, inpt).item()
        for _ in range(20):
            fwd_bwd(optimizer, weight, bias, inpt)
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        assert fwd_bwd(optimizer, weight, bias, inpt).item() < initial
        torch.testing.assert_close(irrelevant.detach(), irrelevant_before,
                                   rtol=0, atol=0)


@optims()
def test_tensor_lr(info):
    """torch: test_tensor_lr. gc_mm refuses a tensor lr in torch's words
    (its paths take the learning rate as a Python number)."""
    weight, bias = weight_bias()
    for kwargs in all_inputs(info):
        with pytest.raises(ValueError,
                           match='lr as a Tensor is not supported'):
            info.build([weight, bias], **dict(kwargs, lr=torch.tensor(1e-3)))


@optims()
def test_step_is_noop_when_params_have_no_grad(info):
    """torch: test_step_is_noop_when_params_have_no_grad."""
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    before = [p.clone() for p in params]
    for kwargs in all_inputs(info):
        optimizer = info.build(params, **kwargs)
        assert optimizer.step(lambda: torch.tensor([1.])).item() == 1.
        for p, b in zip(params, before):
            assert torch.equal(p, b)


@optims()
def test_step_is_noop_for_zero_grads(info):
    """torch: test_step_is_noop_for_zero_grads (a (5, 1) weight: GC on,
    rows of one element)."""
    param = torch.randn(5, 1, requires_grad=True)
    before = param.detach().clone()
    for kwargs in all_inputs(info):
        if kwargs.get('weight_decay', 0):
            continue  # decay moves the weights without a gradient
        optimizer = info.build([param], **kwargs)
        param.grad = torch.zeros_like(param)
        optimizer.step()
        assert torch.equal(param.detach(), before)


@optims()
def test_optimizer_can_be_printed(info):
    """torch: test_optimizer_can_be_printed."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for kwargs in all_inputs(info):
        text = repr(info.build(params, **kwargs))
        assert 'Parameter Group 0' in text


def _takes_named_parameters():
    """Whether this torch's optimizers take ``model.named_parameters()``
    (torch >= 2.6): before, torch's own add_param_group refuses the pairs."""
    try:
        SGD([('w', Parameter(torch.zeros(1)))], lr=0.1)
    except TypeError:
        return False
    return True


NAMED = [True, False] if _takes_named_parameters() else [False]


def named(params, is_named):
    return ([(f'name{i}', p) for i, p in enumerate(params)] if is_named
            else params)


def without_param_names(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict['param_groups']:
        group.pop('param_names', None)
    return state_dict


@optims()
@pytest.mark.parametrize('is_named0', NAMED)
@pytest.mark.parametrize('is_named1', NAMED)
def test_state_dict_deterministic(info, is_named0, is_named1):
    """torch: test_state_dict_deterministic (named parameters included)."""
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    inpt = torch.randn(3)
    for kwargs in all_inputs(info):
        optimizer = info.build(named([weight, bias], is_named0), **kwargs)
        for _ in range(10):
            fwd_bwd(optimizer, weight, bias, inpt)
            optimizer.step()
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(
                bias.clone())
        optimizer_c = info.build(named([weight_c, bias_c], is_named1),
                                 **kwargs)
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(10):
            fwd_bwd(optimizer, weight, bias, inpt)
            fwd_bwd(optimizer_c, weight_c, bias_c, inpt)
            optimizer.step()
            optimizer_c.step()
            torch.testing.assert_close(weight, weight_c, rtol=0, atol=0)
            torch.testing.assert_close(bias, bias_c, rtol=0, atol=0)
        assert_equal(without_param_names(optimizer_c.state_dict()),
                     without_param_names(optimizer.state_dict()))
        # Repeated parameters have the same representation (torch #36831).
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert (without_param_names(optimizer.state_dict())['param_groups'][-1]
                == without_param_names(
                    optimizer_c.state_dict())['param_groups'][-1])


def conv_bn():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2),
                                torch.nn.BatchNorm2d(2))
    return model, torch.rand(1, 4, 16, 16)


def model_step(optimizer, model, inpt):
    optimizer.zero_grad()
    model(inpt).sum().backward()
    optimizer.step()


# Options a checkpoint of an earlier gc_mm version may lack (torch's
# OptimizerInfo.not_og_supported_flags).
NOT_OG_FLAGS = ('fused', 'foreach', 'gc_mode', 'gc_loc',
                'decoupled_weight_decay')


@optims()
def test_can_load_older_state_dict(info):
    """torch: test_can_load_older_state_dict."""
    for kwargs in all_inputs(info):
        model, inpt = conv_bn()
        optimizer = info.build(model.parameters(), **kwargs)
        for _ in range(3):
            model_step(optimizer, model, inpt)
        old = copy.deepcopy(optimizer.state_dict())
        for group in old['param_groups']:
            for flag in NOT_OG_FLAGS:
                group.pop(flag, None)
        optimizer.load_state_dict(old)
        model_step(optimizer, model, inpt)


@optims()
@pytest.mark.parametrize('is_named0', NAMED)
@pytest.mark.parametrize('is_named1', NAMED)
def test_can_load_from_to_named_state_dict(info, is_named0, is_named1):
    """torch: test_can_load_from_to_named_state_dict."""
    for kwargs in all_inputs(info):
        model, inpt = conv_bn()
        params = model.named_parameters() if is_named0 else model.parameters()
        optimizer = info.build(params, **kwargs)
        for _ in range(3):
            model_step(optimizer, model, inpt)
        saved = copy.deepcopy(optimizer.state_dict())
        params = model.named_parameters() if is_named1 else model.parameters()
        optimizer2 = info.build(params, **kwargs)
        optimizer2.load_state_dict(saved)
        model_step(optimizer2, model, inpt)
        if is_named0 or is_named1:
            assert optimizer2.state_dict()['param_groups'][0][
                'param_names'] == ['0.weight', '0.bias', '1.weight', '1.bias']


@optims()
@pytest.mark.parametrize('is_named', NAMED)
def test_save_load_equality_with_weights_only(info, is_named):
    """torch: test_save_load_equality_with_weights_only."""
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    inpt = torch.randn(3)
    for kwargs in all_inputs(info):
        optimizer = info.build(named([weight, bias], is_named), **kwargs)
        for _ in range(3):
            optimizer.step(functools.partial(fwd_bwd, optimizer, weight, bias,
                                             inpt))
        state_dict = optimizer.state_dict()
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        assert_equal(torch.load(buffer, weights_only=True), state_dict)


def _state_dict_pre_hook(optimizer):
    optimizer.state['test'] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if 'test' in state_dict['state']:
        state_dict['state'].pop('test')
        state_dict['ran_state_dict_pre_hook'] = True
    else:
        state_dict['ran_state_dict_pre_hook'] = False
    return state_dict


def _load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict['param_groups'][0]['lr'] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    state_dict = copy.deepcopy(state_dict)
    state_dict['param_groups'][0]['lr'] = 0.003
    return state_dict


def _load_state_dict_post_hook(optimizer):
    optimizer.state['ran_load_state_dict_pre_hook2'] = (
        optimizer.param_groups[0]['lr'] == 0.003)
    optimizer.state['ran_load_state_dict_post_hook'] = True


@optims()
def test_state_dict_pre_and_post_hooks(info):
    """torch: test_state_dict_pre_hook, test_state_dict_post_hook and
    test_state_dict_pre_post_hook."""
    for kwargs in all_inputs(info):
        param = torch.rand(2, 3, requires_grad=True)
        optimizer = info.build([param], **kwargs)
        optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert optimizer.state_dict()['state']['test'] == 1

        optimizer = info.build([param], **kwargs)
        optimizer.register_state_dict_post_hook(_state_dict_post_hook)
        assert not optimizer.state_dict()['ran_state_dict_pre_hook']

        optimizer = info.build([param], **kwargs)
        optimizer.register_state_dict_pre_hook(_state_dict_pre_hook)
        optimizer.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = optimizer.state_dict()
        assert 'test' not in state_dict['state']
        assert state_dict['ran_state_dict_pre_hook']


@optims()
def test_load_state_dict_pre_and_post_hooks(info):
    """torch: test_load_state_dict_pre_hook_and_prepend,
    test_load_state_dict_post_hook and test_load_state_dict_pre_post_hook."""
    for kwargs in all_inputs(info):
        param = torch.rand(2, 3, requires_grad=True)
        optimizer = info.build([param], **kwargs)
        state_dict = optimizer.state_dict()
        optimizer.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]['lr'] == 0.002
        optimizer.register_load_state_dict_pre_hook(
            _load_state_dict_pre_hook2, prepend=True)
        optimizer.load_state_dict(state_dict)
        # prepended: hook1 runs after it and wins
        assert optimizer.param_groups[0]['lr'] == 0.002

        optimizer = info.build([param], **kwargs)
        optimizer.register_load_state_dict_post_hook(
            _load_state_dict_post_hook)
        optimizer.load_state_dict(optimizer.state_dict())
        assert not optimizer.state['ran_load_state_dict_pre_hook2']
        assert optimizer.state['ran_load_state_dict_post_hook']

        optimizer = info.build([param], **kwargs)
        optimizer.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        optimizer.register_load_state_dict_post_hook(
            _load_state_dict_post_hook)
        optimizer.load_state_dict(optimizer.state_dict())
        assert optimizer.state['ran_load_state_dict_pre_hook2']
        assert optimizer.state['ran_load_state_dict_post_hook']


@optims()
def test_step_pre_and_post_hooks(info):
    """torch: test_step_pre_hook and test_step_post_hook."""
    params = [torch.tensor([1., 1.])]
    for kwargs in all_inputs(info):
        optimizer = info.build(params, **kwargs)
        calls = []
        pre = optimizer.register_step_pre_hook(
            lambda *args: calls.append('pre'))
        post = optimizer.register_step_post_hook(
            lambda *args: calls.append('post'))
        optimizer.step()
        optimizer.step()
        assert calls == ['pre', 'post'] * 2
        pre.remove()
        post.remove()
        optimizer.step()
        assert calls == ['pre', 'post'] * 2


@optims()
def test_step_all_hooks(info):
    """torch: test_step_all_hooks. Global hooks fire once per step, also
    for Lookahead and Ranger (which step an inner optimizer)."""
    params = [torch.tensor([1., 1.])]
    for kwargs in all_inputs(info):
        optimizer = info.build(params, **kwargs)
        optimizer2 = SGD(params, lr=1e-3)  # torch < 2.2 has no default lr
        data = []
        handles = [
            register_optimizer_step_pre_hook(lambda *a: data.append(0)),
            register_optimizer_step_post_hook(lambda *a: data.append(5))]
        try:
            for opt in (optimizer, optimizer2):
                handles += [
                    opt.register_step_pre_hook(lambda *a: data.append(1)),
                    opt.register_step_post_hook(lambda *a: data.append(2))]
            optimizer.step()
            assert data == [0, 1, 2, 5]
            optimizer2.step()
            assert data == [0, 1, 2, 5] * 2
            optimizer.step()
            assert data == [0, 1, 2, 5] * 3
        finally:
            for handle in handles:
                handle.remove()
        optimizer.step()
        optimizer2.step()
        assert data == [0, 1, 2, 5] * 3


@optims()
def test_deepcopy_copies_all_public_attrs(info):
    """torch: test_deepcopy_copies_all_public_attrs."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith('_')}

    for kwargs in all_inputs(info):
        optimizer = info.build(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        assert public(optimizer) == public(copy.deepcopy(optimizer))


@optims()
def test_non_empty_state(info):
    """torch: test_non_empty_state."""
    model = torch.nn.Linear(5, 5)
    for kwargs in info.inputs:
        optimizer = info.build(model.parameters(), **kwargs)
        optimizer.zero_grad()
        model(torch.rand(2, 5)).sum().backward()
        optimizer.step()
        for state in optimizer.state.values():
            assert len(state) > 0


@optims()
def test_step_leaves_the_gradients_alone(info):
    """torch's optimizers never write ``p.grad`` (test_load_nontensor_step and
    test_deepcopy_copies_all_public_attrs step three times on one gradient):
    neither do gc_mm's, on every path, so a second step on the same gradient
    is a step on that gradient, not on the first step's direction."""
    for kwargs in all_inputs(info):
        for impl in ('fused', 'foreach'):
            if impl in info.impls:
                kwargs.setdefault(impl, False)
        shapes = [(4, 3, 2, 2), (5, 7), (5, )]
        params = [Parameter(torch.randn(s, dtype=torch.float64))
                  for s in shapes]
        grads = [torch.randn_like(p) for p in params]
        optimizer = info.build(params, **dict(kwargs, weight_decay=0.1))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        optimizer.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)


def _compare_between(inpt, models, optimizers, tol):
    """torch: TestOptimRenewed._compare_between: 7 steps, a layer frozen in
    steps 3 and 4, no gradient in step 2; parameters and every state tensor
    equal."""
    for i in range(7):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:
                model(inpt).sum().backward()
            optimizer.step()
        (m0, m1), (o0, o1) = models, optimizers
        for p0, p1 in zip(m0.parameters(), m1.parameters()):
            torch.testing.assert_close(p0, p1, **tol)
            s0, s1 = o0.state[p0], o1.state[p1]
            assert s0.keys() == s1.keys()
            for key in s0:
                torch.testing.assert_close(s0[key], s1[key], **tol)


def _test_derived_optimizers(info, flag, dtype, tol):
    """torch: TestOptimRenewed._test_derived_optimizers: ``flag`` True
    against False (the plain path), on an MLP and an empty parameter."""
    for kwargs in info.inputs:
        models, optimizers = [], []
        for value in (False, True):
            torch.manual_seed(1)
            model = torch.nn.Sequential(
                torch.nn.Linear(2, 3), torch.nn.Sigmoid(),
                torch.nn.Linear(3, 1), torch.nn.Sigmoid()).to(dtype)
            empty = torch.empty((), dtype=dtype, requires_grad=True)
            empty.grad = torch.rand_like(empty)
            other = {'fused': 'foreach', 'foreach': 'fused'}[flag]
            path = {flag: value}
            if other in info.impls:
                path[other] = False
            optimizers.append(info.build(
                list(model.parameters()) + [empty], **kwargs, **path))
            models.append(model)
        inpt = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                            dtype=dtype).reshape(3, 2)
        _compare_between(inpt, models, optimizers, tol)


TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-12),
              torch.float32: dict(rtol=1e-5, atol=1e-6),
              torch.bfloat16: dict(rtol=0, atol=0),
              torch.float16: dict(rtol=0, atol=0)}


@optims([info for info in INFOS if 'foreach' in info.impls])
def test_foreach_matches_forloop(info):
    """torch: test_foreach_matches_forloop."""
    _test_derived_optimizers(info, 'foreach', torch.float64,
                             TOLERANCES[torch.float64])


@optims()
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32,
                                   torch.bfloat16])
def test_fused_matches_forloop(info, dtype):
    """torch: test_fused_matches_forloop (half precision takes the plain
    path on both settings, so it is equal to the bit; float16 as
    bfloat16)."""
    _test_derived_optimizers(info, 'fused', dtype, TOLERANCES[dtype])


@optims()
@pytest.mark.parametrize('default_dtype', [torch.float64, torch.float16])
def test_set_default_dtype_works(info, default_dtype):
    """torch: test_set_default_dtype_works_with_foreach (CUDA there): the
    implementations agree whatever the default dtype, and the step count
    stays a number."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        for flag in info.impls:
            _test_derived_optimizers(info, flag, torch.float64,
                                     TOLERANCES[torch.float64])
    finally:
        torch.set_default_dtype(old)


@optims()
def test_fused_error_on_params_off_cpu(info):
    """torch: test_fused_error_on_params_on_meta. gc_mm's kernels are for
    CPU tensors: ``fused=True`` with parameters elsewhere (here on the meta
    device, as in torch's test) is refused when they are given, by every
    family, as by torch's fused optimizers."""
    with torch.device('meta'):
        model = torch.nn.Linear(2, 3)
    with pytest.raises(RuntimeError, match=r'fused=True\) runs on CPU'):
        info.build(model.parameters(), fused=True)
def rosenbrock(tensor):
    x, y = tensor
    return (1 - x)**2 + 100 * (y - x**2)**2


def drosenbrock(tensor):
    x, y = tensor
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x),
                        200 * (y - x**2)))


SPARSE_INPUTS = {
    'SGD_GC': [dict(lr=4.8e-3), dict(lr=1e-3, momentum=0.5, nesterov=True)],
    'SGDW_GC': [dict(lr=1e-3, weight_decay=0.1, momentum=0.5)],
    'Adagrad_GC': [dict(lr=0.1), dict(lr=0.1, lr_decay=0.01)],
}


@pytest.mark.parametrize('name,kwargs', [
    pytest.param(name, kwargs, id=f'{name}-{i}')
    for name, inputs in SPARSE_INPUTS.items()
    for i, kwargs in enumerate(inputs)])
@pytest.mark.parametrize('impl', ['plain', 'foreach', 'fused'])
def test_rosenbrock_sparse(name, kwargs, impl):
    """torch: test_rosenbrock_sparse: an uncoalesced sparse gradient steps
    as its dense equal, for the families whose torch counterpart takes
    sparse gradients (GC is off for these 1-D parameters)."""
    if impl == 'foreach' and 'SGD' not in name:
        pytest.skip('only the SGD family has a foreach path')
    path = {} if impl == 'plain' else {impl: True}
    params = [Parameter(torch.tensor([1.5, 1.5], dtype=torch.float64))]
    params_c = [Parameter(p.detach().clone()) for p in params]
    optimizer = OPTIMIZERS.build(dict(type=name, params=params, **kwargs,
                                      **path))
    optimizer_c = OPTIMIZERS.build(dict(type=name, params=params_c, **kwargs,
                                        **path))
    initial = rosenbrock(params[0].detach())

    def gradient(param, sparse, w):
        grad = drosenbrock(param.detach())
        if not sparse:
            return (torch.stack([grad[0], grad.new_zeros(())]) if w else
                    torch.stack([grad.new_zeros(()), grad[1]]))
        # uncoalesced: the entry given twice
        i = torch.tensor([[0 if w else 1] * 2])
        v = grad[0 if w else 1]
        values = torch.stack([v / 4, v - v / 4])
        return torch.sparse_coo_tensor(i, values, (2, ))

    for i in range(300):
        w = i % 2
        params[0].grad = gradient(params[0], True, w)
        params_c[0].grad = gradient(params_c[0], False, w)
        optimizer.step()
        optimizer_c.step()
        torch.testing.assert_close(params, params_c, atol=5e-6, rtol=5e-6)
    assert rosenbrock(params[0].detach()) < initial


def sparse_gradient(shape, rows=(0, 2)):
    """An nn.Embedding(sparse=True)-like gradient: whole rows, one twice."""
    indices = torch.tensor([list(rows) + [rows[0]]])
    values = torch.randn(len(rows) + 1, *shape[1:], dtype=torch.float64)
    return torch.sparse_coo_tensor(indices, values, shape)


@pytest.mark.parametrize('name', ['SGD_GCC', 'SGDW_GC', 'Adagrad_GCC'])
@pytest.mark.parametrize('impl', ['plain', 'foreach', 'fused'])
def test_sparse_embedding_without_gc_steps_as_dense(name, impl):
    """An embedding's sparse gradient where GC is off (``*_GCC``: conv
    only) steps as its dense equal, as torch's SGD and Adagrad do."""
    if impl == 'foreach' and 'SGD' not in name:
        pytest.skip('only the SGD family has a foreach path')
    path = {} if impl == 'plain' else {impl: True}
    kwargs = dict(lr=0.1, momentum=0.9) if 'SGD' in name else dict(lr=0.1)
    if name == 'SGDW_GC':
        kwargs.update(weight_decay=0.1, gc_mode=None)
    weight = Parameter(torch.randn(5, 3, dtype=torch.float64))
    dense = Parameter(weight.detach().clone())
    optimizers = [OPTIMIZERS.build(dict(type=name, params=[p], **kwargs,
                                        **path)) for p in (weight, dense)]
    for _ in range(3):
        grad = sparse_gradient((5, 3))
        weight.grad, dense.grad = grad, grad.to_dense()
        for optimizer in optimizers:
            optimizer.step()
        torch.testing.assert_close(weight, dense)


@pytest.mark.parametrize('name', ['SGD_GC', 'Adagrad_GC', 'Lookahead'])
def test_sparse_gradient_with_gc_on_is_refused_before_anything_moves(name):
    """GC of a sparse gradient would need every entry of each row it
    touches: refused, with the way out, before any parameter moves."""
    cfg = (dict(type='Lookahead', optimizer=dict(type='SGD_GC'))
           if name == 'Lookahead' else dict(type=name))
    other = Parameter(torch.randn(4, 3))
    weight = Parameter(torch.randn(5, 3, dtype=torch.float64))
    optimizer = OPTIMIZERS.build(dict(cfg, params=[other, weight]))
    other.grad = torch.randn_like(other)
    weight.grad = sparse_gradient((5, 3))
    before = [other.detach().clone(), weight.detach().clone()]
    with pytest.raises(RuntimeError,
                       match=r'cannot centralize a sparse gradient .*'
                       r'paramwise_cfg\.gc\.exclude'):
        optimizer.step()
    assert torch.equal(other, before[0]) and torch.equal(weight, before[1])


@pytest.mark.parametrize('name,kwargs,match', [
    ('Adam_GCC', {}, 'does not support sparse gradients'),
    ('AdamW_GC2', dict(gc_mode=None), 'does not support sparse gradients'),
    ('RAdam_GC', dict(gc_mode=None), 'does not support sparse gradients'),
    ('SGD_GCC', dict(weight_decay=0.1), 'weight_decay .*sparse'),
    ('Adagrad_GCC', dict(weight_decay=0.1), 'weight_decay .*sparse'),
])
def test_sparse_gradient_refused_for_the_real_reason(name, kwargs, match):
    """Where torch's counterpart refuses sparse gradients (Adam, RAdam;
    coupled decay in SGD and Adagrad), gc_mm says so, not that GC is
    undefined (GC is off for these)."""
    weight = Parameter(torch.randn(5, 3, dtype=torch.float64))
    optimizer = OPTIMIZERS.build(dict(type=name, params=[weight], **kwargs))
    weight.grad = sparse_gradient((5, 3))
    with pytest.raises(RuntimeError, match=match) as error:
        optimizer.step()
    assert 'centraliz' not in str(error.value)
