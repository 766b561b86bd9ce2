"""The strong baseline's global head with BNNeck (Luo et al., "Bag of Tricks and a Strong
Baseline for Deep Person Re-identification", CVPR-W 2019, section 3.4).

The ID loss wants features separable by hyperplanes, the triplet loss wants them compact in
Euclidean space; one vector serving both makes them pull against each other. BNNeck splits
them with a BatchNorm between: the triplet loss reads f_t before it, the classifier f_i after
it, and the test feature is f_i (cosine distance). The BN's bias stays frozen at zero and the
classifier has no bias, so the classifier's hyperplanes pass through the origin, where the
normalised features are spread around.
"""

from __future__ import annotations

from torch import Tensor, nn

from reidkit.errors import ConfigError
from reidkit.models.pcb import HeadOutput

__all__ = ["GlobalHead"]


class GlobalHead(nn.Module):
    """Global average pooling -> BNNeck -> bias-free linear classifier.

    Returns the same HeadOutput as PCBHead with one "part" (P = 1), so every consumer of the
    test feature (extract, evaluate, export, the Python API) works unchanged:
    `part_features` (B, 1, C) is f_t, the pooled feature before the BN (eval.feature g);
    `reduced_features` (B, 1, C) is f_i, after the BN (eval.feature h, the baseline's test
    feature); `part_logits` (B, 1, num_ids) the classifier's logits on f_i.
    """

    parts = 1

    def __init__(self, in_channels: int, *, num_ids: int) -> None:
        super().__init__()
        if num_ids < 1:
            raise ConfigError(f"num_ids must be at least 1, got {num_ids}")
        self.in_channels, self.num_ids = in_channels, num_ids
        self.bn = nn.BatchNorm1d(in_channels)
        self.bn.bias.requires_grad_(False)  # frozen at its initial 0: never in any update
        self.classifier = nn.Linear(in_channels, num_ids, bias=False)
        # The baseline's initialisation: BN weight 1, bias 0; classifier N(0, 0.001).
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        nn.init.normal_(self.classifier.weight, std=0.001)

    @property
    def is_rpp(self) -> bool:
        return False

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters that must never train, whatever else is frozen or unfrozen."""
        return [self.bn.bias]

    def convert_to_rpp(self) -> None:
        raise ConfigError("RPP refines PCB's stripes; a global head has none (model.head=rpp)")

    def forward(self, fmap: Tensor) -> HeadOutput:
        """(B, C, H, W) trunk map -> HeadOutput with P = 1."""
        pooled = fmap.mean(dim=(2, 3))  # f_t: (B, C)
        normalised = self.bn(pooled)  # f_i: (B, C)
        logits = self.classifier(normalised)  # (B, num_ids)
        return HeadOutput(pooled.unsqueeze(1), normalised.unsqueeze(1), logits.unsqueeze(1))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_ids={self.num_ids}, bnneck bias frozen"
