"""`reidkit compare`: finished runs side by side, to assemble the paper's Tables 1-4.

Each run folder (what `reidkit train --out` wrote) gives its preset, dataset, epochs, time,
images/s and peak memory from its checkpoint's history, and its CMC/mAP/mINP from an
evaluation on its own dataset. That evaluation is kept in the folder as `evaluation.json`
(in a folder marked as a run, `.reidkit-run`: reidkit writes into no other) and reused while
the checkpoint's epoch, the AP mode and the dataset's manifest (its digest) are the same. The
published row is decided afresh each time (`paper_reference`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from reidkit.config import SECTIONS, PaperRow, RunConfig, checkpoint_data_root, setting_text
from reidkit.engine.checkpoint import load_checkpoint
from reidkit.engine.evaluate import (
    evaluated_manifest,
    manifest_sha256,
    paper_reference,
    run_evaluation,
)
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
# Keys that say where a run read its data or how fast it loaded, not what it trained: never
# listed as a difference between runs (the dataset has a column of its own).
NOT_A_SETTING = {"data.root", "data.dataset", "data.workers", "eval.batch_size"}
# What `evaluation.json` must match to be reused: the checkpoint's epoch, the AP mode and the
# dataset's manifest digest.
CACHE_KEYS = ("epoch", "ap_mode", "manifest_sha256")


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
    paper: PaperRow | None  # shown only when the run compares with it (`paper_reference`)
    train_seconds: float
    images_per_second: float
    peak_memory_mib: float | None
    paper_note: str | None = None  # why no published row is shown
    settings: tuple[tuple[str, str], ...] = ()  # (section.key, value as --set writes it)


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
    # a re-prepared dataset (other images, splits or counts) has another manifest digest
    digest = manifest_sha256(evaluated_manifest(state.config))
    current = (state.epoch, ap_mode, digest)
    kept = None if saved is None else tuple(saved.get(k) for k in CACHE_KEYS)
    if kept != current:
        report = evaluate(checkpoint, ap_mode=ap_mode, progress=progress)
        saved = {**report.as_dict(), "epoch": state.epoch}
        if is_marked_folder(folder, RUN_MARKER):  # not into a folder reidkit did not make
            _write_json(folder / EVALUATION_NAME, saved)
    dataset = str(saved["dataset"])
    root = checkpoint_data_root(None, state.config.data.root)
    reference = paper_reference(
        state.config, root / dataset, epoch=state.epoch, rerank=bool(saved.get("rerank"))
    )
    history = pd.DataFrame(state.history)
    seconds = float(history["seconds"].sum()) if "seconds" in history else 0.0
    images = (history["images_per_second"] * history["seconds"]).sum() if seconds else 0.0
    peak = history["peak_memory_mib"].max() if "peak_memory_mib" in history else None
    return RunSummary(
        run=folder.name,
        folder=folder,
        preset=state.config.name,
        dataset=dataset,
        epoch=state.epoch,
        epochs=state.config.train.epochs,
        ap_mode=str(saved["ap_mode"]),
        **{key: float(saved[key]) for key in METRICS},
        paper=reference.row,
        paper_note=reference.note,
        train_seconds=seconds,
        images_per_second=float(images / seconds) if seconds else 0.0,
        peak_memory_mib=None if peak is None or pd.isna(peak) else float(peak),
        settings=run_settings(state.config),
    )


def run_settings(config: RunConfig) -> tuple[tuple[str, str], ...]:
    """Every setting of a run as (section.key, value written as `--set` takes it)."""
    return tuple(
        (f"{section}.{key}", setting_text(value))
        for section in SECTIONS
        for key, value in vars(getattr(config, section)).items()
        if f"{section}.{key}" not in NOT_A_SETTING
    )


def differing_settings(summaries: Sequence[RunSummary]) -> list[str]:
    """Per run, the settings in which it differs from another run of the same preset, as
    `key=value; ...` (empty where it has none): what tells `smoke` from `smoke`."""
    by_preset: dict[str, list[dict[str, str]]] = {}
    for s in summaries:
        by_preset.setdefault(s.preset, []).append(dict(s.settings))
    cells = []
    for s in summaries:
        group = by_preset[s.preset]
        mine = dict(s.settings)
        keys = [key for key in mine if any(other.get(key) != mine[key] for other in group)]
        cells.append("; ".join(f"{key}={mine[key]}" for key in keys))
    return cells


def comparison_frame(summaries: Sequence[RunSummary]) -> pd.DataFrame:
    """One row per run: the metrics, the paper's R1 and mAP where known, the costs."""
    rows = []
    for s, settings in zip(summaries, differing_settings(summaries), strict=True):
        row = {
            "run": s.run,
            "preset": s.preset,
            "settings": settings,
            "dataset": s.dataset,
            **{key: round(getattr(s, key), 2) for key in METRICS},
            "AP mode": s.ap_mode,
            "paper R1": None if s.paper is None else s.paper.rank1,
            "paper mAP": None if s.paper is None else s.paper.mAP,
            "epochs": f"{s.epoch}/{s.epochs}",
            "train min": round(s.train_seconds / 60, 1),
            "images/s": round(s.images_per_second, 1),
            "peak MiB": None if s.peak_memory_mib is None else round(s.peak_memory_mib),
        }
        rows.append(row)
    return pd.DataFrame(rows)


def reference_notes(summaries: Sequence[RunSummary]) -> list[str]:
    """One line per run shown without a published row, saying why."""
    return [f"{s.run}: no reference row: {s.paper_note}" for s in summaries if s.paper is None]


def to_markdown(frame: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """A GitHub Markdown table of the frame (empty cells where a value is unknown), then
    `notes` as a list below it."""

    def cell(value) -> str:
        return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def save_comparison_plot(summaries: Sequence[RunSummary], out: Path) -> Path:
    """Rank-1 and mAP per run as grouped bars, each with its value written above it (a bar at 0
    is a score of 0, not a missing run), the published values as black marks, one PNG."""
    figure = comparison_figure(summaries)
    with output_file(out, "png") as temporary:
        figure.savefig(temporary, format="png", metadata=png_mark())
    return out


def comparison_figure(summaries: Sequence[RunSummary]):
    """The figure `save_comparison_plot` writes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(
        figsize=(max(5.0, 1.1 * len(summaries) + 2), 4.0), dpi=110, layout="constrained"
    )
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    xs = range(len(summaries))
    for offset, key, label in ((-0.2, "rank1", "rank-1"), (0.2, "mAP", "mAP")):
        bars = ax.bar([x + offset for x in xs], [getattr(s, key) for s in summaries], 0.38)
        bars.set_label(label)
        for x, s in zip(xs, summaries, strict=True):
            value = getattr(s, key)
            published = None if s.paper is None else getattr(s.paper, key)
            centre = x + offset
            if published is not None:
                mark = ([centre - 0.17, centre + 0.17], [published] * 2)
                ax.plot(*mark, color="black", linewidth=2, zorder=3)
            # above the bar and above its published mark, so that neither hides the number
            top = max(value, published or 0.0)
            ax.annotate(
                f"{value:.1f}",
                (centre, top),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    if any(s.paper is not None for s in summaries):
        ax.plot([], [], color="black", linewidth=2, label="published")
    ax.set_xticks(list(xs), [f"{s.run}\n{s.dataset}" for s in summaries], fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 108)  # room for the values above bars near 100
    modes = sorted({s.ap_mode for s in summaries})
    ax.set_title(f"runs compared (AP mode: {', '.join(modes)})", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    figure.legend(loc="outside lower center", ncol=3, fontsize=7, frameon=False)
    return figure


def save_comparison_tables(
    frame: pd.DataFrame, markdown: Path, table: Path, notes: Sequence[str] = ()
) -> None:
    """OUT.md (with `notes` below the table) and OUT.csv, each with reidkit's mark (a closing
    comment, a `written_by` column), so a later `compare --out` may replace them and nothing
    else."""
    write_output_text(markdown, "markdown", to_markdown(frame, notes) + markdown_mark())
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
