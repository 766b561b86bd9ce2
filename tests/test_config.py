"""Config: presets, typed overrides and cross-field validation."""

from pathlib import Path

import pytest

from reidkit.config import (
    RunConfig,
    apply_overrides,
    available_presets,
    config_from_dict,
    config_to_dict,
    data_root,
    load_preset,
    stage_map_size,
)
from reidkit.errors import ConfigError


def test_defaults_are_the_papers_setting():
    config = RunConfig()
    assert (config.data.height, config.data.width) == (384, 128)
    assert config.model.arch == "resnet50" and config.model.last_stride == 1
    assert config.attention.kind == "csalr" and config.attention.stages == (1, 2, 3)
    assert config.attention.groups == 2 and config.attention.grid == (12, 8)
    assert config.train.batch_size == 64 and config.train.epochs == 100
    assert (config.train.lr, config.train.trunk_lr_mult) == (0.1, 0.1)
    assert (config.train.step_size, config.train.gamma) == (40, 0.1)


def test_overrides_are_typed_from_the_dataclass():
    config = apply_overrides(
        RunConfig(),
        [
            "attention.grid=6,4",
            "attention.stages=2,3",
            "train.epochs=7",
            "train.lr=0.02",
            "model.pretrained=false",
            "attention.kind=sa",
        ],
    )
    assert config.attention.grid == (6, 4)
    assert config.attention.stages == (2, 3)
    assert config.train.epochs == 7 and isinstance(config.train.epochs, int)
    assert config.train.lr == 0.02
    assert config.model.pretrained is False
    assert config.attention.kind == "sa"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.epochz=3", "valid keys: data.dataset"),
        ("nosection.x=1", "data.dataset"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.epochs=many", "train.epochs"),
        ("model.pretrained=maybe", "true or false"),
        ("attention.kind=transformer", "none, sa, csa, csalr"),
        ("attention.grid=6", "2 comma-separated"),
        ("train.epochs", "section.key=value"),
    ],
)
def test_bad_override_names_the_key_and_the_fix(override, fragment):
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_grid_that_does_not_divide_a_stage_map_is_refused():
    # 384x128 input: stage maps 96x32, 48x16, 24x8; 5 rows divide none of them
    with pytest.raises(ConfigError, match="does not divide the 96x32 map after stage 1"):
        apply_overrides(RunConfig(), ["attention.grid=5,4"])
    # the same grid is fine when attention is off
    assert apply_overrides(RunConfig(), ["attention.kind=none", "attention.grid=5,4"])


@pytest.mark.parametrize(
    ("overrides", "refused", "suggested"),
    [
        # 96x32 input: maps 24x8, 12x4, 6x2; the old fixed example 6,4 was this very grid
        (("data.height=96", "data.width=32", "attention.grid=6,4"), "6x4", "6,2"),
        # 384x128: maps 96x32, 48x16, 24x8 (common divisors 24 and 8)
        (("attention.grid=5,4",), "5x4", "4,4"),
        (("attention.grid=16,8",), "16x8", "12,8"),
        (("attention.grid=0,3",), "0x3", "1,2"),
    ],
)
def test_a_refused_grid_suggests_one_that_divides_every_map(overrides, refused, suggested):
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), list(overrides))
    message = str(err.value)
    assert f"attention.grid = {refused} does not divide" in message
    assert message.endswith(f"e.g. attention.grid={suggested}")
    # the suggestion, pasted back, is accepted
    fixed = apply_overrides(RunConfig(), [*overrides[:-1], f"attention.grid={suggested}"])
    assert fixed.attention.grid == tuple(int(v) for v in suggested.split(","))


def test_stage_map_sizes_follow_last_stride():
    config = RunConfig()
    assert [stage_map_size(config, s) for s in (1, 2, 3, 4)] == [
        (96, 32),
        (48, 16),
        (24, 8),
        (24, 8),
    ]
    plain = apply_overrides(config, ["model.last_stride=2"])
    assert stage_map_size(plain, 4) == (12, 4)


def test_rpp_needs_rpp_epochs_and_pcb_refuses_them():
    with pytest.raises(ConfigError, match="rpp_epochs"):
        apply_overrides(RunConfig(), ["model.head=rpp"])
    with pytest.raises(ConfigError, match="model.head=rpp"):
        apply_overrides(RunConfig(), ["train.rpp_epochs=10"])


def test_identity_sampler_needs_batch_divisible_by_instances():
    with pytest.raises(ConfigError, match="multiple of data.instances"):
        apply_overrides(RunConfig(), ["data.sampler=identity", "data.instances=5"])


def test_every_shipped_preset_loads_and_round_trips():
    presets = available_presets()
    assert "smoke" in presets
    for name in presets:
        config = load_preset(name)
        assert config.name == name
        assert config.description, f"preset {name} has no description"
        assert config_from_dict(config_to_dict(config)) == config


def test_preset_from_a_file_path(tmp_path: Path):
    path = tmp_path / "mine.toml"
    path.write_text('description = "mine"\n[train]\nepochs = 3\n[attention]\nkind = "none"\n')
    config = load_preset(path, ["train.batch_size=8"])
    assert config.name == "mine"
    assert config.train.epochs == 3 and config.train.batch_size == 8
    assert config.attention.kind == "none"


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_preset("pcb-transformer")
    assert "smoke" in str(err.value)


def test_preset_with_unknown_key_fails_with_the_file_name(tmp_path: Path):
    path = tmp_path / "typo.toml"
    path.write_text("[train]\nepoch = 3\n")
    with pytest.raises(ConfigError, match=r"typo\.toml: unknown key train\.epoch"):
        load_preset(path)
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_preset(broken)


def test_data_root_prefers_argument_then_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("REIDKIT_DATA", str(tmp_path / "env"))
    assert data_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert data_root("") == tmp_path / "env"
    monkeypatch.delenv("REIDKIT_DATA")
    assert data_root("") == Path("~/data").expanduser()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.height=0", "data.height = 0: give a multiple of 32, at least 32"),
        ("data.width=0", "data.width = 0: give a multiple of 32, at least 32"),
        ("data.flip=1.5", "data.flip = 1.5: give a probability in [0, 1]"),
        ("data.flip=nan", "data.flip = nan: give a probability"),
        ("data.random_erasing=-0.1", "data.random_erasing = -0.1: give a probability"),
        ("data.pad_crop=-1", "data.pad_crop = -1: give 0 (off)"),
        ("data.instances=0", "data.instances = 0: give at least 1"),
        ("data.workers=-1", "data.workers = -1: give 0"),
        ("model.parts=0", "model.parts = 0: give at least 1"),
        ("model.reduced=0", "model.reduced = 0: give at least 1"),
        ("model.dropout=1", "model.dropout = 1.0: give a probability in [0, 1)"),
        ("attention.groups=0", "attention.groups = 0: give at least 1"),
        ("attention.qk_ratio=0", "attention.qk_ratio = 0.0: give a fraction in (0, 1]"),
        ("attention.qk_ratio=1.5", "attention.qk_ratio = 1.5: give a fraction in (0, 1]"),
        ("attention.bases=0", "attention.bases = 0: give at least 1"),
        ("attention.landmark_weight=0.5", "attention.landmark_weight = 0.5: give a number >= 1"),
        ("attention.landmark_weight=nan", "attention.landmark_weight = nan: give a number >= 1"),
        ("attention.ds_weight=-1", "attention.ds_weight = -1.0: give 0"),
        ("train.epochs=0", "train.epochs = 0: give at least 1"),
        ("train.rpp_epochs=-1", "train.rpp_epochs = -1: give 0"),
        ("train.rpp_classifier_epochs=-1", "train.rpp_classifier_epochs = -1: give 0"),
        # BatchNorm cannot normalise a batch of 1: refused here, not in the first step
        ("train.batch_size=1", "train.batch_size = 1: give at least 2 images (BatchNorm"),
        ("train.lr=0", "train.lr = 0.0: give a positive learning rate"),
        ("train.lr=inf", "train.lr = inf: give a positive learning rate"),
        ("train.trunk_lr_mult=-0.1", "train.trunk_lr_mult = -0.1: give 0"),
        ("train.momentum=-0.5", "train.momentum = -0.5: give a number in [0, 1)"),
        ("train.weight_decay=-1e-4", "train.weight_decay = -0.0001: give 0"),
        ("train.step_size=0", "train.step_size = 0: give at least 1"),
        ("train.gamma=0", "train.gamma = 0.0: give a positive factor"),
        ("train.grad_clip=-1", "train.grad_clip = -1.0: give 0 (off)"),
        ("train.eval_every=-1", "train.eval_every = -1: give 0 (never)"),
        ("eval.max_rank=0", "eval.max_rank = 0: give at least 1"),
        ("eval.batch_size=0", "eval.batch_size = 0: give at least 1"),
    ],
)
def test_out_of_range_value_is_refused_naming_the_key_and_the_range(override, fragment):
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), [override])
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "override",
    [
        "data.flip=0",
        "data.flip=1",
        "data.workers=0",
        "data.pad_crop=0",
        "model.dropout=0",
        "attention.ds_weight=0",
        "train.trunk_lr_mult=0",
        "train.momentum=0",
        "train.weight_decay=0",
        "train.step_size=1",
        "train.grad_clip=0",
        "train.eval_every=0",
        "eval.max_rank=1",
        "eval.batch_size=1",
        "attention.qk_ratio=1",
        "attention.landmark_weight=1",
        "attention.landmark_weight=2",
    ],
)
def test_range_boundaries_are_accepted(override):
    apply_overrides(RunConfig(), [override])


def test_a_bad_value_in_a_preset_file_is_refused_like_an_override(tmp_path: Path):
    path = tmp_path / "zero.toml"
    path.write_text("[train]\nstep_size = 0\n")
    with pytest.raises(ConfigError, match="train.step_size = 0: give at least 1"):
        load_preset(path)


PAPER_ROW = "rank1 = 94.0\nrank5 = 98.1\nrank10 = 98.8\nmAP = 83.8\n"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('paper = 3\nname = "x"\n', "paper must be [paper.DATASET] tables"),
        ("[paper]\nmarket1501 = 94.0\n", "[paper.market1501] must be a table of rank1, mAP"),
        ("[paper.market1501]\nrank1 = 94.0\n", "[paper.market1501] needs rank1, mAP"),
        ("[paper.market1501]\nrank1 = 94.0\n", "missing mAP"),
        (f"[paper.market1501]\n{PAPER_ROW}extra = 1\n", "unknown extra"),
        (f"[paper.market1501]\n{PAPER_ROW}source = 3\n", "source must be a string"),
        (
            "[paper.market1501]\n" + PAPER_ROW.replace("94.0", '"abc"'),
            "[paper.market1501] rank1 = 'abc' must be a number",
        ),
        (
            "[paper.market1501]\n" + PAPER_ROW.replace("94.0", "true"),
            "rank1 = True must be a number",
        ),
    ],
)
def test_malformed_paper_table_is_refused_naming_the_row(tmp_path: Path, text, fragment):
    path = tmp_path / "paper.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_preset(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_paper_row_without_rank5_rank10_keeps_them_unknown_and_names_its_source(tmp_path: Path):
    path = tmp_path / "bot.toml"
    path.write_text('[paper.market1501]\nrank1 = 94.1\nmAP = 85.7\nsource = "Luo et al."\n')
    row = load_preset(path).paper["market1501"]
    assert (row.rank1, row.rank5, row.rank10, row.mAP) == (94.1, None, None, 85.7)
    assert row.source == "Luo et al."
    # and through a checkpoint's plain data, where the unknown ranks are None
    assert config_from_dict(config_to_dict(load_preset(path))).paper["market1501"] == row


def test_paper_row_of_integers_loads_as_floats(tmp_path: Path):
    path = tmp_path / "paper.toml"
    path.write_text("[paper.market1501]\nrank1 = 94\nrank5 = 98\nrank10 = 99\nmAP = 84\n")
    row = load_preset(path).paper["market1501"]
    assert (row.rank1, row.mAP) == (94.0, 84.0) and isinstance(row.rank1, float)
