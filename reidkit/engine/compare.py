"""`reidkit compare`: finished runs side by side, to assemble the paper's Tables 1-4.

Each run folder (what `reidkit train --out` wrote) gives its preset, dataset, epochs, time,
images/s and peak memory from its checkpoint's history, and its CMC/mAP/mINP from an
evaluation on its own dataset. That evaluation is kept in the folder as `evaluation.json`
(in a folder marked as a run, `.reidkit-run`: reidkit writes into no other) and reused while
the checkpoint's epoch and the AP mode are the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from reidkit.config import PaperRow
from reidkit.engine.checkpoint import load_checkpoint
from reidkit.engine.evaluate import run_evaluation
from reidkit.engine.train import RUN_MARKER
from reidkit.errors import CheckpointError
from reidkit.outputs import (
    MARK,
    MARK_KEY,
    is_marked_folder,
    markdown_mark,
    output_file,
    png_mark,
    write_output_text,
    write_text,
)

EVALUATION_NAME = "evaluation.json"
METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")


@dataclass(frozen=True)
class RunSummary:
    """One finished (or stopped) run, as `compare` reports it; metrics in percent."""

    run: str  # the folder's name
    folder: Path
    preset: str
    dataset: str
    epoch: int  # completed epochs
    epochs: int  # planned epochs
    ap_mode: str
    rank1: float
    rank5: float
    rank10: float
    mAP: float  # noqa: N815 - the metric's name
    mINP: float  # noqa: N815
    paper: PaperRow | None
    train_seconds: float
    images_per_second: float
    peak_memory_mib: float | None


def run_checkpoint(folder: Path) -> Path:
    """RUN/last.pt, or one line saying that the folder is not a run."""
    folder = Path(folder)
    checkpoint = folder / "last.pt" if folder.is_dir() else folder
    if not checkpoint.is_file():
        raise CheckpointError(
            f"{folder} is not a run folder (no last.pt); give folders written by `reidkit train`"
        )
    return checkpoint


def summarise_run(
    folder: Path,
    *,
    ap_mode: str = "torchreid",
    evaluate: Callable[..., object] = run_evaluation,
    progress: bool = True,
) -> RunSummary:
    """The run's summary, evaluating its checkpoint unless `evaluation.json` is current."""
    checkpoint = run_checkpoint(folder)
    folder = checkpoint.parent
    state = load_checkpoint(checkpoint)
    saved = _read_evaluation(folder / EVALUATION_NAME)
    if saved is None or saved.get("epoch") != state.epoch or saved.get("ap_mode") != ap_mode:
        report = evaluate(checkpoint, ap_mode=ap_mode, progress=progress)
        saved = {**report.as_dict(), "epoch": state.epoch}
        if is_marked_folder(folder, RUN_MARKER):  # not into a folder reidkit did not make
            _write_json(folder / EVALUATION_NAME, saved)
    history = pd.DataFrame(state.history)
    seconds = float(history["seconds"].sum()) if "seconds" in history else 0.0
    images = (history["images_per_second"] * history["seconds"]).sum() if seconds else 0.0
    peak = history["peak_memory_mib"].max() if "peak_memory_mib" in history else None
    return RunSummary(
        run=folder.name,
        folder=folder,
        preset=state.config.name,
        dataset=str(saved["dataset"]),
        epoch=state.epoch,
        epochs=state.config.train.epochs,
        ap_mode=str(saved["ap_mode"]),
        **{key: float(saved[key]) for key in METRICS},
        paper=state.config.paper.get(str(saved["dataset"])),
        train_seconds=seconds,
        images_per_second=float(images / seconds) if seconds else 0.0,
        peak_memory_mib=None if peak is None or pd.isna(peak) else float(peak),
    )


def comparison_frame(summaries: Sequence[RunSummary]) -> pd.DataFrame:
    """One row per run: the metrics, the paper's R1 and mAP where known, the costs."""
    rows = []
    for s in summaries:
        row = {
            "run": s.run,
            "preset": s.preset,
            "dataset": s.dataset,
            **{key: round(getattr(s, key), 2) for key in METRICS},
            "AP mode": s.ap_mode,
            "paper R1": None if s.paper is None else s.paper.rank1,
            "paper mAP": None if s.paper is None else s.paper.mAP,
            "epochs": f"{s.epoch}/{s.epochs}",
            "train hours": round(s.train_seconds / 3600, 3),
            "images/s": round(s.images_per_second, 1),
            "peak MiB": None if s.peak_memory_mib is None else round(s.peak_memory_mib),
        }
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of the frame (empty cells where a value is unknown)."""

    def cell(value) -> str:
        return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines) + "\n"


def save_comparison_plot(summaries: Sequence[RunSummary], out: Path) -> Path:
    """Rank-1 and mAP per run as grouped bars, the paper's values as markers, one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(5.0, 1.1 * len(summaries) + 2), 3.8), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    xs = range(len(summaries))
    for offset, key, label in ((-0.2, "rank1", "rank-1"), (0.2, "mAP", "mAP")):
        bars = ax.bar([x + offset for x in xs], [getattr(s, key) for s in summaries], 0.38)
        bars.set_label(label)
        paper = [
            (x + offset, getattr(s.paper, "rank1" if key == "rank1" else "mAP"))
            for x, s in zip(xs, summaries, strict=True)
            if s.paper is not None
        ]
        if paper:
            ax.scatter(*zip(*paper, strict=True), marker="_", s=300, color="black", zorder=3)
    if any(s.paper is not None for s in summaries):
        ax.scatter([], [], marker="_", s=300, color="black", label="paper")
    ax.set_xticks(list(xs), [f"{s.run}\n{s.dataset}" for s in summaries], fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    modes = sorted({s.ap_mode for s in summaries})
    ax.set_title(f"runs compared (AP mode: {', '.join(modes)})", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    with output_file(out, "png") as temporary:
        figure.savefig(temporary, format="png", metadata=png_mark())
    return out


def save_comparison_tables(frame: pd.DataFrame, markdown: Path, table: Path) -> None:
    """OUT.md and OUT.csv, each with reidkit's mark (a closing comment, a `written_by`
    column), so a later `compare --out` may replace them and nothing else."""
    write_output_text(markdown, "markdown", to_markdown(frame) + markdown_mark())
    write_output_text(table, "csv", frame.assign(**{MARK_KEY: MARK}).to_csv(index=False))


def _read_evaluation(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or any(key not in data for key in (*METRICS, "dataset")):
        return None
    return data


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=_plain) + "\n")


def _plain(value):
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)
