"""Each rule's backward against the TSGB.md formula, computed independently here in float64.

The independent computations avoid the library's building blocks: TSGB-Conv is evaluated window
by window with explicit index arithmetic (no all-ones convolutions), average-pooling transposes
come from autograd of ``F.avg_poolNd``, and padding modes are undone with autograd of ``F.pad``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tsgb_fx.rules import ratio_avg_pool, ratio_batch_norm, tsgb_conv, tsgb_linear
from tsgb_fx.rules import conv as conv_module

EPS = 1e-10


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def rule_gradient(function, x, g, *args, **kwargs):
    x = x.clone().requires_grad_(True)
    y = function(x, *args, **kwargs)
    (g_x,) = torch.autograd.grad(y, x, g)
    return y.detach(), g_x


# --------------------------------------------------------------------------- TSGB-Conv


def _padded(x, conv: nn.Module):
    """The input the convolution's windows actually see, built with F.pad."""
    ndim = x.dim() - 2
    if isinstance(conv.padding, str):  # 'same': PyTorch puts the odd extra on the right
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        pairs = [(t // 2, t - t // 2) for t in total]
    else:
        pairs = [(p, p) for p in conv.padding]
    flat = [a for pair in reversed(pairs) for a in pair]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, flat, mode=mode) if any(flat) else x.clone(), ndim


def reference_tsgb_conv(x, g, conv: nn.Module, conv_groups="reference"):
    """TSGB-Conv of TSGB.md, window by window, for a conv module; returns g_x."""
    x = x.detach().requires_grad_(True)
    xp, ndim = _padded(x, conv)
    y = conv(x).detach()
    groups = conv.groups if conv_groups == "layer" else 1
    cin, cout = x.shape[1] // groups, y.shape[1] // groups
    g_xp = torch.zeros_like(xp)
    for out_index in itertools.product(*(range(n) for n in y.shape[2:])):
        window = [
            [o * s + d * k for k in range(ks)]
            for o, s, d, ks in zip(out_index, conv.stride, conv.dilation, conv.kernel_size)
        ]
        for group in range(groups):
            channels_in = slice(group * cin, (group + 1) * cin)
            channels_out = slice(group * cout, (group + 1) * cout)
            c = (g[(slice(None), channels_out, *out_index)] * y[(slice(None), channels_out, *out_index)]).sum(1)
            z = torch.zeros_like(c)
            for position in itertools.product(*window):
                z += xp[(slice(None), channels_in, *position)].detach().abs().sum(1)
            r = c / (z + EPS)
            for position in itertools.product(*window):
                index = (slice(None), channels_in, *position)
                g_xp[index] += xp[index].detach().sign() * r[:, None]
    (g_x,) = torch.autograd.grad(xp, x, g_xp)  # undo the padding (zeros, reflect, ...)
    return g_x


def _conv_case(ndim, cin, cout, size, **kwargs):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim](cin, cout, **kwargs)
    with torch.no_grad():
        conv.bias.normal_() if conv.bias is not None else None
    x = torch.randn(2, cin, *size)
    return conv, x


CONV_CASES = {
    "plain": (2, 3, 4, (7, 7), dict(kernel_size=3)),
    "stride2-odd": (2, 3, 5, (9, 8), dict(kernel_size=3, stride=2, padding=1)),
    "stride3-dropped-rows": (2, 2, 3, (10, 11), dict(kernel_size=2, stride=3)),
    "dilation": (2, 2, 3, (9, 9), dict(kernel_size=3, dilation=2, padding=2)),
    "asymmetric-kernel": (2, 3, 2, (8, 7), dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0))),
    "groups": (2, 4, 6, (6, 6), dict(kernel_size=3, groups=2, padding=1)),
    "depthwise": (2, 4, 4, (7, 6), dict(kernel_size=3, groups=4, stride=2, padding=1)),
    "same-even-kernel": (2, 3, 3, (7, 8), dict(kernel_size=4, padding="same")),
    "same-dilated": (2, 2, 3, (8, 8), dict(kernel_size=3, padding="same", dilation=2)),
    "reflect": (2, 3, 3, (6, 7), dict(kernel_size=3, padding=1, padding_mode="reflect")),
    "replicate": (2, 3, 3, (6, 6), dict(kernel_size=3, padding=2, stride=2, padding_mode="replicate")),
    "circular": (2, 2, 3, (5, 6), dict(kernel_size=3, padding=1, padding_mode="circular")),
    "no-bias": (2, 3, 3, (6, 6), dict(kernel_size=3, bias=False)),
    "pointwise": (2, 5, 4, (6, 7), dict(kernel_size=1)),
    "pointwise-stride2-odd": (2, 4, 6, (7, 6), dict(kernel_size=1, stride=2, groups=2)),
    "pointwise-padded": (2, 3, 3, (5, 5), dict(kernel_size=1, padding=1)),
    "conv1d": (1, 3, 4, (11,), dict(kernel_size=3, stride=2, padding=1)),
    "conv1d-groups": (1, 4, 4, (9,), dict(kernel_size=3, groups=2, dilation=2)),
    "conv3d": (3, 2, 3, (5, 4, 5), dict(kernel_size=3, stride=2, padding=1)),
    "conv3d-depthwise": (3, 2, 2, (4, 5, 4), dict(kernel_size=(2, 3, 2), groups=2)),
}


@pytest.mark.parametrize("conv_groups", ["reference", "layer"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_tsgb_conv_matches_window_by_window_formula(case, conv_groups):
    torch.manual_seed(0)
    ndim, cin, cout, size, kwargs = CONV_CASES[case]
    conv, x = _conv_case(ndim, cin, cout, size, **kwargs)
    expected_y = conv(x).detach()
    g = torch.randn_like(expected_y)
    y, g_x = rule_gradient(
        tsgb_conv, x, g, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
        conv.padding_mode, conv_groups=conv_groups,
    )
    torch.testing.assert_close(y, expected_y)
    torch.testing.assert_close(g_x, reference_tsgb_conv(x, g, conv, conv_groups), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("conv_groups", ["reference", "layer"])
@pytest.mark.parametrize("case", ["plain", "stride2-odd", "groups", "depthwise", "pointwise-stride2-odd", "conv3d"])
def test_tsgb_conv_shortcuts_match_the_formula(case, conv_groups, monkeypatch):
    """After a plain ReLU (input_rectified) and with the batch summed in chunks: still TSGB.md.

    The rectified shortcut sends BoxT(r) where the formula sends sign(x) * BoxT(r); they differ
    only where x == 0, which the ReLU's own backward zeroes, so the signal before the ReLU is
    compared. One image per chunk forces the chunked relevance sum.
    """
    monkeypatch.setattr(conv_module, "CHUNK_ELEMENTS", 1)
    torch.manual_seed(3)
    ndim, cin, cout, size, kwargs = CONV_CASES[case]
    conv, pre_activation = _conv_case(ndim, cin, cout, size, **kwargs)
    x = pre_activation.relu()
    g = torch.randn_like(conv(x))
    pre = pre_activation.clone().requires_grad_(True)
    y = tsgb_conv(pre.relu(), conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                  conv.padding_mode, conv_groups=conv_groups, input_rectified=True)
    (g_pre,) = torch.autograd.grad(y, pre, g)
    expected = reference_tsgb_conv(x, g, conv, conv_groups) * (pre_activation > 0)
    torch.testing.assert_close(g_pre, expected, rtol=1e-9, atol=1e-9)
    assert (x == 0).any() and (g_pre != 0).any()


def _random_batch_norm(channels, ndim=2):
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim](channels).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


@pytest.mark.parametrize("conv_groups", ["reference", "layer"])
@pytest.mark.parametrize("case", ["plain", "stride2-odd", "depthwise", "pointwise", "conv3d"])
def test_batch_norm_folded_into_tsgb_conv_is_the_two_rules(case, conv_groups):
    """conv then a ratio-rule BN as one op: TSGB-Conv (window by window) of the signal the exact
    ratio rule ``g * y / x`` sends to the conv's output, with a ReLU6 folded in after the BN."""
    torch.manual_seed(4)
    ndim, cin, cout, size, kwargs = CONV_CASES[case]
    conv, x = _conv_case(ndim, cin, cout, size, **kwargs)
    bn = _random_batch_norm(cout, ndim)
    with torch.no_grad():
        bn.weight.mul_(8)  # so that some units saturate at 6 and carry no relevance
    y_conv = conv(x).detach()
    y_bn = bn(y_conv).detach()
    assert (y_bn > 6).any() and (y_bn < 0).any()
    g = torch.randn_like(y_bn)
    statistics = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    folded_out, g_x = rule_gradient(
        tsgb_conv, x, g, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
        conv.padding_mode, conv_groups=conv_groups, batch_norm=statistics, output_clamp=(0.0, 6.0),
    )
    torch.testing.assert_close(folded_out, y_bn.clamp(0, 6))
    g_conv = g * ((y_bn > 0) & (y_bn < 6)) * y_bn / y_conv  # ReLU6's gradient, then the exact ratio rule
    torch.testing.assert_close(g_x, reference_tsgb_conv(x, g_conv, conv, conv_groups), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("conv_groups", ["reference", "layer"])
def test_folded_batch_norm_stops_relevance_where_the_conv_output_is_zero(conv_groups):
    """A depthwise channel over all-zero inputs outputs exactly 0: the two separate rules (the
    ratio rule's stabilised division, then TSGB-Conv's product with that 0) stop the relevance
    there, and so does the fold, though the batch norm's output there is its nonzero shift."""
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
    x = torch.rand(1, 3, 6, 6)
    x[:, 1] = 0.0  # a dead channel: its depthwise output is exactly 0
    bn = _random_batch_norm(3)
    statistics = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    g = torch.randn(1, 3, 6, 6)
    args = (conv.weight, None, 1, 1, 1, 3)
    folded_out, folded = rule_gradient(tsgb_conv, x, g, *args, conv_groups=conv_groups, batch_norm=statistics)
    assert (conv(x)[:, 1] == 0).all() and (folded_out[:, 1] != 0).all()

    def two_rules(x):
        return ratio_batch_norm(tsgb_conv(x, *args, conv_groups=conv_groups), *statistics)

    _, separate = rule_gradient(two_rules, x, g)
    torch.testing.assert_close(folded, separate, rtol=1e-9, atol=1e-12)
    # the relevance that reaches x is the relevance at the live outputs only
    live = (conv(x) != 0).detach()
    torch.testing.assert_close((folded * x).sum(), (g * folded_out * live).sum())


@pytest.mark.parametrize("conv_groups", ["reference", "layer"])
@pytest.mark.parametrize("case", ["plain", "depthwise", "conv3d"])
def test_silu_folded_into_tsgb_conv_is_the_op_then_its_plain_silu(case, conv_groups, monkeypatch):
    """conv, ratio-rule BN and a SiLU as one op (relevance formed a chunk at a time): autograd
    through the same op without the SiLU, then torch's own SiLU, sends the same signal."""
    monkeypatch.setattr(conv_module, "CHUNK_ELEMENTS", 1)
    torch.manual_seed(8)
    ndim, cin, cout, size, kwargs = CONV_CASES[case]
    conv, x = _conv_case(ndim, cin, cout, size, **kwargs)
    bn = _random_batch_norm(cout, ndim)
    statistics = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    args = (conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    g = torch.randn_like(conv(x))
    folded_out, folded = rule_gradient(
        tsgb_conv, x, g, *args, conv_groups=conv_groups, batch_norm=statistics, output_activation="silu"
    )

    def then_silu(x):
        return F.silu(tsgb_conv(x, *args, conv_groups=conv_groups, batch_norm=statistics))

    separate_out, separate = rule_gradient(then_silu, x, g)
    torch.testing.assert_close(folded_out, separate_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(folded, separate, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("conv_groups", ["reference", "layer"])
@pytest.mark.parametrize("reader", ["plain", "depthwise", "reflect", "replicate", "same-even-kernel", "groups"])
def test_sign_moved_upstream_gives_the_signed_pair(reader, conv_groups):
    """A SiLU-folded op whose only reader is a TSGB-Conv: the reader sends BoxT(r) without
    sign(a) and the op applies the sign (|y| in its carrier). The pair sends the signal that the
    two ops send with the sign where TSGB.md puts it, also through the reader's explicit pads."""
    torch.manual_seed(9)
    _ndim, channels, cout, size, kwargs = CONV_CASES[reader]
    first = nn.Conv2d(3, channels, 3, padding=1)
    second = nn.Conv2d(channels, cout, **kwargs)
    x = torch.randn(2, 3, *size)
    bn = _random_batch_norm(channels)
    statistics = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    first_args = (first.weight, first.bias, 1, 1)
    second_args = (second.weight, second.bias, second.stride, second.padding, second.dilation, second.groups,
                   second.padding_mode)

    def moved(x):
        a = tsgb_conv(x, *first_args, batch_norm=statistics, output_activation="silu", activation_unsigned=True)
        return tsgb_conv(a, *second_args, conv_groups=conv_groups, input_sign_upstream=True)

    def signed(x):
        a = F.silu(tsgb_conv(x, *first_args, batch_norm=statistics))
        return tsgb_conv(a, *second_args, conv_groups=conv_groups)

    g = torch.randn_like(second(first(x)))
    out, g_x = rule_gradient(moved, x, g)
    expected_out, expected = rule_gradient(signed, x, g)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_x, expected, rtol=1e-9, atol=1e-12)
    assert (F.silu(bn(first(x))) < 0).any()  # negative activations: the sign matters


def test_output_activation_other_than_silu_is_refused_by_name():
    conv = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="output_activation"):
        tsgb_conv(torch.randn(1, 2, 5, 5), conv.weight, output_activation="gelu")


@pytest.mark.parametrize("signal", ["broadcast", "full"])
def test_fold_with_mask_and_clamp_sums_in_chunks_like_the_separate_rules(signal, monkeypatch):
    """The fold's relevance ``g * carrier(y) * live``, formed image by image in eager mode
    (one image per chunk here), for a signal broadcast over the channels (what a rectified
    TSGB-Conv sends back) and for a full one: autograd through ReLU6 then the two separate
    rules gives the same signal."""
    monkeypatch.setattr(conv_module, "CHUNK_ELEMENTS", 1)
    torch.manual_seed(7)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    x = torch.rand(3, 4, 7, 7)
    x[0, 1] = 0.0  # a dead channel in one image
    bn = _random_batch_norm(4)
    with torch.no_grad():
        bn.weight.mul_(8)  # some units saturate at 6
        bn.running_mean[1], bn.bias[1] = 0.0, 3.0  # the dead channel's output is 3: relevance the mask stops
    statistics = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    args = (conv.weight, None, 1, 1, 1, 4)
    g = torch.randn(3, 1, 7, 7).expand(3, 4, 7, 7) if signal == "broadcast" else torch.randn(3, 4, 7, 7)
    folded_out, folded = rule_gradient(
        tsgb_conv, x, g, *args, batch_norm=statistics, output_clamp=(0.0, 6.0)
    )
    assert (folded_out == 6).any() and (folded_out[0, 1] == 3).all()

    def separate_rules(x):
        return F.relu6(ratio_batch_norm(tsgb_conv(x, *args), *statistics))

    _, separate = rule_gradient(separate_rules, x, g.contiguous())
    torch.testing.assert_close(folded, separate, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("conv_groups", ["reference", "layer"])
@pytest.mark.parametrize("case", ["plain", "groups", "depthwise", "pointwise-stride2-odd"])
def test_tsgb_conv_with_a_broadcast_signal_matches_the_formula(case, conv_groups):
    """A signal that is one map expanded over the channels (stride 0), as a rectified TSGB-Conv
    sends it, takes the ``c = g * sum(y)`` shortcut: still the window-by-window formula."""
    torch.manual_seed(7)
    ndim, cin, cout, size, kwargs = CONV_CASES[case]
    conv, x = _conv_case(ndim, cin, cout, size, **kwargs)
    shape = conv(x).shape
    g = torch.randn(shape[0], 1, *shape[2:]).expand(shape)
    assert g.stride(1) == 0
    _, g_x = rule_gradient(tsgb_conv, x, g, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                           conv.groups, conv.padding_mode, conv_groups=conv_groups)
    expected = reference_tsgb_conv(x, g.contiguous(), conv, conv_groups)
    torch.testing.assert_close(g_x, expected, rtol=1e-9, atol=1e-9)


def test_tsgb_conv_groups_modes_differ_only_for_grouped_convs():
    torch.manual_seed(1)
    for groups, should_differ in ((1, False), (3, True)):
        conv, x = _conv_case(2, 3, 3, (6, 6), kernel_size=3, groups=groups)
        g = torch.randn_like(conv(x))
        args = (conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        _, reference = rule_gradient(tsgb_conv, x, g, *args, conv_groups="reference")
        _, layer = rule_gradient(tsgb_conv, x, g, *args, conv_groups="layer")
        assert (not torch.allclose(reference, layer)) == should_differ


def test_tsgb_conv_conserves_relevance_where_windows_have_mass():
    """g_x * x summed over the input equals g * y summed over the output when every z > 0."""
    torch.manual_seed(2)
    conv, x = _conv_case(2, 3, 4, (9, 9), kernel_size=3, stride=2, padding=1)
    g = torch.randn_like(conv(x))
    y, g_x = rule_gradient(tsgb_conv, x, g, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, 1)
    torch.testing.assert_close((g_x * x).sum(), (g * y).sum())


def test_tsgb_conv_weight_gets_no_gradient():
    conv, x = _conv_case(2, 3, 4, (6, 6), kernel_size=3)
    x.requires_grad_(True)
    y = tsgb_conv(x, conv.weight, conv.bias, 1, 0, 1, 1)
    y.sum().backward()
    assert conv.weight.grad is None and conv.bias.grad is None and x.grad is not None


# --------------------------------------------------------------------------- TSGB-FC


@pytest.mark.parametrize("signal", ["dense", "two-classes", "none"])
def test_tsgb_fc_matches_formula_per_class(signal):
    """Every class, or only the classes some image's signal names (the eager path then reads
    only those rows of W), against the per-class formula."""
    torch.manual_seed(3)
    linear = nn.Linear(7, 5)
    x = torch.rand(4, 7)
    g = torch.randn(4, 5)
    if signal != "dense":
        g[:, [0, 2, 4] if signal == "two-classes" else slice(None)] = 0.0
    y, g_x = rule_gradient(tsgb_linear, x, g, linear.weight, linear.bias)
    torch.testing.assert_close(y, linear(x).detach())
    W = linear.weight.detach()
    expected = torch.zeros_like(x)
    for n in range(4):
        for j in range(5):
            w_pos, w_neg = W[j].clamp(min=0), W[j].clamp(max=0)
            z_pos, z_neg = (x[n] * w_pos).sum(), (x[n] * w_neg).sum()
            beta = z_pos / (z_neg.abs() + EPS)
            expected[n] += g[n, j] * w_pos + g[n, j] * beta * w_neg
    torch.testing.assert_close(g_x, expected)


def test_tsgb_fc_balances_evidence_for_a_one_hot_target():
    """sum_i x_i g_x,i = z+_j - beta_j |z-_j| = 0 for a one-hot signal at class j."""
    torch.manual_seed(4)
    linear = nn.Linear(16, 10)
    x = torch.rand(3, 16)
    g = F.one_hot(torch.tensor([2, 5, 9]), 10).double()
    _, g_x = rule_gradient(tsgb_linear, x, g, linear.weight, linear.bias)
    torch.testing.assert_close((g_x * x).sum(1), torch.zeros(3), atol=1e-9, rtol=0)


def test_tsgb_fc_is_finite_when_negative_evidence_vanishes():
    weight = torch.ones(3, 4)  # no negative weights: z- = 0
    x, g = torch.rand(2, 4), torch.ones(2, 3)
    _, g_x = rule_gradient(tsgb_linear, x, g, weight, None)
    assert torch.isfinite(g_x).all()
    torch.testing.assert_close(g_x, g @ weight)


# --------------------------------------------------------------------------- ratio rules


@pytest.mark.parametrize("bn_class,shape", [(nn.BatchNorm1d, (4, 3, 5)), (nn.BatchNorm2d, (2, 3, 4, 5)), (nn.BatchNorm3d, (2, 3, 2, 3, 4))])
def test_batch_norm_ratio_rule(bn_class, shape):
    torch.manual_seed(5)
    bn = _random_batch_norm(3, len(shape) - 2)
    x = torch.randn(*shape)
    g = torch.randn(*shape)
    y, g_x = rule_gradient(ratio_batch_norm, x, g, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    torch.testing.assert_close(y, bn(x).detach())
    torch.testing.assert_close(g_x, g * y / x)  # TSGB.md; the stabiliser acts only where |x| < eps


def test_batch_norm_ratio_rule_is_finite_at_zero_input():
    x = torch.tensor([[0.0, -0.0, 1e-300]]).reshape(1, 1, 3)
    stats = torch.zeros(1), torch.ones(1)
    _, g_x = rule_gradient(ratio_batch_norm, x, torch.ones_like(x), *stats, torch.ones(1), torch.ones(1), 1e-5)
    assert torch.isfinite(g_x).all()


POOL_CASES = {
    "2d": (nn.AvgPool2d, (2, 3, 7, 8), dict(kernel_size=2)),
    "2d-stride-pad": (nn.AvgPool2d, (2, 3, 9, 9), dict(kernel_size=3, stride=2, padding=1)),
    "2d-no-pad-count": (nn.AvgPool2d, (2, 2, 9, 8), dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)),
    "2d-ceil": (nn.AvgPool2d, (2, 2, 7, 7), dict(kernel_size=2, ceil_mode=True)),
    "2d-divisor": (nn.AvgPool2d, (1, 2, 6, 6), dict(kernel_size=3, divisor_override=2)),
    "1d": (nn.AvgPool1d, (2, 3, 11), dict(kernel_size=3, stride=2, padding=1)),
    "3d": (nn.AvgPool3d, (2, 2, 5, 6, 4), dict(kernel_size=2, stride=(1, 2, 2))),
}


@pytest.mark.parametrize("case", list(POOL_CASES))
def test_avg_pool_ratio_rule(case):
    torch.manual_seed(6)
    pool_class, shape, kwargs = POOL_CASES[case]
    pool = pool_class(**kwargs)
    x = torch.randn(*shape)
    y_ref = pool(x)
    g = torch.randn_like(y_ref)
    y, g_x = rule_gradient(
        ratio_avg_pool, x, g, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
        pool.count_include_pad, getattr(pool, "divisor_override", None),
    )
    torch.testing.assert_close(y, y_ref)
    xr = x.clone().requires_grad_(True)
    (pool_transpose,) = torch.autograd.grad(pool(xr), xr, g * y)  # AvgPoolT: the ordinary backward
    torch.testing.assert_close(g_x, pool_transpose / x)  # TSGB.md; the stabiliser acts only where |x| < eps
