"""PCB stripes and RPP refined part pooling: pooling values, per-part independence, conversion."""

from __future__ import annotations

import pytest
import torch

from reidkit.errors import ConfigError
from reidkit.models.pcb import PartLinear, PCBHead, RefinedPartPooling, StripePooling


def test_stripe_pooling_averages_the_right_rows_of_a_hand_built_map():
    # Row r of every channel holds the value r (channel c adds 100 * c): stripe i of 24 rows in
    # 6 parts covers rows 4i..4i+3, whose mean is 4i + 1.5.
    rows = torch.arange(24.0).view(1, 1, 24, 1).expand(2, 3, 24, 8)
    fmap = rows + 100 * torch.arange(3.0).view(1, 3, 1, 1)
    pooled = StripePooling(6)(fmap)
    assert pooled.shape == (2, 6, 3)
    expected = torch.tensor([4 * i + 1.5 for i in range(6)]).view(1, 6, 1) + 100 * torch.arange(
        3.0
    ).view(1, 1, 3)
    torch.testing.assert_close(pooled, expected.expand(2, 6, 3))


def test_stripe_pooling_matches_a_manual_mean_on_random_maps():
    fmap = torch.randn(2, 5, 24, 8)
    pooled = StripePooling(6)(fmap)
    for i in range(6):
        torch.testing.assert_close(pooled[:, i], fmap[:, :, 4 * i : 4 * i + 4].mean(dim=(2, 3)))


def test_stripe_pooling_uses_adaptive_bands_when_parts_do_not_divide_the_height():
    # 7 rows in 3 parts: rows [0, 3), [2, 5), [4, 7), i.e. floor(iH/P) to ceil((i+1)H/P).
    fmap = torch.randn(1, 2, 7, 3)
    pooled = StripePooling(3)(fmap)
    for i, (start, stop) in enumerate([(0, 3), (2, 5), (4, 7)]):
        torch.testing.assert_close(pooled[:, i], fmap[:, :, start:stop].mean(dim=(2, 3)))


def _head(**kw) -> PCBHead:
    options = {"parts": 6, "reduced": 16, "num_ids": 7, "dropout": 0.5} | kw
    return PCBHead(32, **options)


def test_head_output_shapes_and_features():
    head = _head().eval()
    out = head(torch.randn(3, 32, 24, 8))
    assert out.part_features.shape == (3, 6, 32)
    assert out.reduced_features.shape == (3, 6, 16)
    assert out.part_logits.shape == (3, 6, 7)
    assert (out.reduced_features >= 0).all()  # after ReLU


def test_changing_one_stripe_leaves_the_other_parts_unchanged():
    head = _head()
    head.train()  # BN in batch mode too: statistics must not mix parts
    head.dropout.p = 0.0
    fmap = torch.randn(4, 32, 24, 8)
    changed = fmap.clone()
    changed[:, :, 8:12] += torch.randn(4, 32, 4, 8)  # stripe 2 only
    a, b = head(fmap), head(changed)
    untouched = [0, 1, 3, 4, 5]
    for field in ("part_features", "reduced_features", "part_logits"):
        torch.testing.assert_close(getattr(a, field)[:, untouched], getattr(b, field)[:, untouched])
        assert not torch.allclose(getattr(a, field)[:, 2], getattr(b, field)[:, 2])


def test_each_part_has_its_own_reduction_and_classifier_weights():
    head = _head().eval()
    for layer in (head.reduce, head.classifier):
        weight = layer.weight  # (P, in, out): one independent slice per part
        assert weight.shape[0] == 6
        for i in range(1, 6):
            assert not torch.equal(weight[0], weight[i])  # not tied or copied at init
    # A loss on part 0 alone reaches only part 0's slices.
    out = head(torch.randn(2, 32, 24, 8))
    out.part_logits[:, 0].sum().backward()
    for layer in (head.reduce, head.classifier):
        grad = layer.weight.grad
        assert grad[0].abs().sum() > 0
        assert grad[1:].abs().sum() == 0


def reduction_inputs(head: PCBHead, fmap: torch.Tensor) -> torch.Tensor:
    """What the head's reduction receives for ``fmap``, caught by a forward hook."""
    seen = []
    handle = head.reduce.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    head(fmap)
    handle.remove()
    return seen[0]


def test_dropout_acts_on_the_pooled_stripes_before_the_reduction():
    # PCB's and the CSALR authors' place: g is dropped out, the reduction sees the survivors
    # scaled by 1 / (1 - p); h and the logits come from that.
    torch.manual_seed(0)
    head = _head(dropout=0.5).train()
    fmap = torch.rand(64, 32, 24, 8) + 0.5  # pooled stripes have no zeros of their own
    pooled = head.pooling(fmap)  # (B, P, C)
    dropped = reduction_inputs(head, fmap)
    zero = dropped == 0
    assert 0.45 < zero.float().mean() < 0.55
    torch.testing.assert_close(dropped[~zero], 2 * pooled[~zero])
    head.eval()
    torch.testing.assert_close(reduction_inputs(head, fmap), pooled)  # no dropout in eval
    assert (head(fmap).part_features == pooled).all()  # the test feature g: never dropped


def test_shared_reduction_is_one_conv_and_bn_for_every_stripe():
    torch.manual_seed(0)
    head = _head(shared_reduction=True, dropout=0.0).train()
    assert head.reduce.weight.shape == (16, 32)  # one (reduced x C) map for all parts
    assert head.bn.num_features == 16  # statistics pooled over images and parts
    fmap = torch.randn(5, 32, 24, 8)
    out = head(fmap)
    pre_bn = out.part_features @ head.reduce.weight.T  # (B, P, R): the same map per part
    flat = pre_bn.reshape(-1, 16)
    expected = torch.relu((flat - flat.mean(0)) / (flat.var(0, unbiased=False) + 1e-5).sqrt())
    torch.testing.assert_close(out.reduced_features, expected.view(5, 6, 16), atol=1e-5, rtol=1e-5)
    independent = _head(shared_reduction=False)
    assert independent.reduce.weight.shape == (6, 32, 16) and independent.bn.num_features == 96


def test_part_linear_equals_a_separate_linear_per_part():
    layer = PartLinear(3, 5, 4)
    x = torch.randn(2, 3, 5)
    out = layer(x)
    for p in range(3):
        torch.testing.assert_close(out[:, p], x[:, p] @ layer.weight[p] + layer.bias[p])


def test_rpp_assignments_sum_to_one_over_parts_at_every_position():
    rpp = RefinedPartPooling(32, 6)
    torch.nn.init.normal_(rpp.classifier.weight)  # far from uniform
    prob = rpp.assignment(torch.randn(2, 32, 24, 8))
    assert prob.shape == (2, 6, 24, 8)
    assert (prob > 0).all()
    torch.testing.assert_close(prob.sum(dim=1), torch.ones(2, 24, 8))
    assert prob.std() > 0.1  # genuinely position-dependent, not uniform


def test_rpp_is_the_assignment_weighted_average():
    rpp = RefinedPartPooling(8, 3)
    torch.nn.init.normal_(rpp.classifier.weight)
    fmap = torch.randn(2, 8, 6, 4)
    prob = rpp.assignment(fmap)
    pooled = rpp(fmap)
    for b in range(2):
        for i in range(3):
            w = prob[b, i]
            expected = (fmap[b] * w).sum(dim=(1, 2)) / w.sum()
            torch.testing.assert_close(pooled[b, i], expected)


def test_rpp_with_one_hot_stripe_assignment_reproduces_pcb_pooling():
    # Channels 0-5 carry a stripe indicator (the trunk "knows" the row band); the part
    # classifier reads only those channels with a huge gain, so softmax is exactly one-hot.
    parts, channels, h, w = 6, 16, 24, 8
    fmap = torch.randn(2, channels, h, w)
    fmap[:, :parts] = 0
    for i in range(parts):
        fmap[:, i, 4 * i : 4 * i + 4] = 1.0
    rpp = RefinedPartPooling(channels, parts)
    with torch.no_grad():
        rpp.classifier.weight.zero_()
        rpp.classifier.bias.zero_()
        for i in range(parts):
            rpp.classifier.weight[i, i] = 1000.0
    prob = rpp.assignment(fmap)
    assert set(prob.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(rpp(fmap), StripePooling(parts)(fmap), rtol=1e-6, atol=1e-6)


def test_rpp_conversion_keeps_every_pcb_weight_and_only_adds_the_part_classifier():
    head = _head()
    head(torch.randn(4, 32, 24, 8))  # move BN statistics away from their initial values
    before = {k: v.clone() for k, v in head.state_dict().items()}
    new = head.convert_to_rpp()
    assert isinstance(head.pooling, RefinedPartPooling) and head.pooling is new
    after = head.state_dict()
    assert set(after) - set(before) == {"pooling.classifier.weight", "pooling.classifier.bias"}
    assert set(before) <= set(after)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    with pytest.raises(ConfigError, match="only once"):
        head.convert_to_rpp()


def test_converted_head_uses_the_new_pooling():
    head = _head().eval()
    fmap = torch.randn(2, 32, 24, 8)
    pcb = head(fmap).part_features
    head.convert_to_rpp()
    torch.nn.init.normal_(head.pooling.classifier.weight)
    rpp = head(fmap).part_features
    torch.testing.assert_close(rpp, head.pooling(fmap))
    assert not torch.allclose(rpp, pcb)


def test_head_refuses_bad_arguments():
    with pytest.raises(ConfigError):
        PCBHead(32, num_ids=0)
    with pytest.raises(ConfigError):
        PCBHead(32, num_ids=5, dropout=1.0)
    with pytest.raises(ConfigError):
        StripePooling(0)
