"""The strong baseline's recipe in the training loop: schedules at their boundary epochs (values
written from the formulas here), each new key observed reaching the run, and a `bot` run that
learns on synthetic data."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from reidkit.config import load_preset
from reidkit.engine import train as train_module
from reidkit.engine.train import fit, learning_rate
from reidkit.errors import ConfigError

BASE = 3.5e-4


def test_bot_warm_up_and_milestones_at_their_boundary_epochs():
    config = load_preset("bot")
    warm = [BASE * (0.01 + 0.99 * e / 10) for e in range(10)]  # linear from 0.01x over 10
    expected = {0: BASE * 0.01, 1: warm[1], 5: warm[5], 9: warm[9], 10: BASE, 39: BASE}
    expected |= {40: BASE * 0.1, 69: BASE * 0.1, 70: BASE * 0.01, 119: BASE * 0.01}
    for epoch, lr in expected.items():
        assert learning_rate(config, epoch) == pytest.approx(lr, rel=1e-12), epoch


def test_cosine_after_warm_up_at_its_boundary_epochs():
    config = load_preset("bot", ["train.schedule=cosine"])
    cosine = {e: BASE * 0.5 * (1 + math.cos(math.pi * (e - 10) / 110)) for e in (10, 65, 119)}
    assert learning_rate(config, 0) == pytest.approx(BASE * 0.01, rel=1e-12)
    assert learning_rate(config, 9) == pytest.approx(BASE * (0.01 + 0.99 * 0.9), rel=1e-12)
    assert learning_rate(config, 10) == pytest.approx(BASE, rel=1e-12) == cosine[10]
    assert learning_rate(config, 65) == pytest.approx(BASE / 2, rel=1e-12)
    assert learning_rate(config, 119) == pytest.approx(cosine[119], rel=1e-12)
    assert 0 < learning_rate(config, 119) < BASE * 1e-3


def test_cosine_without_warm_up_starts_at_the_base_rate():
    config = load_preset("bot", ["train.schedule=cosine", "train.warmup_epochs=0"])
    assert learning_rate(config, 0) == pytest.approx(BASE, rel=1e-12)
    assert learning_rate(config, 60) == pytest.approx(BASE / 2, rel=1e-12)


def test_step_size_still_steps_without_milestones():
    overrides = ["train.milestones=", "train.step_size=30", "train.warmup_epochs=0"]
    config = load_preset("bot", overrides)
    assert [learning_rate(config, e) / BASE for e in (0, 29, 30, 60, 119)] == pytest.approx(
        [1, 1, 0.1, 0.01, 0.001]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.milestones=70,40"], "train.milestones = 70,40: give increasing epochs"),
        (["train.milestones=0,40"], "train.milestones = 0,40: give increasing epochs from 1"),
        (["train.warmup_factor=0"], "train.warmup_factor = 0.0: give a fraction in (0, 1]"),
        (["data.sampler=random"], "train.triplet = hard needs identity batches"),
        (["data.instances=1", "train.batch_size=16"], "data.instances of at least 2"),
        (["train.label_smoothing=1"], "train.label_smoothing = 1.0: give a smoothing epsilon"),
        (["model.head=global", "train.rpp_epochs=5"], "train.rpp_epochs is set but model.head"),
    ],
)
def test_inconsistent_recipe_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_preset("bot", overrides)


def test_a_shortened_preset_run_stays_in_its_warm_up_before_any_milestone():
    config = load_preset("bot", ["train.epochs=5"])  # warm-up 10, milestones 40 and 70
    assert learning_rate(config, 4) == pytest.approx(BASE * (0.01 + 0.99 * 0.4), rel=1e-12)
    cosine = load_preset("bot", ["train.epochs=10", "train.schedule=cosine"])
    assert learning_rate(cosine, 9) == pytest.approx(BASE * (0.01 + 0.99 * 0.9), rel=1e-12)


def test_optimizer_key_builds_adam_or_sgd_with_the_group_rates(tiny_config):
    adam = tiny_config(
        "model.head=global",
        "train.optimizer=adam",
        "train.lr=0.001",
        "train.weight_decay=5e-4",
        "train.trunk_lr_mult=0.5",
        "train.attention_lr_mult=2",
    )
    model = train_module.build_model(adam, 8)
    optimizer = train_module._build_optimizer(model, adam)
    train_module._set_learning_rate(optimizer, adam, 0)
    assert type(optimizer) is torch.optim.Adam
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert {name: g["lr"] for name, g in groups.items()} == pytest.approx(
        {"trunk": 0.0005, "attention": 0.002, "new": 0.001}
    )
    assert all(g["weight_decay"] == 5e-4 for g in groups.values())
    listed = {id(p) for g in groups.values() for p in g["params"]}
    assert id(model.head.bn.bias) not in listed  # BNNeck's bias is in no group
    assert listed | {id(model.head.bn.bias)} == {id(p) for p in model.parameters()}
    sgd = train_module._build_optimizer(model, tiny_config("train.optimizer=sgd"))
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.9


BOT_TINY = (
    "model.head=global",
    "eval.feature=h",
    "data.sampler=identity",
    "data.instances=4",
    "train.optimizer=adam",
    "train.lr=0.001",
    "train.weight_decay=5e-4",
    "train.warmup_epochs=1",
    "train.warmup_factor=0.1",
    "train.label_smoothing=0.1",
    "train.triplet=soft",
    "train.epochs=2",
)


def test_every_recipe_key_reaches_the_training_loop(tiny_config, tmp_path: Path, monkeypatch):
    seen = {"calls": [], "epochs": []}
    reid_loss, train_one_epoch = train_module.reid_loss, train_module._train_one_epoch

    def recording_loss(output, labels, ds_weight, **options):
        seen["calls"].append((labels.clone(), options, output.part_features.shape))
        return reid_loss(output, labels, ds_weight, **options)

    def recording_epoch(model, loader, optimizer, *args, **kwargs):
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        seen["epochs"].append((type(optimizer), lrs, model.head_kind))
        return train_one_epoch(model, loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_module, "reid_loss", recording_loss)
    monkeypatch.setattr(train_module, "_train_one_epoch", recording_epoch)
    fit(tiny_config(*BOT_TINY), tmp_path / "run", progress=False)

    (kind0, lrs0, head0), (kind1, lrs1, _) = seen["epochs"]
    assert kind0 is kind1 is torch.optim.Adam and head0 == "global"
    assert lrs0["new"] == pytest.approx(0.001 * 0.1) and lrs1["new"] == pytest.approx(0.001)
    labels, options, features = seen["calls"][0]
    assert options == {"label_smoothing": 0.1, "triplet": "soft", "triplet_margin": 0.3}
    assert features[1] == 1  # the global head's single feature
    for labels, _, _ in seen["calls"]:  # identity batches: P = 2 identities x K = 4 images
        assert sorted(torch.bincount(labels).tolist())[-2:] == [4, 4]
        assert len(labels.unique()) == 2
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert (metrics["loss_triplet"] > 0).all()
    total = metrics["loss_parts"] + metrics["loss_triplet"] + metrics["loss_ds"]
    assert (metrics["loss"] - total).abs().max() < 1e-4  # L = L_id + L_tri + lambda sum L_DS
    assert list(metrics["stage"]) == ["global", "global"]
    drawn = [key for key, _ in train_module.plotted_loss_terms(metrics)]
    assert drawn == ["loss", "loss_parts", "loss_triplet", "loss_ds"]
    assert (tmp_path / "run" / "curves.png").read_bytes().startswith(b"\x89PNG")
    without = metrics.assign(loss_triplet=0.0)  # a run with the triplet loss off
    assert "loss_triplet" not in [key for key, _ in train_module.plotted_loss_terms(without)]


# 16 training identities x 2 cameras x 4 images = 128 training images; 12 test identities
# queried in one camera each, against their 7 other images and 4 distractors.
LEARN_SPEC_ARGS = {
    "train_ids": 16,
    "test_ids": 12,
    "cameras": 2,
    "images_per_camera": 4,
    "height": 64,
    "width": 32,
    "seed": 5,
    "query_cameras": 1,
    "distractors": 4,
}


@pytest.fixture(scope="module")
def learn_root(tmp_path_factory) -> Path:
    from reidkit.data.prepare import prepare_dataset
    from reidkit.data.synthetic import SyntheticSpec

    root = tmp_path_factory.mktemp("learn")
    spec = SyntheticSpec(**LEARN_SPEC_ARGS)
    prepare_dataset("synthetic", root, name="learn", synthetic=spec, progress=False)
    return root


def test_bot_preset_learns_on_synthetic_data(learn_root: Path, tmp_path: Path):
    from reidkit.api import load_model as load_api_model
    from reidkit.data.loading import read_manifest
    from reidkit.engine.checkpoint import load_model
    from reidkit.engine.evaluate import evaluate_model
    from reidkit.retrieval.metrics import chance_rank1

    # The bot preset shrunk like the smoke preset: ResNet-18 from scratch at 64x32, batches
    # of 4 identities x 4 images, a higher rate and a 1-epoch warm-up for 6 epochs.
    config = load_preset(
        "bot",
        [
            "data.dataset=learn",
            f"data.root={learn_root}",
            "data.height=64",
            "data.width=32",
            "data.workers=0",
            "model.arch=resnet18",
            "model.pretrained=false",
            "train.batch_size=16",
            "train.lr=3e-3",
            "train.warmup_epochs=1",
            "train.epochs=6",
            "train.eval_every=6",
            "eval.batch_size=64",
        ],
    )
    checkpoint = fit(config, tmp_path / "run", progress=False)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    frame = read_manifest(learn_root / "learn" / "manifest.csv")
    query, gallery = frame[frame["split"] == "query"], frame[frame["split"] == "gallery"]
    chance = chance_rank1(
        query["pid"].to_numpy(),
        gallery["pid"].to_numpy(),
        query["camid"].to_numpy(),
        gallery["camid"].to_numpy(),
    )  # about 5%
    assert chance < 0.06
    rank1 = metrics["rank1"].iloc[-1]
    assert rank1 >= 4 * chance, (rank1, chance)
    assert metrics["loss_triplet"].iloc[-1] < 0.5 * metrics["loss_triplet"].iloc[0]
    # the checkpoint evaluates and embeds through the generic paths, after BNNeck
    model, state = load_model(checkpoint)
    assert state.head == "global" and torch.equal(model.head.bn.bias, torch.zeros(512))
    report = evaluate_model(model, state.config, progress=False)
    assert report.metrics.rank(1) == pytest.approx(rank1, abs=1e-12)
    frame = pd.read_csv(learn_root / "learn" / "manifest.csv")
    paths = [str(learn_root / "learn" / p) for p in frame["path"].head(3)]
    features = load_api_model(checkpoint).embed(paths)
    assert features.shape == (3, 512)
    assert np_allclose_rows_unit(features)


def np_allclose_rows_unit(features) -> bool:
    import numpy as np

    return bool(np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5))
