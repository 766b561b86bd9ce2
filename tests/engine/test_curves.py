"""curves.png, as a figure: what each panel draws and where its legend and labels sit."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from reidkit.engine.train import CONDITION_WARNING, curves_figure


def history(epochs: int, **columns) -> pd.DataFrame:
    base = {
        "epoch": list(range(1, epochs + 1)),
        "stage": ["pcb"] * epochs,
        "loss": np.linspace(6, 3, epochs),
        "loss_parts": np.linspace(5, 2.5, epochs),
        "loss_triplet": 0.0,
        "loss_ds": np.linspace(1, 0.5, epochs),
        "train_accuracy": np.linspace(0.1, 0.5, epochs),
    }
    return pd.DataFrame({**base, **columns})


def panel(figure, title: str):
    (ax,) = [ax for ax in figure.axes if ax.get_title() == title]
    return ax


def line_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_an_infinite_bound_is_drawn_at_a_ceiling_labelled_inf():
    bounds = {"cond_bound_stage3": [5.0, math.inf, 2e4], "cond_bound_stage1": [3.0, 3.0, 3.0]}
    figure = curves_figure(history(3, **bounds))
    figure.canvas.draw()
    ax = panel(figure, "CSALR landmark conditioning")
    (line,) = [line for line in ax.get_lines() if line.get_label() == "stage 3"]
    shown = np.asarray(line.get_ydata(), dtype=float)
    assert np.isfinite(shown).all()  # no gap where the matrix was singular
    ceiling = shown[1]
    assert ceiling > 10 * max(2e4, CONDITION_WARNING) and ceiling < ax.get_ylim()[1]
    labels = {round(math.log10(t)): lab.get_text() for t, lab in
              zip(ax.get_yticks(), ax.get_yticklabels(), strict=True) if t > 0}  # fmt: skip
    assert labels[round(math.log10(ceiling))] == "inf"
    assert labels[round(math.log10(ceiling)) - 1] != "inf"
    assert any(text.get_text() == "singular landmark matrix" for text in ax.texts)


def test_coinciding_bounds_stay_distinguishable():
    same = [3.0, 3.0, 3.0]
    figure = curves_figure(history(3, **{f"cond_bound_stage{s}": same for s in (1, 2, 3)}))
    ax = panel(figure, "CSALR landmark conditioning")
    lines = [line for line in ax.get_lines() if line.get_label().startswith("stage")]
    assert len(lines) == 3
    looks = {(line.get_marker(), line.get_linestyle(), line.get_markersize()) for line in lines}
    assert len(looks) == 3
    assert all(line.get_markerfacecolor() == "none" for line in lines)  # the ones below show


def test_epoch_ticks_are_whole_epochs():
    figure = curves_figure(history(3))
    figure.canvas.draw()
    for ax in figure.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_the_rpp_stages_are_marked_where_they_begin():
    stages = ["pcb", "pcb", "rpp-classifier", "rpp", "rpp"]
    figure = curves_figure(history(5, stage=stages))
    for ax in figure.axes:
        marks = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert marks == [2.5, 3.5]
        assert [text.get_text() for text in ax.texts] == [
            "pcb \u2192 rpp-classifier",
            "rpp-classifier \u2192 rpp",
        ]


def test_a_model_without_attention_draws_no_deep_supervision_line():
    with_attention = curves_figure(history(2))
    assert line_labels(panel(with_attention, "training loss")) == [
        "total",
        "identity (L_F / L_id)",
        "deep sup.",
    ]
    without = curves_figure(history(2, loss_ds=0.0))
    assert line_labels(panel(without, "training loss")) == ["total", "identity (L_F / L_id)"]


def test_legends_sit_below_the_axes_not_over_the_lines():
    bounds = {"cond_bound_stage1": [2.0, 5.0], "cond_bound_stage2": [3.0, 1e5]}
    figure = curves_figure(history(2, rank1=[np.nan, 0.5], mAP=[np.nan, 0.3], **bounds))
    figure.canvas.draw()
    legends = [(ax, ax.get_legend()) for ax in figure.axes if ax.get_legend() is not None]
    assert len(legends) == 3  # loss terms, rank-1 / mAP, the bounds
    for ax, legend in legends:
        # below the frame, and below the "epoch" under it
        assert legend.get_window_extent().y1 <= ax.xaxis.label.get_window_extent().y0
