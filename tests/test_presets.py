"""Paper presets carry section 4.2's settings and Table 1's numbers, typed in from the paper;
the strong-baseline presets carry Luo et al.'s recipe and published rows."""

import pytest

from reidkit.config import PaperRow, available_presets, load_preset

# Table 1 of Chen et al. (IJCAI 2020), mAP on Market-1501, Duke, CUHK03-NP.
TABLE_1 = {
    "pcb": [(92.3, 97.2, 98.2, 77.4), (81.7, 89.7, 91.9, 66.1), (59.7, 77.7, 85.2, 53.2)],
    "pcb-sa": [(93.8, 97.7, 98.5, 82.2), (85.3, 92.7, 94.8, 73.4), (65.9, 82.3, 88.4, 62.7)],
    "pcb-csa": [(93.7, 98.2, 98.8, 82.3), (85.5, 92.8, 94.5, 73.5), (67.2, 83.9, 88.9, 63.7)],
    "pcb-csalr": [(93.9, 97.8, 98.6, 82.4), (86.1, 93.2, 95.1, 74.0), (67.6, 82.4, 88.4, 64.0)],
    "pcb-rpp": [(93.8, 97.5, 98.5, 81.6), (83.3, 90.5, 92.5, 69.2), (62.8, 79.8, 86.8, 56.7)],
    "pcb-rpp-sa": [(93.3, 97.5, 98.7, 83.2), (84.9, 92.8, 94.7, 72.9), (66.1, 84.0, 89.0, 64.6)],
    "pcb-rpp-csa": [(93.9, 97.8, 98.8, 83.5), (85.4, 93.1, 94.5, 73.1), (67.4, 83.6, 89.1, 65.0)],
    "pcb-rpp-csalr": [(94.0, 98.1, 98.8, 83.8), (85.4, 93.3, 95.0, 73.8), (68.8, 84.4, 89.1, 65.3)],
}
DATASETS = ("market1501", "dukemtmc-reid", "cuhk03-np")
ATTENTION = {"": "none", "-sa": "sa", "-csa": "csa", "-csalr": "csalr"}


# Luo et al. (CVPR-W 2019): rank-1 and mAP; they publish no rank-5 / rank-10.
BOT_ROWS = {"market1501": (94.1, 85.7), "dukemtmc-reid": (86.4, 76.4)}


MOBILENET = ("mobilenet-pcb", "mobilenet-pcb-csalr", "mobilenet-bot", "mobilenet-bot-csalr")


def test_every_paper_row_has_a_preset():
    shipped = set(available_presets())
    assert set(TABLE_1) | {"smoke", "bot", "bot-csalr", *MOBILENET} == shipped


def test_presets_command_lists_the_strong_baseline_presets():
    from typer.testing import CliRunner

    from reidkit.cli import app

    shown = CliRunner().invoke(app, ["presets"])
    assert shown.exit_code == 0, shown.output
    names = {line.split("│")[1].strip() for line in shown.output.splitlines() if "│" in line}
    assert {"bot", "bot-csalr"} <= names


@pytest.mark.parametrize("name", ["bot", "bot-csalr"])
def test_strong_baseline_preset_settings(name):
    config = load_preset(name)
    data, model, train = config.data, config.model, config.train
    # Luo et al.: 256x128, flip, 10-pixel pad + crop, random erasing 0.5, P x K = 16 x 4
    assert (data.height, data.width, data.flip, data.pad_crop) == (256, 128, 0.5, 10)
    assert data.random_erasing == 0.5
    assert data.sampler == "identity" and train.batch_size // data.instances == 16
    assert data.instances == 4
    assert model.arch == "resnet50" and model.pretrained and model.last_stride == 1
    assert model.head == "global" and config.eval.feature == "h"  # test feature after BNNeck
    assert (train.optimizer, train.lr, train.weight_decay) == ("adam", 3.5e-4, 5e-4)
    assert train.trunk_lr_mult == 1.0
    assert (train.warmup_epochs, train.warmup_factor) == (10, 0.01)
    assert (train.schedule, train.milestones, train.gamma, train.epochs) == (
        "step",
        (40, 70),
        0.1,
        120,
    )
    assert train.label_smoothing == 0.1
    assert (train.triplet, train.triplet_margin) == ("hard", 0.3)
    for dataset, (rank1, mAP) in BOT_ROWS.items():
        row = config.paper[dataset]
        assert (row.rank1, row.mAP, row.rank5, row.rank10) == (rank1, mAP, None, None)
        assert "Luo et al." in row.source
    attention = config.attention
    if name == "bot":
        assert attention.kind == "none"
    else:
        assert attention.kind == "csalr" and attention.stages == (1, 2, 3)
        assert attention.deep_supervision and attention.ds_weight == 1.0
        assert attention.groups == 2
        # the paper's patches (8x4, 4x2, 2x1) on the 64x32, 32x16, 16x8 maps of 256x128
        gh, gw = attention.grid
        maps = [(64, 32), (32, 16), (16, 8)]
        assert [(h // gh, w // gw) for h, w in maps] == [(8, 4), (4, 2), (2, 1)]


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_paper_presets_leave_the_strong_baseline_recipe_off(name):
    config = load_preset(name)
    train = config.train
    assert config.model.head in ("pcb", "rpp") and train.optimizer == "sgd"
    assert (train.label_smoothing, train.triplet, train.warmup_epochs) == (0.0, "off", 0)
    assert train.schedule == "step" and train.milestones == ()
    assert (config.data.pad_crop, config.data.random_erasing) == (0, 0.0)


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_paper_preset_settings(name):
    config = load_preset(name)
    rpp = name.startswith("pcb-rpp")
    suffix = name.removeprefix("pcb-rpp" if rpp else "pcb")
    # section 4.2
    assert (config.data.height, config.data.width, config.data.flip) == (384, 128, 0.5)
    assert config.model.arch == "resnet50" and config.model.pretrained
    assert config.model.last_stride == 1 and config.model.parts == 6
    assert config.train.batch_size == 64 and config.train.epochs == 100
    assert config.train.lr == 0.1 and config.train.lr * config.train.trunk_lr_mult == pytest.approx(
        0.01
    )
    assert (config.train.momentum, config.train.weight_decay) == (0.9, 1e-4)
    assert (config.train.step_size, config.train.gamma) == (40, 0.1)
    # PCB-RPP: 40 epochs of PCB, then 60 of RPP
    assert config.model.head == ("rpp" if rpp else "pcb")
    assert config.train.epochs - config.train.rpp_epochs == (40 if rpp else 100)
    # attention: three modules after stages 1-3, deep supervision with lambda = 1
    assert config.attention.kind == ATTENTION[suffix]
    if config.attention.kind != "none":
        assert config.attention.stages == (1, 2, 3)
        assert config.attention.deep_supervision and config.attention.ds_weight == 1.0
    if config.attention.kind == "csalr":
        grid = config.attention.grid
        assert grid[0] * grid[1] == 96 and config.attention.groups == 2
    if config.attention.kind == "sa":
        assert config.attention.groups == 1  # the paper did not run multi-head SA


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_paper_preset_carries_table_1(name):
    config = load_preset(name)
    for dataset, row in zip(DATASETS, TABLE_1[name], strict=True):
        assert config.paper[dataset] == PaperRow(*row)


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        # Table 2: landmarks per group 24 / 48 / 96 / 192 with 2 groups
        (["attention.grid=6,4"], "grid", (6, 4)),
        (["attention.grid=12,4"], "grid", (12, 4)),
        (["attention.grid=24,8"], "grid", (24, 8)),
        # Table 3: groups 1 / 2 / 4 / 8
        (["attention.groups=8"], "groups", 8),
        # Table 4: stages {1}, {2, 3}
        (["attention.stages=1"], "stages", (1,)),
        (["attention.stages=2,3"], "stages", (2, 3)),
    ],
)
def test_ablations_are_reachable_with_set(overrides, field, expected):
    assert getattr(load_preset("pcb-csalr", overrides).attention, field) == expected


# torchreid's model zoo, mobilenetv2_x1_0 (ImageNet start, softmax only, 256x128): R1, mAP.
TORCHREID_MOBILENET = {"market1501": (85.6, 67.3), "dukemtmc-reid": (74.2, 54.7)}
TORCHREID_MOBILENET["msmt17"] = (57.4, 29.3)


@pytest.mark.parametrize("name", MOBILENET)
def test_mobilenet_presets_are_a_cpu_fine_tune_of_imagenet_weights(name):
    config = load_preset(name)
    data, model, train = config.data, config.model, config.train
    assert model.arch == "mobilenet_v2" and model.pretrained and model.last_stride == 1
    assert (data.dataset, data.height, data.width, train.epochs) == ("cuhk03-subset", 192, 64, 10)
    assert train.batch_size == 64 and train.amp == "off"
    if "bot" in name:
        assert model.head == "global" and config.eval.feature == "h"
        assert (train.optimizer, train.lr, train.trunk_lr_mult) == ("adam", 3.5e-4, 1.0)
        assert (train.schedule, train.warmup_epochs, train.warmup_factor) == ("cosine", 1, 0.3)
        assert (train.triplet, train.triplet_margin, train.label_smoothing) == ("hard", 0.3, 0.1)
        assert data.sampler == "identity" and data.instances == 4
    else:
        assert model.head == "pcb" and config.eval.feature == "g"
        assert train.optimizer == "sgd" and train.lr == 0.1
        assert train.lr * train.trunk_lr_mult == pytest.approx(0.01)
        assert (train.schedule, train.milestones, train.gamma) == ("step", (6, 9), 0.1)
    # the anchor rows: torchreid's, measured with another recipe, so never shown as this run's
    for dataset, (rank1, mAP) in TORCHREID_MOBILENET.items():
        row = config.paper[dataset]
        assert (row.rank1, row.mAP) == (rank1, mAP)
        assert "torchreid" in row.source and "256x128" in row.recipe


@pytest.mark.parametrize("name", ["mobilenet-pcb-csalr", "mobilenet-bot-csalr"])
def test_mobilenet_csalr_twin_differs_from_its_baseline_only_in_attention(name):
    from reidkit.config import config_to_dict

    twin, base = (config_to_dict(load_preset(n)) for n in (name, name.removesuffix("-csalr")))
    for section in ("data", "model", "train", "eval", "paper"):
        assert twin[section] == base[section], section
    attention = load_preset(name).attention
    assert (attention.kind, attention.stages, attention.groups) == ("csalr", (1, 2, 3), 2)
    assert (attention.qk_ratio, attention.landmark_weight) == (1.0, 2.0)
    assert attention.deep_supervision and attention.ds_weight == 1.0
    # the 6x4 grid pools the paper's 8x4, 4x2, 2x1 patches from the maps of a 192x64 input
    gh, gw = attention.grid
    maps = [(48, 16), (24, 8), (12, 4)]
    assert [(h // gh, w // gw) for h, w in maps] == [(8, 4), (4, 2), (2, 1)]
    assert all(h % gh == 0 and w % gw == 0 for h, w in maps)
