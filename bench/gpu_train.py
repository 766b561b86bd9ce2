"""Train `pcb` and `pcb-csalr` from scratch on real images on a CUDA GPU; compare their cost.

For each preset: images/s (from metrics.csv, the last epoch), peak GPU memory
(torch.cuda.max_memory_allocated over the whole run) and the final training accuracy, in one
table. Needs a CUDA GPU and exits cleanly without one. Point --subset at the shared
cuhk03-subset or at the compact copy that bench/compact_subset.py writes.

    python bench/compact_subset.py --out bench/out/cuhk03-256x128
    python bench/gpu_train.py --subset bench/out/cuhk03-256x128 --epochs 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from reidkit.config import load_preset
from reidkit.data.prepare import prepare_dataset
from reidkit.engine.train import fit

DEFAULT_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cuhk03-subset"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", type=Path, default=DEFAULT_SUBSET)
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu-train"))
    parser.add_argument("--presets", default="pcb,pcb-csalr")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--height", type=int, default=256, help="256 or 384 (x128)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure (this script is for GPU machines)")
        return

    root = args.out / "data"
    prepare_dataset("custom", root, source=args.subset, name="cuhk03-subset", progress=False)
    # A 12x8 grid divides the 96x32 / 48x16 / 24x8 maps of 384x128; 8x8 those of 256x128.
    grid = "12,8" if args.height == 384 else "8,8"
    rows = []
    for preset in args.presets.split(","):
        config = load_preset(
            preset,
            [
                "data.dataset=cuhk03-subset",
                f"data.root={root.resolve()}",
                f"data.height={args.height}",
                "data.width=128",
                "data.workers=8",
                "model.pretrained=false",  # no ImageNet file on a machine without network
                f"attention.grid={grid}",
                f"train.epochs={args.epochs}",
                f"train.step_size={max(1, 2 * args.epochs // 3)}",
                *args.overrides,
            ],
        )
        torch.cuda.reset_peak_memory_stats()
        checkpoint = fit(config, args.out / preset, resume=(args.out / preset / "last.pt").exists())
        peak = torch.cuda.max_memory_allocated() / 2**30
        metrics = pd.read_csv(checkpoint.parent / "metrics.csv")
        last = metrics.iloc[-1]
        rows.append(
            {
                "preset": preset,
                "epochs": int(last["epoch"]),
                "images_per_second": float(last["images_per_second"]),
                "peak_gpu_gib": peak,
                "final_train_accuracy": float(last["train_accuracy"]),
                "final_loss": float(last["loss"]),
            }
        )
    table = pd.DataFrame(rows)
    base = table.iloc[0]
    table["img/s vs first"] = table["images_per_second"] / base["images_per_second"]
    table["memory vs first"] = table["peak_gpu_gib"] / base["peak_gpu_gib"]
    print(f"\n{torch.cuda.get_device_name()} at {args.height}x128, batch 64, AMP "
          f"{load_preset('pcb').train.amp}")  # fmt: skip
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.json:
        temporary = args.json.with_name(f".{args.json.name}.tmp")  # renamed: never half-written
        temporary.write_text(json.dumps(rows, indent=2) + "\n")
        temporary.replace(args.json)


if __name__ == "__main__":
    main()
