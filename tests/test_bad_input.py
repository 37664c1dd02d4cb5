"""Bad optimizer input is refused early, with the culprit named."""

import pytest
import torch
from mmengine.registry import OPTIMIZERS

import gc_mm  # noqa: F401
from reference import ADAGRAD_NAMES, ADAM_NAMES, SGD_NAMES
from reference import ALL_NAMES as REFERENCE_NAMES

# Every GC optimizer: those of reference.py and the RAdam family, whose
# float64 reference is in test_radam.py.
ALL_NAMES = REFERENCE_NAMES + ('RAdam_GC', 'Ranger')


def build(name, **kwargs):
    params = [torch.nn.Parameter(torch.randn(4, 3, 3, 3))]
    return OPTIMIZERS.build(dict(type=name, params=params, **kwargs))


BAD = [(name, kwargs, match) for names, cases in [
    (ALL_NAMES, [(dict(lr=-0.1), 'lr'), (dict(weight_decay=-1.), 'weight_decay'),
                 (dict(gc_mode='fc'), 'gc_mode'), (dict(lr='0.1'), 'lr')]),
    (SGD_NAMES, [(dict(momentum=-0.9), 'momentum'),
                 (dict(fused='yes'), 'fused'),
                 (dict(foreach=1), 'foreach'),
                 (dict(nesterov=True), 'nesterov'),
                 (dict(nesterov=True, momentum=0.9, dampening=0.1), 'nesterov')]),
    (ADAM_NAMES, [(dict(eps=-1e-8), 'eps'), (dict(betas=(0.9, 1.0)), 'betas'),
                  (dict(betas=(-0.1, 0.99)), 'betas'), (dict(betas=0.9), 'betas')]),
    (ADAGRAD_NAMES, [(dict(eps=-1.), 'eps'), (dict(lr_decay=-1.), 'lr_decay'),
                     (dict(initial_accumulator_value=-1.),
                      'initial_accumulator_value')]),
] for name in names for kwargs, match in cases]


@pytest.mark.parametrize('name,kwargs,match', BAD)
def test_bad_hyper_parameter_names_the_parameter(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(name, **kwargs)


@pytest.mark.parametrize('name', ALL_NAMES)
def test_unknown_keyword_is_refused(name):
    with pytest.raises(TypeError, match='momentun'):
        build(name, momentun=0.9)


def test_bad_param_group_is_refused_and_leaves_optimizer_unchanged():
    opt = build('SGD_GC', lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match='lr'):
        opt.add_param_group({'params': [torch.nn.Parameter(torch.zeros(2))],
                             'lr': -1})
    with pytest.raises(ValueError, match='gc_mode'):
        opt.add_param_group({'params': [torch.nn.Parameter(torch.zeros(2))],
                             'gc_mode': 'all'})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize('name', ALL_NAMES)
@pytest.mark.parametrize('key,value', [('gc_mode', 'all'), ('lr', -0.1),
                                       ('lr', '0.1')])
def test_bad_loaded_param_group_is_refused_and_leaves_optimizer_unchanged(
        name, key, value):
    """A checkpoint's groups are checked like constructed ones: a bad value
    is a ValueError at load_state_dict naming the group and the key, not a
    KeyError at the next step, and nothing is loaded."""
    params = [torch.nn.Parameter(torch.randn(4, 3, 3, 3)),
              torch.nn.Parameter(torch.randn(5))]
    source = OPTIMIZERS.build(dict(type=name, params=[
        {'params': params[:1]}, {'params': params[1:]}], lr=0.1))
    for p in params:
        p.grad = torch.randn_like(p)
    source.step()
    state_dict = source.state_dict()
    state_dict['param_groups'][1][key] = value

    opt = OPTIMIZERS.build(dict(type=name, params=[
        {'params': params[:1]}, {'params': params[1:]}], lr=0.2))
    # Ranger's groups are those of the RAdam_GC inside it, which checks them.
    checker = 'RAdam_GC' if name == 'Ranger' else name
    refused = rf'{checker}.load_state_dict: param group 1 .*{key}'
    with pytest.raises(ValueError, match=refused):
        opt.load_state_dict(state_dict)
    assert not opt.state
    assert [group['lr'] for group in opt.param_groups] == [0.2, 0.2]
    opt.step()


@pytest.mark.parametrize('name', ALL_NAMES)
def test_sparse_gradient_is_refused_before_any_update(name):
    dense = torch.nn.Parameter(torch.randn(3, 4))
    sparse = torch.nn.Parameter(torch.randn(5, 2))
    opt = OPTIMIZERS.build(dict(type=name, params=[dense, sparse], lr=0.1))
    dense.grad = torch.randn(3, 4)
    sparse.grad = torch.randn(5, 2).to_sparse()
    before = dense.detach().clone()
    if name in ('SGD_GCC', 'SGDW_GCC', 'Adagrad_GCC'):
        # GC is off for a 2-D weight under *_GCC: updated as torch's SGD
        # and Adagrad do (tests/test_torch_contract.py checks the numbers).
        opt.step()
        assert not torch.equal(dense, before)
        return
    with pytest.raises(RuntimeError, match='sparse gradient'):
        opt.step()
    assert torch.equal(dense, before)


@pytest.mark.parametrize('name', ALL_NAMES)
def test_non_finite_gradient_does_not_crash(name):
    """Documented behaviour without AMP: the step runs, and GC spreads a
    non-finite entry over its row (under AMP the scaler skips the step)."""
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = OPTIMIZERS.build(dict(type=name, params=[w], lr=0.1))
    w.grad = torch.ones(3, 4)
    w.grad[1, 0] = float('inf')
    opt.step()
    assert torch.isfinite(w[0]).all() and torch.isfinite(w[2]).all()
    assert not torch.isfinite(w[1]).all()


def test_bad_transposed_conv_layout_keys_are_refused_when_built():
    weight = torch.zeros(6, 4, 2, 2, requires_grad=True)
    with pytest.raises(ValueError, match='out_dim must be 0 or 1'):
        gc_mm.SGD_GC([dict(params=[weight], gc_out_dim=2)])
    with pytest.raises(ValueError, match='groups=4 does not divide'):
        gc_mm.Adam_GC([dict(params=[weight], gc_out_dim=1, gc_groups=4)])
