"""The training bar shows the loss metrics.csv stores: the epoch's running mean."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from reidkit.engine import train as train_module
from reidkit.engine.train import reid_loss


def test_the_bar_shows_the_running_epoch_mean_of_the_loss(tiny_config, tmp_path: Path, monkeypatch):
    shown: list[float] = []
    batch_losses: list[tuple[float, int]] = []

    @contextmanager
    def recording_bar(enabled, epoch, epochs, stage, steps):
        yield lambda **fields: shown.append(fields["loss"])

    def recorded_loss(output, labels, ds_weight, **options):
        losses = reid_loss(output, labels, ds_weight, **options)
        batch_losses.append((losses["loss"].item(), labels.numel()))
        return losses

    monkeypatch.setattr(train_module, "_epoch_progress", recording_bar)
    monkeypatch.setattr(train_module, "reid_loss", recorded_loss)
    train_module.fit(tiny_config("train.epochs=1"), tmp_path / "run", progress=True)

    assert len(shown) == len(batch_losses) > 2
    # after each batch: the mean of the batches so far, weighted by their images
    for step, value in enumerate(shown, start=1):
        so_far = batch_losses[:step]
        mean = sum(loss * n for loss, n in so_far) / sum(n for _, n in so_far)
        assert value == pytest.approx(mean, rel=1e-9)
    (stored,) = pd.read_csv(tmp_path / "run" / "metrics.csv")["loss"]
    assert shown[-1] == pytest.approx(stored, rel=1e-6)
    assert shown[-1] != pytest.approx(batch_losses[-1][0], rel=1e-6)  # not the last batch's
