"""Train one recipe from scratch on real pedestrians (the shared cuhk03-subset) in a time budget.

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

DEFAULT_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cuhk03-subset"
DEFAULT_OUT = Path("bench/out/real-data")
RECIPES = ("pcb", "pcb-csalr", "bot", "bot-csalr")

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
    png.parent.mkdir(parents=True, exist_ok=True)
    temporary = png.with_name(f".{png.stem}.tmp-{os.getpid()}.png")
    fig.savefig(temporary, dpi=110)
    plt.close(fig)
    os.replace(temporary, png)
    return png


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", choices=RECIPES, help="what to train (omit to only --plot)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    parser.add_argument(
        "--eval-minutes", type=float, default=5.0, help="evaluate after every N training minutes"
    )
    parser.add_argument("--subset", type=Path, default=DEFAULT_SUBSET)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--results", type=Path, default=None, help="CSV of all runs (default OUT/results.csv)"
    )
    parser.add_argument("--plot", type=Path, default=None, help="draw rank-1 vs minutes here")
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
        default="wall",
        help="budget in wall-clock minutes, or in CPU minutes of this process (loading in the "
        "main process, one thread: fair between runs on a busy machine)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    if args.recipe is None and args.plot is None:
        parser.error("give --recipe to train, --plot to draw, or both")
    if args.minutes <= 0 or args.eval_minutes <= 0:
        parser.error("--minutes and --eval-minutes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = args.results or args.out / "results.csv"
    if args.recipe:
        if not args.subset.is_dir():
            raise SystemExit(f"no cuhk03-subset at {args.subset}; pass --subset")
        root = (args.out / "data").resolve()
        name = "cuhk03-subset"
        prepared = prepare_dataset("custom", root, source=args.subset, name=name, progress=False)
        if args.train_ids:
            name = f"cuhk03-subset-{args.train_ids}ids"
            source = write_identity_slice(prepared.manifest, args.train_ids, root / f"{name}.csv")
            prepared = prepare_dataset("custom", root, source=source, name=name, progress=False)
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
        counts = ", ".join(f"{s.split} {s.images}" for s in prepared.splits)
        print(f"subset: {prepared.manifest} ({counts})")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
