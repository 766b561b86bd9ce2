"""Recipe wiring, observed from outside `fit()` and `build_model`: a setting changed in the
config must change what the run does.

Each expected value is written here from the config's numbers (a rate times its multiplier,
the step formula, a loss sum, the literal float64 attention), never read back from the code
under test. What each config field reaches, and the test (test_...) that sees it:

- data.height/width, train.batch_size: the training images' size, per step  [flip_and_erasing]
- data.flip, data.random_erasing: mirrored / erased training images  [flip_and_erasing]
- data.pad_crop, sampler, instances: tests/data/test_loading.py, engine/test_train_recipe.py
- data.workers, root, dataset: where and how images load, not what is trained
- model.arch, last_stride, head, parts, reduced, dropout, shared_reduction: the built trunk
  and head  [model_settings]
- model.pretrained, weights: tests/models/test_resnet.py (ImageNet files)
- attention.kind, stages, groups, grid, qk_ratio, landmark_weight, projection, bases: module
  types, places and options [attention_settings], and the built module's output against the
  literal reference at the config's grid and weight  [built_csalr]
- attention.deep_supervision, ds_weight: the branches; lambda of eq. 18  [deep_supervision]
- attention.recompute: tests/models/test_net.py (same gradients, re-run in backward)
- train.lr, trunk_lr_mult, attention_lr_mult, optimizer, momentum, weight_decay: every param
  group's members and settings  [optimiser_groups, adam]
- train.epochs, schedule, step_size, milestones, gamma, warmup_*: every group's lr at every
  epoch, and metrics.csv's  [schedule_over_epochs]
- train.rpp_epochs, rpp_classifier_epochs: each epoch's stage, the classifier phase's rate
  [rpp_stages], and all it leaves untouched  [rpp_classifier_phase]
- train.label_smoothing, triplet, triplet_margin: engine/test_train_recipe.py, test_losses.py
- train.grad_clip, amp, channels_last, seed, eval_every: tests/engine/test_train.py

Wiring breakages tried, one at a time, and the test that failed on each:
- momentum hard-coded to 0.9 in _build_optimizer  [optimiser_groups]
- the attention group at trunk_lr_mult  [optimiser_groups]
- fit passing ds_weight=1.0 to reid_loss  [deep_supervision]
- landmark_weight not passed to the modules  [attention_settings, built_csalr]
- data.flip not passed to the training transform  [flip_and_erasing]
- the RPP classifier-alone phase skipped in stage_of  [rpp_stages]
- frozen BN left in train mode in the classifier phase  [rpp_classifier_phase]
- warm-up ignored by learning_rate  [schedule_over_epochs]
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reidkit.data.loading import build_transform
from reidkit.engine import train as train_module
from reidkit.engine.checkpoint import load_checkpoint, model_from_checkpoint
from reidkit.engine.train import fit
from reidkit.models import reference
from reidkit.models.attention import CSA, CSALR, SelfAttention
from reidkit.models.net import build_model


@pytest.fixture
def spy(monkeypatch):
    """What fit hands each epoch: the optimiser's groups (by parameter name), the stage and
    the loader; recorded before the epoch runs."""
    epochs: list[dict] = []
    real = train_module._train_one_epoch

    def recording(model, loader, optimizer, scaler, config, **kwargs):
        net = model.module if hasattr(model, "module") else model
        names = {id(p): name for name, p in net.named_parameters()}
        groups = {
            g["name"]: {
                "lr": g["lr"],
                "momentum": g.get("momentum"),
                "weight_decay": g["weight_decay"],
                "params": {names[id(p)] for p in g["params"]},
            }
            for g in optimizer.param_groups
        }
        epochs.append(
            {
                "epoch": kwargs["epoch"],
                "stage": kwargs["stage"],
                "optimizer": type(optimizer).__name__,
                "groups": groups,
                "loader": loader,
            }
        )
        return real(model, loader, optimizer, scaler, config, **kwargs)

    monkeypatch.setattr(train_module, "_train_one_epoch", recording)
    return epochs


def metrics(run) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv")


def test_optimiser_groups_members_and_hyper_parameters(tiny_config, tmp_path, spy):
    config = tiny_config(
        "train.epochs=1",
        "train.lr=0.04",
        "train.trunk_lr_mult=0.25",
        "train.attention_lr_mult=0.5",
        "train.momentum=0.7",
        "train.weight_decay=3e-4",
    )
    fit(config, tmp_path / "run", progress=False)
    (seen,) = spy
    assert seen["optimizer"] == "SGD"
    groups = seen["groups"]
    expected_lr = {"trunk": 0.04 * 0.25, "attention": 0.04 * 0.5, "new": 0.04}
    assert {name: g["lr"] for name, g in groups.items()} == pytest.approx(expected_lr)
    assert all(g["momentum"] == 0.7 and g["weight_decay"] == 3e-4 for g in groups.values())
    net = build_model(config, num_ids=8)
    names = {name for name, _ in net.named_parameters()}
    assert groups["trunk"]["params"] == {n for n in names if n.startswith("trunk.")}
    assert groups["attention"]["params"] == {n for n in names if n.startswith("attention.")}
    assert groups["new"]["params"] == {
        n for n in names if n.startswith(("head.", "aux_classifiers."))
    }
    assert any(n.startswith("aux_classifiers.") for n in groups["new"]["params"])


def test_adam_takes_the_rate_and_decay(tiny_config, tmp_path, spy):
    config = tiny_config("train.epochs=1", "train.optimizer=adam", "train.lr=3.5e-4")
    fit(replace_weight_decay(config, 5e-4), tmp_path / "run", progress=False)
    (seen,) = spy
    assert seen["optimizer"] == "Adam"
    assert seen["groups"]["new"]["lr"] == pytest.approx(3.5e-4)
    assert all(g["weight_decay"] == 5e-4 for g in seen["groups"].values())


def replace_weight_decay(config, value):
    from dataclasses import replace

    return replace(config, train=replace(config.train, weight_decay=value))


@pytest.mark.parametrize(
    ("sets", "factors"),
    [
        # x gamma every step_size epochs
        (("train.step_size=2", "train.gamma=0.5"), [1, 1, 0.5, 0.5, 0.25]),
        # x gamma at each milestone reached
        (("train.milestones=1,3", "train.gamma=0.1"), [1, 0.1, 0.1, 0.01, 0.01]),
        # linear warm-up from 0.2x over 2 epochs, then steps
        (
            ("train.warmup_epochs=2", "train.warmup_factor=0.2", "train.milestones=4"),
            [0.2, 0.6, 1, 1, 0.1],
        ),
        # cosine over the 5 epochs: (1 + cos(pi e / 5)) / 2
        (("train.schedule=cosine",), [(1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)]),
    ],
)
def test_schedule_over_epochs_reaches_the_optimiser(tiny_config, tmp_path, spy, sets, factors):
    config = tiny_config("train.epochs=5", "train.lr=0.02", "train.trunk_lr_mult=0.5", *sets)
    run = tmp_path / "run"
    fit(config, run, progress=False)
    assert [s["epoch"] for s in spy] == list(range(5))
    for seen, factor in zip(spy, factors, strict=True):
        assert seen["groups"]["new"]["lr"] == pytest.approx(0.02 * factor)
        assert seen["groups"]["trunk"]["lr"] == pytest.approx(0.01 * factor)
    assert list(metrics(run)["lr"]) == pytest.approx([0.02 * f for f in factors])


RPP = ("model.head=rpp", "train.epochs=4", "train.rpp_epochs=2", "train.rpp_classifier_epochs=1")


def test_rpp_stages_and_their_rates(tiny_config, tmp_path, spy):
    config = tiny_config(*RPP, "train.lr=0.02", "train.milestones=3", "train.gamma=0.1")
    fit(config, tmp_path / "run", progress=False)
    assert [s["stage"] for s in spy] == ["pcb", "pcb", "rpp-classifier", "rpp"]
    classifier_phase = spy[2]["groups"]
    # the new part classifier trains at the new layers' rate of that epoch (that nothing else
    # moves is the next test's)
    assert {
        "head.pooling.classifier.weight",
        "head.pooling.classifier.bias",
    } <= classifier_phase["new"]["params"]
    assert classifier_phase["new"]["lr"] == pytest.approx(0.02)
    # then everything again, the schedule counted across stages (milestone at epoch 3)
    last = spy[3]["groups"]
    assert last["new"]["lr"] == pytest.approx(0.002)
    assert "head.pooling.classifier.weight" in last["new"]["params"]
    assert last["trunk"]["params"] and last["attention"]["params"]


def test_rpp_classifier_phase_changes_only_the_part_classifier(tiny_config, tmp_path):
    config = tiny_config(*RPP)
    run = tmp_path / "run"
    fit(config, run, progress=False, stop_after=2)  # the PCB stage
    before = load_checkpoint(run / "last.pt")
    fit(config, run, resume=True, progress=False, stop_after=1)  # the classifier-alone epoch
    after = load_checkpoint(run / "last.pt")
    assert after.epoch == 3 and after.head == "rpp"
    # a PCB model converted to RPP as the run does: every tensor but the new classifier's
    converted = model_from_checkpoint(before)
    converted.convert_to_rpp()
    expected = converted.state_dict()
    changed = []
    for key, value in after.model.items():
        if key.startswith("head.pooling.classifier."):
            continue
        assert torch.equal(value, expected[key]), key  # weights and BN statistics, bit for bit
    for key in ("head.pooling.classifier.weight", "head.pooling.classifier.bias"):
        changed.append(not torch.equal(after.model[key], expected[key]))
    assert all(changed)  # ... while the classifier did train
    bn_stats = [k for k in after.model if k.endswith(("running_mean", "running_var"))]
    assert len(bn_stats) > 20


def test_deep_supervision_weight_in_the_loss(tiny_config, tmp_path):
    run = tmp_path / "ds"
    fit(tiny_config("train.epochs=1", "attention.ds_weight=0.3"), run, progress=False)
    row = metrics(run).iloc[0]
    assert row["loss_ds"] > 0.1
    assert row["loss"] == pytest.approx(row["loss_parts"] + 0.3 * row["loss_ds"], rel=1e-6)
    # without deep supervision: no branches, no term
    off = tmp_path / "off"
    fit(tiny_config("train.epochs=1", "attention.deep_supervision=false"), off, progress=False)
    row = metrics(off).iloc[0]
    assert row["loss_ds"] == 0 and row["loss"] == pytest.approx(row["loss_parts"])
    assert not any(k.startswith("aux_") for k in load_checkpoint(off / "last.pt").model)


def test_attention_settings_reach_the_modules(tiny_config):
    config = tiny_config(
        "attention.stages=2,3",
        "attention.groups=4",
        "attention.grid=2,2",
        "attention.qk_ratio=0.5",
        "attention.landmark_weight=1.5",
        "attention.projection=map",
    )
    net = build_model(config, num_ids=8)
    assert net.attention_stages == (2, 3)
    for stage, channels in ((2, 128), (3, 256)):  # ResNet-18's stage widths
        module = net.attention[str(stage)]
        assert isinstance(module, CSALR)
        assert module.groups == 4 and module.grid == (2, 2) and module.projection == "map"
        assert module.landmark_weight == 1.5
        assert module.query.out_channels == module.key.out_channels == channels // 2
    kinds = {"sa": SelfAttention, "csa": CSA}
    for kind, cls in kinds.items():
        net = build_model(tiny_config(f"attention.kind={kind}", "attention.bases=5"), num_ids=8)
        assert all(type(m) is cls for m in net.attention.values())
        if kind == "csa":
            assert all(m.bases.shape[1] == 5 for m in net.attention.values())
    assert not build_model(tiny_config("attention.kind=none"), num_ids=8).attention


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_built_csalr_computes_with_the_configs_grid_and_weight(tiny_config, weight):
    config = tiny_config("attention.grid=3,2", f"attention.landmark_weight={weight}")
    net = build_model(config, num_ids=8).eval()
    module = net.attention["1"]
    x = torch.randn(2, module.channels, 24, 8)  # stage 1's map at 96x32
    with torch.no_grad():
        # sharpen the attention: near-uniform softmaxes (the initial scale) give an output
        # that no longer depends on the weight c (rows of A_nm and A_mm all sum to 1 + c)
        for conv in (module.query, module.key):
            conv.weight.mul_(30)
        _, fused = module(x)
        q, k = module.queries_keys(x)
        v = module.grouped(torch.nn.functional.conv2d(x, module.value.weight, module.value.bias))
        y = reference.csalr_attention_reference(
            q.double(), k.double(), v.double(), (3, 2), landmark_weight=weight
        )
        expected = torch.nn.functional.conv2d(
            y.flatten(1, 2), module.fuse.weight.double(), module.fuse.bias.double()
        )
    torch.testing.assert_close(fused.double(), expected, rtol=1e-4, atol=1e-5)


def test_model_settings_reach_the_built_modules(tiny_config):
    net = build_model(
        tiny_config(
            "model.parts=3",
            "model.reduced=64",
            "model.dropout=0.3",
            "model.shared_reduction=true",
            "model.last_stride=2",
            "data.height=192",
        ),
        num_ids=8,
    )
    dropouts = [m for m in net.head.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.3 for m in dropouts)
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 3, 192, 32))
    assert out.part_logits.shape[:2] == (2, 3)
    # one reduction shared by the stripes: one (C -> reduced) map, BN over `reduced` channels
    assert isinstance(net.head.reduce, torch.nn.Linear)
    assert net.head.reduce.weight.shape == (64, 512) and net.head.bn.num_features == 64
    with torch.no_grad():
        final, _ = net.forward_features(torch.randn(1, 3, 192, 32))
    assert final.shape[-2:] == (6, 1)  # stride 2 at the last stage: 192/32 x 32/32
    independent = build_model(tiny_config("model.shared_reduction=false"), num_ids=8)
    assert independent.head.reduce.weight.shape == (6, 512, 256)  # one map per stripe
    assert independent.head.bn.num_features == 6 * 256
    wide = build_model(tiny_config("model.arch=resnet34"), num_ids=8)
    assert [len(stage) for stage in wide.trunk.stages] == [3, 4, 6, 3]  # ResNet-34's blocks
    assert [len(stage) for stage in net.trunk.stages] == [2, 2, 2, 2]  # ResNet-18's


def first_batch(loader):
    images, labels, _camids, indices = next(iter(loader))
    return images, indices


def eval_images(loader, indices, height, width) -> torch.Tensor:
    transform = build_transform(height, width, train=False)
    paths = loader.dataset.paths
    out = []
    for i in indices.tolist():
        with Image.open(paths[i]) as image:
            out.append(transform(image.convert("RGB")))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("flip", "erasing"),
    [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)],
)
def test_flip_and_erasing_reach_training_images(tiny_config, tmp_path, spy, flip, erasing):
    config = tiny_config(
        "train.epochs=1",
        "train.batch_size=6",
        f"data.flip={flip}",
        f"data.random_erasing={erasing}",
    )
    fit(config, tmp_path / "run", progress=False)
    loader = spy[0]["loader"]
    torch.manual_seed(0)
    images, indices = first_batch(loader)
    assert images.shape == (6, 3, 96, 32)
    plain = eval_images(loader, indices, 96, 32)
    if flip == 1.0:
        torch.testing.assert_close(images, plain.flip(-1))
    elif erasing == 1.0:
        for image, source in zip(images, plain, strict=True):
            differs = (image != source).any(dim=0).numpy()  # (H, W)
            rows, cols = np.nonzero(differs)
            assert rows.size, "an erased rectangle"
            box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
            assert 0.02 * 96 * 32 * 0.5 <= box <= 0.4 * 96 * 32 * 1.5
            assert torch.all(image[:, differs] == 0)  # the mean colour after normalising
    else:
        torch.testing.assert_close(images, plain)
