"""Metric-learning losses of the strong baseline: batch-hard triplet loss, smoothed identity CE.

Hermans, Beyer and Leibe, "In Defense of the Triplet Loss for Person Re-Identification" (2017)
for the batch-hard mining and the soft margin; Szegedy et al. (2016) for label smoothing, as
Luo et al. (CVPR-W 2019) combine them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batch_hard_triplet_loss", "identity_loss", "pairwise_distances"]


def pairwise_distances(features: Tensor) -> Tensor:
    """(B, D) -> (B, B) Euclidean distances, from ||a||^2 + ||b||^2 - 2 a.b (no B x B x D).

    Clamped before the square root: rounding can make a squared distance slightly negative,
    and the root's derivative is infinite at 0 (the diagonal is never mined, see below).
    """
    squared = features.pow(2).sum(dim=1)  # (B,)
    gram = features @ features.T  # (B, B)
    return (squared[:, None] + squared[None, :] - 2 * gram).clamp_min(1e-12).sqrt()


def batch_hard_triplet_loss(
    features: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.3,
    kind: Literal["hard", "soft"] = "hard",
) -> Tensor:
    """Mean over anchors of the batch-hard triplet loss on (B, D) features with (B,) labels.

    For anchor a: d_ap = the largest distance to another image of its identity, d_an = the
    smallest distance to an image of another identity; hard margin max(0, d_ap - d_an +
    margin), soft margin log(1 + exp(d_ap - d_an)). Ties pick the first (lowest-index) image,
    so the (sub)gradient flows to one positive and one negative per anchor. An anchor without
    another image of its identity, or without any other identity in the batch, is left out;
    a batch with no valid anchor gives 0 (connected to `features`, so backward still runs).
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        shapes = f"{tuple(features.shape)}, {tuple(labels.shape)}"
        raise ValueError(f"need (B, D) features and (B,) labels, got {shapes}")
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    # Distances do not change under a shift; centring first shrinks the norms whose squares
    # ||a||^2 + ||b||^2 - 2 a.b subtracts, and with them the cancellation error of close pairs.
    distances = pairwise_distances(features - features.mean(dim=0, keepdim=True))  # (B, B)
    same = labels[:, None] == labels[None, :]  # (B, B)
    self_pair = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~self_pair
    negative = ~same
    # Masked entries are replaced so they never win the max / min (distances are >= 0).
    hardest_positive, _ = distances.masked_fill(~positive, -1.0).max(dim=1)  # (B,)
    hardest_negative, _ = distances.masked_fill(~negative, torch.inf).min(dim=1)  # (B,)
    valid = positive.any(dim=1) & negative.any(dim=1)
    if not valid.any():
        return features.sum() * 0.0
    gap = hardest_positive[valid] - hardest_negative[valid]
    losses = F.softplus(gap) if kind == "soft" else F.relu(gap + margin)
    return losses.mean()


def identity_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of (N, num_ids) logits against (1 - eps) one-hot + eps / num_ids."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
