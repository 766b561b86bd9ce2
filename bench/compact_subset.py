"""Write a compact copy of a Market-layout dataset, every image re-encoded at the training size.

The shared cuhk03-subset is 124 MB of original JPEGs; resized to 256x128 it fits in far less,
which matters when the folder has to travel to a GPU machine. The layout and file names are
kept, so `reidkit prepare custom ROOT --source OUT` reads the copy as it reads the original.

    python bench/compact_subset.py --out bench/out/cuhk03-subset-256x128
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image
from rich.progress import track

SPLITS = ("bounding_box_train", "query", "bounding_box_test")
DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cuhk03-subset"


def compact(source: Path, out: Path, height: int, width: int, quality: int) -> int:
    """Re-encode every image of the three split folders; returns the bytes written."""
    missing = [s for s in SPLITS if not (source / s).is_dir()]
    if missing:
        raise SystemExit(f"{source} lacks {', '.join(missing)}; give a Market-layout folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    written = 0
    try:
        for split in SPLITS:
            (staging / split).mkdir()
            files = sorted((source / split).glob("*.jpg")) + sorted((source / split).glob("*.png"))
            for path in track(files, description=split):
                with Image.open(path) as image:
                    small = image.convert("RGB").resize((width, height), Image.BILINEAR)
                target = staging / split / (path.stem + ".jpg")
                small.save(target, "JPEG", quality=quality)
                written += target.stat().st_size
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--quality", type=int, default=75)  # 52 MiB at 256x128
    args = parser.parse_args()
    size = compact(args.source, args.out, args.height, args.width, args.quality)
    print(
        f"{args.out}: {size / 2**20:.1f} MiB at {args.height}x{args.width}, quality {args.quality}"
    )


if __name__ == "__main__":
    main()
