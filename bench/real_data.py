"""Train and evaluate on real pedestrian images (the shared cuhk03-subset) within a time budget.

Prepares the subset as a `custom` dataset, trains smoke-like settings (ResNet-18 + CSALR from
scratch) one epoch at a time until the next epoch would overrun `--minutes`, then runs
`reidkit evaluate` on its query / gallery split. Prints the loss curve, the final training
accuracy, rank-1 and mAP, and the commands that reproduce them.

    python bench/real_data.py --minutes 10                     # CPU, the issue's budget
    python bench/real_data.py --minutes 10 --train-ids 150     # more epochs in that budget
    python bench/real_data.py --minutes 8 --set data.height=256 --set data.width=128 \
        --set model.arch=resnet50 --set attention.grid=8,4     # a GPU machine
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from reidkit.config import load_preset
from reidkit.data.prepare import prepare_dataset
from reidkit.engine.checkpoint import load_checkpoint
from reidkit.engine.train import fit

DEFAULT_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cuhk03-subset"

# Smoke-like: ResNet-18 + CSALR from scratch. 128x64 keeps a CPU epoch of 7,239 images near
# three minutes; the 8x4 final map still gives PCB six (adaptive) stripes, and a 4x4 grid
# divides the 32x16, 16x8 and 8x4 stage maps. Identity batches (P x K) give every identity
# several images per batch, which a 743-way classifier trained for minutes needs.
SETTINGS = (
    "data.height=128",
    "data.width=64",
    "data.sampler=identity",
    "data.instances=4",
    "attention.grid=4,4",
    "train.batch_size=32",
    "train.lr=0.05",
    "train.epochs=12",
    "train.step_size=8",
)


def write_identity_slice(manifest: Path, train_ids: int, csv: Path) -> Path:
    """A custom-dataset CSV: the first `train_ids` training identities, all query and gallery."""
    frame = pd.read_csv(manifest)
    paths = frame["path"].map(lambda p: str((manifest.parent / p).resolve()))
    frame = frame.assign(path=paths)
    keep = sorted(frame.loc[frame["split"] == "train", "pid"].unique())[:train_ids]
    sliced = frame[(frame["split"] != "train") | frame["pid"].isin(keep)]
    temporary = csv.with_name(f".{csv.name}.tmp")  # renamed: never half-written
    sliced[["path", "pid", "camid", "split"]].to_csv(temporary, index=False)
    temporary.replace(csv)
    return csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", type=Path, default=DEFAULT_SUBSET)
    parser.add_argument("--out", type=Path, default=Path("bench/out/real-data"))
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    parser.add_argument(
        "--train-ids",
        type=int,
        default=0,
        help="train on the first N training identities only (query and gallery unchanged), so "
        "a short budget covers more epochs; 0: all 743",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    root = args.out / "data"
    name = "cuhk03-subset"
    prepared = prepare_dataset("custom", root, source=args.subset, name=name)
    if args.train_ids:
        name = f"cuhk03-subset-{args.train_ids}ids"
        source = write_identity_slice(prepared.manifest, args.train_ids, root / f"{name}.csv")
        prepared = prepare_dataset("custom", root, source=source, name=name)
    overrides = [
        *SETTINGS,
        f"data.dataset={name}",
        f"data.root={root.resolve()}",
        *args.overrides,
    ]
    config = load_preset("smoke", overrides)
    run = args.out / "run"
    budget = args.minutes * 60
    start = time.perf_counter()
    epoch_seconds = 0.0
    done = load_checkpoint(run / "last.pt").epoch if (run / "last.pt").exists() else 0
    while done < config.train.epochs:
        elapsed = time.perf_counter() - start
        if done and elapsed + epoch_seconds > budget:
            break
        began = time.perf_counter()
        checkpoint = fit(config, run, resume=done > 0, stop_after=1)
        epoch_seconds = time.perf_counter() - began
        done += 1
    trained_minutes = (time.perf_counter() - start) / 60

    evaluate = [
        sys.executable, "-m", "reidkit", "evaluate", str(checkpoint),
        "--data-root", str(root), "--json", str(args.out / "evaluation.json"),
    ]  # fmt: skip
    subprocess.run(evaluate, check=True)
    evaluation = json.loads((args.out / "evaluation.json").read_text())
    metrics = pd.read_csv(run / "metrics.csv")

    counts = ", ".join(f"{s.split} {s.images}" for s in prepared.splits)
    print(f"\nsubset: {prepared.manifest} ({counts})")
    print(f"trained {len(metrics)} epochs in {trained_minutes:.1f} min; loss per epoch:")
    print(metrics[["epoch", "loss", "loss_parts", "loss_ds", "train_accuracy", "images_per_second"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3f}"))  # fmt: skip
    print(
        f"\nfinal training accuracy {100 * metrics['train_accuracy'].iloc[-1]:.1f}%; "
        f"rank-1 {evaluation['rank1']:.1f}%, mAP {evaluation['mAP']:.1f}% "
        f"({evaluation['valid_queries']} queries, AP mode {evaluation['ap_mode']})"
    )
    sets = " ".join(f"--set {o}" for o in overrides if not o.startswith("data.root"))
    print("\nreproduce:")
    print(f"  reidkit prepare custom {root} --source {args.subset} --name cuhk03-subset")
    if args.train_ids:
        print(f"  reidkit prepare custom {root} --source {root / (name + '.csv')} --name {name}")
    print(f"  reidkit train --preset smoke --data-root {root} --out {run} {sets}")
    print(f"  reidkit evaluate {checkpoint} --data-root {root}")
    if args.json:
        rows = {"training": metrics.to_dict("records"), "evaluation": evaluation,
                "minutes": trained_minutes, "overrides": overrides}  # fmt: skip
        temporary = args.json.with_name(f".{args.json.name}.tmp")  # renamed: never half-written
        temporary.write_text(json.dumps(rows, indent=2) + "\n")
        temporary.replace(args.json)


if __name__ == "__main__":
    main()
