"""Training batches that cannot train are refused before a run writes anything: fewer than 2
images per process (BatchNorm), P x K identity batches that cannot be drawn."""

from __future__ import annotations

from pathlib import Path

import pytest

from reidkit.engine import train as train_module
from reidkit.engine.train import Distributed
from reidkit.errors import ConfigError

TRIPLET = ("data.sampler=identity", "data.instances=4", "train.triplet=hard")


@pytest.mark.parametrize(
    ("overrides", "world_size", "fragment"),
    [
        (("train.batch_size=2",), 2, "gives 1 image(s) per process (2 processes); BatchNorm"),
        (
            ("data.sampler=identity", "data.instances=4", "train.batch_size=12"),
            2,
            "gives batches of 6 per process (2 processes), not a multiple of data.instances",
        ),
        # one identity per batch: the batch-hard triplet loss would have no negative (loss 0)
        ((*TRIPLET, "train.batch_size=4"), 1, "needs 2 identities per batch, but"),
        ((*TRIPLET, "train.batch_size=8"), 2, "= 1 per process (2 processes)"),
        (("data.sampler=identity", "data.instances=2", "train.batch_size=40"), 1, "needs 20 id"),
    ],
)
def test_batches_that_cannot_train_are_refused_before_anything_is_written(
    tiny_config, tmp_path: Path, overrides, world_size, fragment
):
    config = tiny_config(*overrides)
    out = tmp_path / "run"
    place = Distributed(rank=0, world_size=world_size, local_rank=0)
    with pytest.raises(ConfigError) as err:
        train_module._fit(config, out, place, resume=False, progress=False, stop_after=None)
    assert fragment in str(err.value)
    assert not out.exists()  # no marker, no config.toml
