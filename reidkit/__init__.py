"""reidkit: person re-identification with compressed self-attention (Chen et al., IJCAI 2020)."""

__version__ = "0.1.0"
