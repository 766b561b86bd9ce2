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


# ---- fine-tune mode (MobileNetV2 from ImageNet weights) -------------------------------------


def test_finetune_recipes_are_the_presets_and_sa_csa_change_only_the_module(real_data, tmp_path):
    from reidkit.config import config_to_dict

    weights = tmp_path / "w.pt"
    configs = {
        recipe: real_data.finetune_config(
            recipe, root=tmp_path, dataset="cuhk03-subset", seed=3, weights=weights
        )
        for recipe in real_data.FINETUNE_RECIPES
    }
    for config in configs.values():
        assert config.model.arch == "mobilenet_v2" and config.model.pretrained
        assert config.model.weights == str(weights) and config.train.seed == 3
        assert config.train.eval_every == 1 and config.data.root == str(tmp_path)
        assert config.train.epochs == 10  # a recipe and its twin: the same epochs
    plain = config_to_dict(configs["mobilenet-pcb"])
    for recipe, kind, groups in (("mobilenet-pcb-sa", "sa", 1), ("mobilenet-pcb-csa", "csa", 2)):
        attention = configs[recipe].attention
        assert (attention.kind, attention.groups, attention.stages) == (kind, groups, (1, 2, 3))
        assert attention.qk_ratio == 1.0 and attention.deep_supervision
        ours = config_to_dict(configs[recipe])
        assert {k: v for k, v in ours.items() if k != "attention"} == {
            k: v for k, v in plain.items() if k != "attention"
        }
    assert configs["mobilenet-pcb-csa"].attention.bases == 32
    random = real_data.finetune_config(
        "mobilenet-bot", root=tmp_path, dataset="d", seed=0, weights=weights, random_start=True
    )
    assert not random.model.pretrained and random.model.weights == ""
    assert real_data.run_label("mobilenet-bot", True) == "mobilenet-bot-random"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--recipe", "mobilenet-pcb", "--minutes", "20"], "--minutes: a fine-tune trains"),
        (["--recipe", "mobilenet-bot", "--clock", "cpu"], "--clock: a fine-tune trains"),
        (["--recipe", "pcb", "--random-start"], "--random-start: for the fine-tune recipes"),
        (["--recipe", "bot", "--weights", "w.pt"], "--weights: for the fine-tune recipes"),
        (["--recipe", "mobilenet-pcb-vit"], "invalid choice: 'mobilenet-pcb-vit'"),
        ([], "give --recipe to train"),
    ],
)
def test_finetune_arguments_that_do_not_apply_are_refused(real_data, capsys, argv, fragment):
    with pytest.raises(SystemExit) as info:
        real_data.parse_args(argv)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def fake_metrics(epochs: int, attention: bool) -> pd.DataFrame:
    rows = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch, "stage": "pcb", "loss": 5.0 / epoch, "loss_parts": 4.0 / epoch}
        row |= {"loss_triplet": 0.0, "loss_ds": 1.0 / epoch, "lr": 0.1, "train_accuracy": 0.1}
        row |= {"images_per_second": 40.0 + epoch, "seconds": 120.0, "cpu_seconds": 230.0}
        row |= {"peak_memory_mib": 900.0, "rank1": 0.1 * epoch, "mAP": 0.05 * epoch}
        row |= {"mINP": 0.01 * epoch}
        if attention:
            row |= {f"alpha_stage{s}": 0.01 * s * epoch for s in (1, 2, 3)}
        rows.append(row)
    return pd.DataFrame(rows)


def test_a_finetune_run_resumes_and_writes_one_csv_of_epoch_rows(
    real_data, tiny_root, tmp_path, monkeypatch, capsys
):
    from reidkit.engine import train as train_module

    calls = []

    def fake_fit(config, out, *, resume, progress):  # no training: the rows it would write
        calls.append((config, Path(out), resume))
        Path(out).mkdir(parents=True, exist_ok=True)
        fake_metrics(2 if resume else 1, attention=True).to_csv(Path(out) / "metrics.csv")
        (Path(out) / "last.pt").write_bytes(b"weights")
        return Path(out) / "last.pt"

    monkeypatch.setattr(train_module, "fit", fake_fit)
    weights = tmp_path / "imagenet.pt"
    weights.write_bytes(b"stand-in")
    argv = ["--recipe", "mobilenet-pcb-csalr", "--seed", "1", "--subset", tiny_root / "tiny"]
    argv += ["--out", tmp_path / "out", "--finetune-results", tmp_path / "results"]
    argv += ["--weights", weights]
    for _ in range(2):
        assert real_data.main([str(a) for a in argv]) == 0
    run = tmp_path / "out" / "mobilenet-pcb-csalr-seed1"
    assert [(out, resume) for _config, out, resume in calls] == [(run, False), (run, True)]
    config = calls[0][0]
    assert config.name == "mobilenet-pcb-csalr" and config.model.weights == str(weights)
    assert config.data.dataset == "cuhk03-subset" and config.train.seed == 1
    # the subset's own query / gallery, its manifest pointing at the images where they are
    manifest = pd.read_csv(Path(config.data.root) / "cuhk03-subset" / "manifest.csv")
    assert manifest["path"].map(lambda p: Path(p).is_absolute()).all()
    assert {"query", "gallery", "train"} == set(manifest["split"])
    csv = tmp_path / "results" / "mobilenet-pcb-csalr-seed1.csv"
    frame = pd.read_csv(csv)
    assert list(frame.columns[: len(real_data.FINETUNE_COLUMNS)]) == list(
        real_data.FINETUNE_COLUMNS
    )
    assert list(frame["epoch"]) == [1, 2] and set(frame["recipe"]) == {"mobilenet-pcb-csalr"}
    assert list(frame["rank1"]) == pytest.approx([10.0, 20.0])  # percent
    assert list(frame["mINP"]) == pytest.approx([1.0, 2.0])
    assert list(frame["cpu_minutes"]) == pytest.approx([230 / 60, 460 / 60])  # cumulative
    assert list(frame["wall_minutes"]) == pytest.approx([2.0, 4.0])
    assert list(frame["alpha_stage3"]) == pytest.approx([0.03, 0.06])
    out = capsys.readouterr().out
    assert "reproduce: python bench/real_data.py --recipe mobilenet-pcb-csalr --seed 1" in out


def results_csv(columns, folder: Path, recipe: str, seed: int, rank1s, mAPs, cpu: float) -> None:
    """A results file as a fine-tune run writes it: mINP = mAP / 2, one wall minute per epoch."""
    frame = pd.DataFrame(
        {
            "recipe": recipe,
            "seed": seed,
            "epoch": range(1, len(rank1s) + 1),
            "rank1": rank1s,
            "mAP": mAPs,
            "mINP": [m / 2 for m in mAPs],
            "cpu_minutes": [cpu * (e + 1) for e in range(len(rank1s))],
            "wall_minutes": [1.0 * (e + 1) for e in range(len(rank1s))],
            "images_per_s": 50.0,
        }
    )
    for column in columns[len(frame.columns) :]:
        frame[column] = 0.0
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / f"{recipe}-seed{seed}.csv", index=False)


def test_plot_finetune_draws_every_run_and_tables_means_and_twin_minus_baseline(
    real_data, tmp_path, capsys
):
    results = tmp_path / "results"
    columns = real_data.FINETUNE_COLUMNS
    results_csv(columns, results, "mobilenet-pcb", 0, [30.0, 40.0], [20.0, 30.0], cpu=2.0)
    results_csv(columns, results, "mobilenet-pcb", 1, [32.0, 44.0], [22.0, 34.0], cpu=2.0)
    results_csv(columns, results, "mobilenet-pcb-csalr", 0, [31.0, 43.0], [21.0, 33.0], cpu=3.0)
    results_csv(columns, results, "mobilenet-pcb-csalr", 1, [30.0, 42.0], [20.0, 36.0], cpu=3.0)
    results_csv(columns, results, "mobilenet-pcb-random", 0, [5.0, 8.0], [4.0, 6.0], cpu=2.0)
    png = tmp_path / "rank1.png"
    argv = ["--plot-finetune", str(png), "--finetune-results", str(results)]
    assert real_data.main(argv) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    lines = capsys.readouterr().out.splitlines()
    # each run's last epoch, and the means over seeds
    assert "| mobilenet-pcb | 0 | 40.0 | 30.0 | 15.0 | 2 | 4.0 | 2.0 | 50.0 |" in lines
    assert "| **mobilenet-pcb mean** | 0,1 | 42.0 | 32.0 | 16.0 | 2 | 4.0 | 2.0 | 50.0 |" in lines
    assert "| **mobilenet-pcb-csalr mean** | 0,1 | 42.5 | 34.5 | 17.2 | 2 | 6.0 | 2.0 | 50.0 |" in (
        lines
    )
    # the twin against its baseline: per seed (43 - 40, 42 - 44) and on the means
    assert "| mobilenet-pcb-csalr - mobilenet-pcb | 0 | +3.0 | +3.0 | +1.5 | +2.0 |" in lines
    assert "| mobilenet-pcb-csalr - mobilenet-pcb | 1 | -2.0 | +2.0 | +1.0 | +2.0 |" in lines
    assert "| mobilenet-pcb-csalr - mobilenet-pcb | mean | +0.5 | +2.5 | +1.2 | +2.0 |" in lines
    # a random start against the ImageNet start of the same recipe and seed
    assert "| mobilenet-pcb-random - mobilenet-pcb | 0 | -32.0 | -24.0 | -12.0 | +0.0 |" in lines


def test_plot_finetune_refuses_a_csv_it_did_not_write_and_an_empty_folder(real_data, tmp_path):
    with pytest.raises(SystemExit, match="no fine-tune results in"):
        real_data.plot_finetune(tmp_path / "none", tmp_path / "p.png")
    (tmp_path / "mine.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="mine.csv is not a fine-tune results file"):
        real_data.plot_finetune(tmp_path, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_a_finetune_run_that_stops_keeps_its_completed_epochs_and_says_why(
    real_data, tiny_root, tmp_path, monkeypatch
):
    from reidkit.engine import train as train_module
    from reidkit.engine.train import TrainingDiverged

    def diverging_fit(config, out, *, resume, progress):
        Path(out).mkdir(parents=True, exist_ok=True)
        fake_metrics(3, attention=False).to_csv(Path(out) / "metrics.csv")
        raise TrainingDiverged("the loss became nan at epoch 4, step 7; last.pt keeps epoch 3")

    monkeypatch.setattr(train_module, "fit", diverging_fit)
    argv = ["--recipe", "mobilenet-bot", "--random-start", "--subset", tiny_root / "tiny"]
    argv += ["--out", tmp_path / "out", "--finetune-results", tmp_path / "results"]
    with pytest.raises(SystemExit, match="error: the loss became nan at epoch 4"):
        real_data.main([str(a) for a in argv])
    frame = pd.read_csv(tmp_path / "results" / "mobilenet-bot-random-seed0.csv")
    assert list(frame["epoch"]) == [1, 2, 3] and set(frame["recipe"]) == {"mobilenet-bot-random"}
