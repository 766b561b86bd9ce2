"""The strong baseline's losses against references written from their definitions, with loops."""

from __future__ import annotations

import math

import pytest
import torch

from reidkit.engine.losses import batch_hard_triplet_loss, identity_loss


def naive_batch_hard(features, labels, margin, kind):
    """Hermans et al.'s batch-hard loss, one anchor at a time, distances from coordinates.

    Ties: the first image (lowest index) with the extreme distance, by explicit comparison.
    """
    n, dims = features.shape
    terms = []
    for a in range(n):
        best_pos, best_neg = None, None
        for j in range(n):
            d = torch.sqrt(sum((features[a, k] - features[j, k]) ** 2 for k in range(dims)))
            if j != a and labels[j] == labels[a]:
                if best_pos is None or d > best_pos:
                    best_pos = d
            elif labels[j] != labels[a]:
                if best_neg is None or d < best_neg:
                    best_neg = d
        if best_pos is None or best_neg is None:
            continue
        gap = best_pos - best_neg
        if kind == "hard":
            terms.append(gap + margin if gap + margin > 0 else gap * 0)
        else:
            terms.append(torch.log(1 + torch.exp(gap)))
    return sum(terms) / len(terms)


def both(features, labels, margin, kind):
    """(loss, gradient) of the implementation and of the reference, in float64."""
    ours_in = features.clone().double().requires_grad_(True)
    ref_in = features.clone().double().requires_grad_(True)
    ours = batch_hard_triplet_loss(ours_in.double(), labels, margin=margin, kind=kind)
    ref = naive_batch_hard(ref_in, labels, margin, kind)
    ours.backward()
    ref.backward()
    return ours, ref, ours_in.grad, ref_in.grad


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_triplet_matches_the_loop_reference_on_p_by_k_batches(kind):
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(3)  # P = 4 identities x K = 3 images each
    features = torch.randn(12, 5)
    ours, ref, grad, ref_grad = both(features, labels, 0.3, kind)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ours.item() > 0
    assert torch.allclose(grad, ref_grad, atol=1e-5)


def test_triplet_with_tied_distances_sends_the_gradient_to_the_first_tied_image():
    # Integer coordinates over 8 images: the batch mean is a multiple of 1/8, so every distance
    # formula is exact in float64 and the ties stay exact ties.
    # Anchor 0 has two positives at distance 2 (images 1 and 2), and two negatives at 1.
    features = torch.tensor(
        [[0, 0], [2, 0], [0, 2], [1, 0], [0, 1], [5, 5], [3, -4], [-4, 3]], dtype=torch.float64
    )
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    ours, ref, grad, ref_grad = both(features, labels, 0.3, "hard")
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_hard_margin_is_zero_for_separated_identities_and_soft_is_not():
    features = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    hard = batch_hard_triplet_loss(features, labels, margin=0.3, kind="hard")
    soft = batch_hard_triplet_loss(features, labels, kind="soft")
    assert hard.item() == 0.0
    # d_ap = 0.1 for all; d_an = 10 for the outer anchors (0, 3), 9.9 for the inner ones
    expected = (math.log1p(math.exp(0.1 - 10.0)) + math.log1p(math.exp(0.1 - 9.9))) / 2
    assert soft.item() == pytest.approx(expected, rel=1e-4)


def test_margin_enters_the_hard_loss_one_for_one():
    torch.manual_seed(1)
    features, labels = torch.randn(8, 4), torch.arange(2).repeat_interleave(4)
    small = batch_hard_triplet_loss(features, labels, margin=5.0)
    large = batch_hard_triplet_loss(features, labels, margin=6.0)
    assert (large - small).item() == pytest.approx(1.0, abs=1e-5)  # every term active


def test_anchors_without_positives_are_left_out():
    features = torch.tensor([[0.0], [2.0], [3.0]])
    labels = torch.tensor([0, 0, 1])  # image 2 has no positive (only itself)
    # anchor 0: d_ap 2, d_an 3; anchor 1: d_ap 2, d_an 1; margin 2
    expected = (max(0, 2 - 3 + 2) + max(0, 2 - 1 + 2)) / 2
    loss = batch_hard_triplet_loss(features, labels, margin=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert naive_batch_hard(features, labels, 2.0, "hard").item() == pytest.approx(expected)


def test_a_batch_without_any_valid_anchor_gives_zero_and_still_backpropagates():
    features = torch.randn(4, 3, requires_grad=True)
    loss = batch_hard_triplet_loss(features, torch.zeros(4, dtype=torch.long))  # no negatives
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(features.grad, torch.zeros(4, 3))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothing_follows_its_definition(eps):
    torch.manual_seed(2)
    logits, labels = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    expected = 0.0
    for row, label in zip(logits, labels, strict=True):
        log_p = row - torch.log(torch.exp(row).sum())
        # target q = (1 - eps) one-hot + eps / N; loss = -sum_j q_j log p_j
        q = [eps / 7 + (1 - eps) * (j == label) for j in range(7)]
        expected += -sum(q[j] * log_p[j] for j in range(7)).item() / 5
    assert identity_loss(logits, labels, label_smoothing=eps).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_reid_loss_sums_smoothed_part_ces_triplet_on_pooled_features_and_weighted_ds():
    from reidkit.engine.train import reid_loss
    from reidkit.models.net import NetOutput

    torch.manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pooled = torch.randn(6, 2, 3)  # P = 2 parts of 3 channels: the triplet reads all 6
    logits = torch.randn(6, 2, 4)
    aux = (torch.randn(6, 4),)
    output = NetOutput(pooled, torch.zeros(6, 2, 5), logits, aux)
    losses = reid_loss(output, labels, 0.5, label_smoothing=0.2, triplet="hard")

    def smoothed(rows, eps=0.2):
        total = 0.0
        for row, label in zip(rows, labels, strict=True):
            log_p = row - torch.log(torch.exp(row).sum())
            total += -sum((eps / 4 + (1 - eps) * (j == label)) * log_p[j] for j in range(4))
        return total / len(labels)

    parts = smoothed(logits[:, 0]) + smoothed(logits[:, 1])
    triplet = naive_batch_hard(pooled.flatten(1), labels, 0.3, "hard")
    ds = smoothed(aux[0])
    assert losses["loss_parts"].item() == pytest.approx(parts.item(), rel=1e-5)
    assert losses["loss_triplet"].item() == pytest.approx(triplet.item(), rel=1e-5)
    assert losses["loss_ds"].item() == pytest.approx(ds.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx((parts + triplet + 0.5 * ds).item(), rel=1e-5)


def test_triplet_loss_is_shift_invariant_in_float32_despite_large_norms():
    # ReLU features of a trained trunk share a large mean; ||a||^2 + ||b||^2 - 2ab on them
    # cancels most digits of the small distances between images of one identity.
    torch.manual_seed(4)
    features, labels = torch.randn(8, 16), torch.arange(2).repeat_interleave(4)
    near = batch_hard_triplet_loss(features, labels)
    far = batch_hard_triplet_loss(features + 300.0, labels)
    assert far.item() == pytest.approx(near.item(), rel=1e-4)
