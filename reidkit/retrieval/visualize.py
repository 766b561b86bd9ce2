"""Figures for retrieval: ranked-results montages (PIL) and CMC curves (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from reidkit.errors import DatasetError
from reidkit.outputs import output_file, png_mark

MATCH_COLOUR = (0, 170, 0)  # same pid as the query
MISMATCH_COLOUR = (220, 0, 0)  # another pid
UNKNOWN_COLOUR = (150, 150, 150)  # pid not given
QUERY_COLOUR = (30, 30, 30)
BACKGROUND = (255, 255, 255)
BORDER = 4  # pixels of colour around each image
GAP = 4  # pixels between tiles
QUERY_GAP = 16  # wider gap, with a rule, between the query and its ranked list
TEXT_HEIGHT = 26  # two lines of PIL's default font under each image


@dataclass(frozen=True)
class MontageRow:
    """One query and its ranked gallery images (pids and scores optional)."""

    query_path: str | Path
    ranked_paths: Sequence[str | Path]
    query_pid: int | None = None
    ranked_pids: Sequence[int] | None = None
    scores: Sequence[float] | None = None


def _write_png(out_path: str | Path, save: Callable[[Path, dict[str, str]], None]) -> Path:
    """`save(temporary, text)` writes the PNG with `text` as its text chunks (reidkit's mark);
    it is renamed onto `out_path`, which may be new or a PNG reidkit wrote (reidkit.outputs)."""
    with output_file(out_path, "png") as temporary:
        save(temporary, png_mark())
    return Path(out_path)


def _save_pil_png(image: Image.Image, path: Path, text: dict[str, str]) -> None:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    image.save(path, format="PNG", pnginfo=info)


def _load_tile(path: str | Path, size: tuple[int, int]) -> Image.Image:
    height, width = size
    try:
        with Image.open(path) as image:
            return image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    except Exception as err:  # PIL reports bad data with many types, e.g. DecompressionBombError
        raise DatasetError(f"cannot open image {path} for the montage ({err})") from None


def _border_colour(query_pid: int | None, pid: int | None) -> tuple[int, int, int]:
    if query_pid is None or pid is None:
        return UNKNOWN_COLOUR
    return MATCH_COLOUR if int(pid) == int(query_pid) else MISMATCH_COLOUR


def tile_origin(row: int, column: int, size: tuple[int, int] = (128, 64)) -> tuple[int, int]:
    """Top-left pixel (x, y) of a tile's coloured border; column 0 is the query."""
    height, width = size
    tile_w, tile_h = width + 2 * BORDER, height + 2 * BORDER + TEXT_HEIGHT
    x = GAP if column == 0 else GAP + tile_w + QUERY_GAP + (column - 1) * (tile_w + GAP)
    return x, GAP + row * (tile_h + GAP)


def render_ranked_montage(
    rows: Sequence[MontageRow], size: tuple[int, int] = (128, 64)
) -> Image.Image:
    """The montage as a PIL image: one row per query, query first, then its ranked list.

    Each gallery image has a border: green when its pid is the query's, red when not, grey
    when either pid is unknown; rank and score (and pid) are written beneath it. `size` is
    (height, width) of each image, the re-ID convention (128 x 64 by default).
    """
    if not rows:
        raise ValueError("a montage needs at least one query row")
    height, width = size
    tile_w, tile_h = width + 2 * BORDER, height + 2 * BORDER + TEXT_HEIGHT
    longest = max(len(r.ranked_paths) for r in rows)
    canvas_w = tile_origin(0, longest, size)[0] + tile_w + GAP if longest else 2 * GAP + tile_w
    canvas_h = GAP + len(rows) * (tile_h + GAP)
    canvas = Image.new("RGB", (canvas_w, canvas_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def put(image: Image.Image, x: int, y: int, colour: tuple[int, int, int], lines: list[str]):
        draw.rectangle([x, y, x + tile_w - 1, y + height + 2 * BORDER - 1], fill=colour)
        canvas.paste(image, (x + BORDER, y + BORDER))
        for i, line in enumerate(lines):
            draw.text(
                (x + 1, y + height + 2 * BORDER + 1 + 12 * i), line, fill=(0, 0, 0), font=font
            )

    for r, row in enumerate(rows):
        n = len(row.ranked_paths)
        for name, values in (("ranked_pids", row.ranked_pids), ("scores", row.scores)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} ranked images")
        x, y = tile_origin(r, 0, size)
        query_label = "query" if row.query_pid is None else f"query {row.query_pid}"
        put(_load_tile(row.query_path, size), x, y, QUERY_COLOUR, [query_label])
        rule_x = x + tile_w + QUERY_GAP // 2
        draw.line([rule_x, y, rule_x, y + tile_h], fill=(0, 0, 0), width=2)
        for k, path in enumerate(row.ranked_paths):
            pid = None if row.ranked_pids is None else row.ranked_pids[k]
            lines = [f"#{k + 1}" + ("" if row.scores is None else f"  {float(row.scores[k]):.3f}")]
            if pid is not None:
                lines.append(f"pid {pid}")
            x, y = tile_origin(r, k + 1, size)
            put(_load_tile(path, size), x, y, _border_colour(row.query_pid, pid), lines)
    return canvas


def save_ranked_montage_grid(
    rows: Sequence[MontageRow], out_path: str | Path, *, size: tuple[int, int] = (128, 64)
) -> Path:
    """Write a PNG montage with one row per query (see `render_ranked_montage`), atomically."""
    image = render_ranked_montage(rows, size)
    return _write_png(out_path, lambda temporary, text: _save_pil_png(image, temporary, text))


def save_ranked_montage(
    query_path: str | Path,
    ranked_paths: Sequence[str | Path],
    out_path: str | Path,
    *,
    query_pid: int | None = None,
    ranked_pids: Sequence[int] | None = None,
    scores: Sequence[float] | None = None,
    size: tuple[int, int] = (128, 64),
) -> Path:
    """Write a one-query PNG montage: the query, a rule, then its top-k with coloured borders."""
    row = MontageRow(query_path, ranked_paths, query_pid, ranked_pids, scores)
    return save_ranked_montage_grid([row], out_path, size=size)


def save_cmc_curve(
    cmc: Sequence[float] | np.ndarray,
    out_path: str | Path,
    label: str,
    *,
    title: str = "CMC",
) -> Path:
    """Write a CMC curve (rank 1..len(cmc) against matching rate in %) as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cmc = np.asarray(cmc, dtype=np.float64)
    if cmc.ndim != 1 or len(cmc) == 0:
        raise ValueError(f"cmc must be a non-empty 1-D array, got shape {cmc.shape}")
    # A Figure with its own Agg canvas: no pyplot state, no display backend.
    figure = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ranks = np.arange(1, len(cmc) + 1)
    axes.plot(ranks, 100 * cmc, marker="o" if len(cmc) <= 20 else None, markersize=3, label=label)
    axes.set_xlabel("rank")
    axes.set_ylabel("matching rate (%)")
    axes.set_title(f"{title}: rank-1 {100 * cmc[0]:.1f}%")
    axes.set_xlim(1, max(2, len(cmc)))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return _write_png(
        out_path, lambda temporary, text: figure.savefig(temporary, format="png", metadata=text)
    )


POINT_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#a65628")


def save_attention_figure(
    image: np.ndarray,
    points: Sequence[tuple[int, int]],
    maps: dict[str, np.ndarray],
    out_path: str | Path,
    *,
    errors: Sequence[float] | None = None,
    title: str = "",
) -> Path:
    """Write `attention_figure` as a PNG, atomically."""
    figure = attention_figure(image, points, maps, errors=errors, title=title)
    return _write_png(
        out_path, lambda temporary, text: figure.savefig(temporary, format="png", metadata=text)
    )


def attention_figure(
    image: np.ndarray,
    points: Sequence[tuple[int, int]],
    maps: dict[str, np.ndarray],
    *,
    errors: Sequence[float] | None = None,
    title: str = "",
):
    """The paper's Figure 4: the image with numbered points, then for each point
    each map (label -> (points, h, w), rows summing to 1) overlaid on the image.

    The maps of one point share one colour scale, from 0 to their peak weight (written under
    the first of them), so that they compare; one colour bar reads it as a fraction of the
    peak. `points` are (row, column) cells of the h x w maps; `errors`, one per point, are
    written under the last map of each point (CSALR: the reconstruction's distance to the
    full map).
    """
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    height, width = image.shape[:2]
    labels = list(maps)
    h, w = maps[labels[0]].shape[1:]
    panels = 1 + len(points) * len(labels)
    panel = 1.5  # inches per panel: two lines of 8-point title fit above it
    figure = Figure(
        figsize=(panel * panels + 0.9, panel * height / width + 1.4),
        dpi=110,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    centre = [((r + 0.5) * height / h, (c + 0.5) * width / w) for r, c in points]

    def show(ax, overlay: np.ndarray | None):
        ax.imshow(image)
        shown = None
        if overlay is not None:
            big = np.asarray(
                Image.fromarray(overlay.astype(np.float32)).resize(
                    (width, height), Image.Resampling.BILINEAR
                )
            )
            shown = ax.imshow(big, cmap="jet", alpha=0.55, vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        return shown

    show(axes[0], None)
    axes[0].set_title("input", fontsize=9)
    scale = None
    for i, (y, x) in enumerate(centre):
        colour = POINT_COLOURS[i % len(POINT_COLOURS)]
        axes[0].scatter([x], [y], s=50, color=colour, edgecolors="white", linewidths=1)
        # white with a dark outline: readable on light and dark images alike
        axes[0].annotate(
            str(i + 1),
            (x, y),
            xytext=(5, -4),
            textcoords="offset points",
            color="white",
            fontsize=9,
            weight="bold",
            path_effects=outline,
        )
        peak = max(float(maps[label][i].max()) for label in labels) or 1.0  # one scale per point
        for j, label in enumerate(labels):
            ax = axes[1 + i * len(labels) + j]
            scale = show(ax, maps[label][i] / peak)
            ax.scatter([x], [y], s=40, color=colour, edgecolors="white", linewidths=1)
            ax.set_title(f"{i + 1}: {_wrapped(label)}", fontsize=8, color=colour)
            notes = [f"peak {peak:.3g}"] if j == 0 else []
            if errors is not None and j == len(labels) - 1:
                notes.append(f"TV to full {errors[i]:.2g}")
            ax.set_xlabel("\n".join(notes), fontsize=8)
    if scale is not None:
        bar = figure.colorbar(scale, ax=list(axes), shrink=0.8, aspect=30, pad=0.01)
        bar.set_label("weight / the point's peak", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def _wrapped(label: str, width: int = 14) -> str:
    """A map's label on lines of about `width` characters, split at spaces."""
    lines: list[str] = []
    for word in label.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return "\n".join(lines)
