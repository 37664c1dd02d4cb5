"""The GC operator: zero row means, a projection, 1-D untouched, conv-only."""
import pytest
import torch

from gc_mm import centralize_, check_gc_mode, is_centralized


def rows(t):
    return t.reshape(t.shape[0], -1)


def test_rows_have_zero_mean_and_the_result_is_the_projection():
    torch.manual_seed(0)
    conv = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    fc = torch.randn(5, 9, dtype=torch.float64) + 3.0
    expected = [t - rows(t).mean(1).view(-1, *[1] * (t.ndim - 1))
                for t in (conv, fc)]
    centralize_([conv, fc])
    for t, e in zip((conv, fc), expected):
        torch.testing.assert_close(rows(t).mean(1),
                                   torch.zeros(t.shape[0], dtype=t.dtype),
                                   atol=1e-14, rtol=0)
        torch.testing.assert_close(t, e, atol=1e-14, rtol=0)


def test_idempotent_and_symmetric():
    torch.manual_seed(1)
    g = torch.randn(6, 10, dtype=torch.float64)
    h = torch.randn(6, 10, dtype=torch.float64)
    once = g.clone()
    centralize_([once])
    twice = once.clone()
    centralize_([twice])
    torch.testing.assert_close(once, twice, atol=1e-15, rtol=0)
    # <P g, h> == <g, P h>
    ph = h.clone()
    centralize_([ph])
    assert torch.dot(once.flatten(), h.flatten()).item() == pytest.approx(
        torch.dot(g.flatten(), ph.flatten()).item(), abs=1e-12)


def test_one_dim_untouched_and_conv_only_mode():
    torch.manual_seed(2)
    bias, fc, conv = torch.randn(7), torch.randn(4, 5), torch.randn(3, 2, 1, 1)
    bias0, fc0 = bias.clone(), fc.clone()
    centralize_([bias, fc, conv], conv_only=True)
    assert torch.equal(bias, bias0) and torch.equal(fc, fc0)
    assert rows(conv).mean(1).abs().max() < 1e-6
    centralize_([bias, fc])
    assert torch.equal(bias, bias0) and not torch.equal(fc, fc0)


def test_channels_last_and_half_and_row_of_one():
    torch.manual_seed(3)
    conv = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)
    half = torch.randn(4, 3, 3, 3, dtype=torch.bfloat16)
    single = torch.randn(5, 1, 1, 1)
    centralize_([conv, half, single])
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert rows(conv.contiguous()).mean(1).abs().max() < 1e-6
    assert rows(half.float()).mean(1).abs().max() < 2e-2
    assert torch.count_nonzero(single) == 0  # a row of length 1 is frozen


def test_non_finite_entry_spreads_to_its_row_only():
    g = torch.ones(3, 4)
    g[1, 2] = float('nan')
    centralize_([g])
    assert torch.isnan(g[1]).all()
    assert torch.isfinite(g[0]).all() and torch.isfinite(g[2]).all()


def test_modes():
    assert is_centralized(torch.zeros(2, 2), 'conv_fc')
    assert not is_centralized(torch.zeros(2, 2), 'conv')
    assert is_centralized(torch.zeros(2, 2, 1, 1), 'conv')
    assert not is_centralized(torch.zeros(2, 2, 1, 1), None)
    with pytest.raises(ValueError, match="gc_mode must be 'conv_fc'"):
        check_gc_mode('GCC')


def test_empty_tensors_are_left_as_they_are():
    tensors = [torch.empty(0, 3), torch.empty(4, 0, 3, 3)]
    centralize_(tensors)
    assert [tuple(t.shape) for t in tensors] == [(0, 3), (4, 0, 3, 3)]


def unit_masks(deconv):
    """For each output channel of a transposed conv, which weight entries
    produce it (found by autograd, not by indexing)."""
    x = torch.randn(2, deconv.in_channels, 5, 5, dtype=deconv.weight.dtype)
    masks = []
    for channel in range(deconv.out_channels):
        deconv.zero_grad()
        deconv(x)[:, channel].sum().backward()
        masks.append(deconv.weight.grad != 0)
    return masks


@pytest.mark.parametrize('groups', [1, 2])
@pytest.mark.parametrize('channels_last', [False, True])
def test_transposed_conv_per_output_unit(groups, channels_last):
    """out_dim=1: each output channel's weights (in/groups x kh x kw of
    them, in its group's block of dim 0) get zero mean."""
    torch.manual_seed(4)
    deconv = torch.nn.ConvTranspose2d(4, 6, 3, groups=groups,
                                      dtype=torch.float64)
    masks = unit_masks(deconv)
    weight = deconv.weight.detach().clone()  # (4, 6 / groups, 3, 3)
    original = weight.clone()
    if channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    centralize_([weight], out_dim=1, groups=groups)
    for mask in masks:
        assert mask.sum() == 4 // groups * 9
        unit = original[mask]
        torch.testing.assert_close(weight[mask], unit - unit.mean(),
                                   atol=1e-14, rtol=0)
    # Per input channel (the default, the authors' rule) is another thing.
    default = original.clone()
    centralize_([default])
    assert not torch.allclose(default, weight)
    assert rows(default).mean(1).abs().max() < 1e-14


def test_transposed_conv_options_keep_the_ndim_rule():
    torch.manual_seed(5)
    deconv1d = torch.randn(4, 3, 5)  # ConvTranspose1d: not a conv for 'conv'
    kept = deconv1d.clone()
    centralize_([deconv1d], conv_only=True, out_dim=1)
    assert torch.equal(deconv1d, kept)
    centralize_([deconv1d], out_dim=1)
    assert deconv1d.mean(dim=(0, 2)).abs().max() < 1e-6


@pytest.mark.parametrize('kwargs,match', [
    (dict(out_dim=2), 'out_dim must be 0 or 1'),
    (dict(out_dim=1, groups=3), r'groups=3 does not divide .*\(4, 3, 3, 3\)'),
    (dict(out_dim=1, groups=0), 'groups must be a positive int'),
    (dict(out_dim=0, groups=2), 'groups applies to out_dim=1 only'),
])
def test_bad_output_layout_is_refused_before_any_tensor_changes(kwargs,
                                                                match):
    first, bad = torch.randn(3, 6, 3, 3), torch.randn(4, 3, 3, 3)
    kept = first.clone()
    with pytest.raises(ValueError, match=match):
        centralize_([first, bad], **kwargs)
    assert torch.equal(first, kept)
