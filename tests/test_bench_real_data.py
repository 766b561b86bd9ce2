"""bench/real_data.py's own logic: the schedule compressed into the budget, the results table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from reidkit.config import load_preset

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "real_data.py"


@pytest.fixture(scope="module")
def real_data():
    spec = importlib.util.spec_from_file_location("real_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_recipe_keeps_its_schedule_compressed_into_the_budget(real_data):
    bot = load_preset("bot", real_data.recipe_overrides("bot"))
    # 120 epochs: warm-up over the first 10/120 of the budget, steps at 40/120 and 70/120
    assert real_data.compressed_rate(bot, 0.0) == pytest.approx(3.5e-4 * 0.01)
    assert real_data.compressed_rate(bot, 5 / 120) == pytest.approx(3.5e-4 * (0.01 + 0.99 / 2))
    assert real_data.compressed_rate(bot, 10 / 120) == pytest.approx(3.5e-4)
    assert real_data.compressed_rate(bot, 40 / 120) == pytest.approx(3.5e-5)
    assert real_data.compressed_rate(bot, 0.99) == pytest.approx(3.5e-6)
    pcb = load_preset("pcb", real_data.recipe_overrides("pcb"))
    assert real_data.compressed_rate(pcb, 0.39) == pytest.approx(0.1)  # x0.1 at 40 of 100
    assert real_data.compressed_rate(pcb, 0.4) == pytest.approx(0.01)


def test_the_four_recipes_share_model_input_and_batch(real_data):
    configs = [load_preset(r, real_data.recipe_overrides(r)) for r in real_data.RECIPES]
    shared = {(c.model.arch, c.data.height, c.data.width, c.train.batch_size) for c in configs}
    assert shared == {("resnet18", 96, 32, 64)}  # the paper's 384x128 at a quarter of its side
    assert all(not c.model.pretrained for c in configs)
    kinds = [(c.model.head, c.attention.kind, c.train.optimizer) for c in configs]
    assert kinds == [
        ("pcb", "none", "sgd"),
        ("pcb", "csalr", "sgd"),
        ("global", "none", "adam"),
        ("global", "csalr", "adam"),
    ]


@pytest.mark.parametrize("recipe", ["pcb-csalr", "bot-csalr"])
def test_csalr_pools_the_papers_patches_and_pcb_gets_a_row_per_stripe(real_data, recipe):
    """At 96x32 the 3x2 grid pools 8x4, 4x2 and 2x1 patches from the maps the modules see,
    the patches of the paper's 12x8 grid at 384x128, and the final map has 6 rows."""
    import torch

    from reidkit.models.attention import CSALR
    from reidkit.models.net import build_model

    config = load_preset(recipe, real_data.recipe_overrides(recipe))
    model = build_model(config, num_ids=10).eval()
    seen: list[tuple[int, int]] = []
    for module in model.modules():
        if isinstance(module, CSALR):
            grid = module.grid
            module.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[-2:]))
    images = torch.zeros(1, 3, config.data.height, config.data.width)
    with torch.no_grad():
        final, _aux = model.forward_features(images)
    patches = [(h // grid[0], w // grid[1]) for h, w in seen]
    assert patches == [(8, 4), (4, 2), (2, 1)]
    assert all(h % grid[0] == 0 and w % grid[1] == 0 for h, w in seen)
    assert final.shape[-2] == 6 == load_preset("pcb", real_data.recipe_overrides("pcb")).model.parts


def row(recipe, seed, minutes, rank1):
    base = dict.fromkeys(("steps", "epochs", "images", "lr", "loss", "loss_parts"), 0)
    base |= dict.fromkeys(("loss_triplet", "loss_ds", "train_accuracy", "mAP"), 0)
    return (
        base
        | {"recipe": recipe, "seed": seed, "minutes": minutes, "rank1": rank1}
        | {"status": "ok"}
    )


def test_a_run_replaces_only_its_own_rows(real_data, tmp_path: Path):
    results = tmp_path / "results.csv"
    real_data.merge_results(results, [row("pcb", 0, 5, 1.0), row("pcb", 0, 10, 2.0)])
    real_data.merge_results(results, [row("bot", 0, 5, 3.0)])
    real_data.merge_results(results, [row("pcb", 0, 5, 4.0)])  # pcb seed 0 again
    frame = pd.read_csv(results)
    assert list(zip(frame["recipe"], frame["rank1"], strict=True)) == [("bot", 3.0), ("pcb", 4.0)]
    png = real_data.plot_results(results, tmp_path / "rank1.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_a_csv_it_did_not_write_is_refused_and_left_alone(real_data, tmp_path: Path):
    other = tmp_path / "mine.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="not a results table of bench/real_data.py"):
        real_data.merge_results(other, [row("pcb", 0, 5, 1.0)])
    assert other.read_text() == "a,b\n1,2\n"
