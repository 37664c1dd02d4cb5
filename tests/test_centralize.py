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
