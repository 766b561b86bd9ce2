"""Training: loss goes down, resume is exact, failures stop cleanly, DDP runs on gloo."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from reidkit.config import load_preset
from reidkit.engine import train as train_module
from reidkit.engine.checkpoint import load_checkpoint, load_model
from reidkit.engine.evaluate import evaluate_model
from reidkit.engine.train import (
    TrainingDiverged,
    fit,
    learning_rate,
    reid_loss,
    stage_of,
)
from reidkit.errors import ConfigError
from reidkit.models.net import NetOutput


def test_loss_falls_on_a_tiny_synthetic_run(tiny_config, tmp_path: Path):
    config = tiny_config("train.epochs=6", "train.lr=0.05")
    checkpoint = fit(config, tmp_path / "run", progress=False)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3, 4, 5, 6]
    assert metrics["loss"].iloc[-1] < 0.8 * metrics["loss"].iloc[0]
    assert metrics["train_accuracy"].iloc[-1] > metrics["train_accuracy"].iloc[0]
    # eq. 18 with lambda = 1: the total is the parts' loss plus the deep-supervision loss
    total = metrics["loss_parts"] + metrics["loss_ds"]
    assert (metrics["loss"] - total).abs().max() < 1e-4
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert load_preset(tmp_path / "run" / "config.toml") == config
    assert load_checkpoint(checkpoint).epoch == 6


def test_curves_png_is_drawn_after_the_first_epoch_then_when_the_run_stops(
    tiny_config, tmp_path: Path, monkeypatch
):
    drawn: list[list[int]] = []
    real_save, real_epoch = train_module.save_curves, train_module._train_one_epoch

    def recorded(frame, path):
        drawn.append(list(frame["epoch"]))
        real_save(frame, path)

    def stopped_in_epoch_3(*args, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(train_module, "save_curves", recorded)
    monkeypatch.setattr(train_module, "_train_one_epoch", stopped_in_epoch_3)
    config, run = tiny_config("train.epochs=4"), tmp_path / "run"
    with pytest.raises(train_module.Interrupted):
        fit(config, run, progress=False)
    # epoch 1 at once; epoch 2 within half a minute of it is not redrawn until the stop,
    # when the picture catches up with what last.pt keeps
    assert drawn == [[1], [1, 2]]
    monkeypatch.setattr(train_module, "_train_one_epoch", real_epoch)
    fit(config, run, progress=False, resume=True)
    # the resumed run's first epoch at once, its last (seconds later) when it ends
    assert drawn == [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")


def learned_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint).model


@pytest.mark.parametrize(
    "overrides",
    [
        ("train.epochs=4",),
        # PCB -> RPP with the interruption exactly at the stage boundary: the part classifier
        # must be initialised and the optimiser rebuilt as in the uninterrupted run.
        ("train.epochs=4", "model.head=rpp", "train.rpp_epochs=2", "train.rpp_classifier_epochs=1"),
        # the strong baseline: Adam's moments and the warm-up must resume exactly too
        (
            "train.epochs=4",
            "model.head=global",
            "data.sampler=identity",
            "data.instances=4",
            "train.triplet=hard",
            "train.label_smoothing=0.1",
            "train.optimizer=adam",
            "train.warmup_epochs=3",
        ),
    ],
    ids=["pcb", "pcb-rpp", "global-adam"],
)
def test_resume_after_interruption_matches_an_uninterrupted_run(
    tiny_config, tmp_path: Path, overrides
):
    config = tiny_config(*overrides, "data.flip=0.5", "train.lr=0.02")
    straight = fit(config, tmp_path / "straight", progress=False)
    interrupted = fit(config, tmp_path / "resumed", progress=False, stop_after=2)
    assert load_checkpoint(interrupted).epoch == 2
    resumed = fit(config, tmp_path / "resumed", progress=False, resume=True)
    expected, found = learned_weights(straight), learned_weights(resumed)
    assert expected.keys() == found.keys()
    for key in expected:
        assert torch.equal(expected[key], found[key]), key
    history = pd.read_csv(tmp_path / "resumed" / "metrics.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4]
    if config.model.head == "rpp":
        assert list(history["stage"]) == ["pcb", "pcb", "rpp-classifier", "rpp"]


def test_resume_with_changed_settings_is_refused(tiny_config, tmp_path: Path):
    fit(tiny_config("train.epochs=2"), tmp_path / "run", progress=False, stop_after=1)
    with pytest.raises(ConfigError, match="different train.lr"):
        fit(tiny_config("train.epochs=2", "train.lr=0.5"), tmp_path / "run", resume=True)


def test_existing_run_is_not_overwritten_without_resume(tiny_config, tmp_path: Path):
    fit(tiny_config("train.epochs=1"), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="pass --resume"):
        fit(tiny_config("train.epochs=1"), tmp_path / "run", progress=False)


def test_resume_without_a_checkpoint_says_so(tiny_config, tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist; drop --resume"):
        fit(tiny_config("train.epochs=1"), tmp_path / "empty", resume=True)


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_good(
    tiny_config, tmp_path: Path, monkeypatch
):
    config = tiny_config("train.epochs=3")
    real_loss = reid_loss
    calls = {"n": 0}
    steps_per_epoch = 48 // 8

    def poisoned(output: NetOutput, labels, ds_weight, **options):
        calls["n"] += 1
        losses = real_loss(output, labels, ds_weight, **options)
        if calls["n"] == steps_per_epoch + 3:  # epoch 2, step 3
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(train_module, "reid_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 2, step 3"):
        fit(config, tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt").epoch == 1


def test_singular_landmark_matrix_stops_cleanly(tiny_config, tmp_path: Path, monkeypatch):
    def singular(*args, **kwargs):
        raise torch.linalg.LinAlgError("The solver failed because the input matrix is singular.")

    monkeypatch.setattr(torch.linalg, "solve", singular)
    with pytest.raises(TrainingDiverged, match=r"singular.*landmark_weight=2"):
        fit(tiny_config("train.epochs=1"), tmp_path / "run", progress=False)


def test_singular_landmark_matrix_in_backward_stops_cleanly(
    tiny_config, tmp_path: Path, monkeypatch
):
    solve = torch.linalg.solve

    def singular_in_backward(a, b, *args, **kwargs):
        result = solve(a, b, *args, **kwargs)

        def fail(_grad):  # runs when backward reaches the solve, as a failing A_mm^T solve would
            raise torch.linalg.LinAlgError(
                "The solver failed because the input matrix is singular."
            )

        if result.requires_grad:
            result.register_hook(fail)
        return result

    monkeypatch.setattr(torch.linalg, "solve", singular_in_backward)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1 .*singular"):
        fit(tiny_config("train.epochs=1"), tmp_path / "run", progress=False)


def test_learning_rate_steps_across_both_stages():
    config = load_preset("pcb-rpp-csalr")
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 39) == pytest.approx(0.1)
    assert learning_rate(config, 40) == pytest.approx(0.01)
    assert learning_rate(config, 80) == pytest.approx(0.001)
    assert [stage_of(config, e) for e in (0, 39, 40, 49, 50, 99)] == [
        "pcb",
        "pcb",
        "rpp-classifier",
        "rpp-classifier",
        "rpp",
        "rpp",
    ]


def test_trunk_and_attention_train_at_their_own_multipliers(tiny_config):
    config = tiny_config("train.lr=0.1", "train.trunk_lr_mult=0.1", "train.attention_lr_mult=0.3")
    model = train_module.build_model(config, 8)
    optimizer = train_module._build_optimizer(model, config)
    train_module._set_learning_rate(optimizer, config, 0)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert set(groups) == {"trunk", "attention", "new"}
    assert groups["trunk"]["lr"] == pytest.approx(0.01)
    assert groups["attention"]["lr"] == pytest.approx(0.03)
    assert groups["new"]["lr"] == pytest.approx(0.1)
    members = {name: {id(p) for p in group["params"]} for name, group in groups.items()}
    assert members["trunk"] == {id(p) for p in model.trunk.parameters()}
    assert members["attention"] == {id(p) for p in model.attention.parameters()}
    assert members["new"] == {
        id(p) for module in (model.aux_classifiers, model.head) for p in module.parameters()
    }


def test_reid_loss_is_part_sum_plus_weighted_deep_supervision():
    torch.manual_seed(0)
    labels = torch.tensor([0, 2, 1])
    parts = torch.randn(3, 6, 4)
    aux = (torch.randn(3, 4), torch.randn(3, 4))
    output = NetOutput(torch.zeros(3, 6, 8), torch.zeros(3, 6, 2), parts, aux)
    losses = reid_loss(output, labels, ds_weight=0.5)
    expected_parts = sum(torch.nn.functional.cross_entropy(parts[:, p], labels) for p in range(6))
    expected_ds = sum(torch.nn.functional.cross_entropy(a, labels) for a in aux)
    torch.testing.assert_close(losses["loss_parts"], expected_parts)
    torch.testing.assert_close(losses["loss_ds"], expected_ds)
    torch.testing.assert_close(losses["loss"], expected_parts + 0.5 * expected_ds)


# Run through torchrun in place of `python -m reidkit`: the real CLI and training loop, with
# each epoch wrapped to save this rank's parameters and the training images it was given.
DDP_PROBE = """
import os
import sys
from pathlib import Path

import torch

from reidkit.cli import app
from reidkit.engine import train

probe = Path(sys.argv.pop(1))
train_one_epoch = train._train_one_epoch


class Recording:
    def __init__(self, loader, seen):
        self.loader, self.seen = loader, seen

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.seen.extend(batch[3].tolist())
            yield batch


def probed(model, loader, *args, epoch, **kwargs):
    net = getattr(model, "module", model)
    rank = os.environ["RANK"]
    if epoch == 0:
        start = {name: p.detach().clone() for name, p in net.named_parameters()}
        torch.save(start, probe / f"rank{rank}-start.pt")
    seen = []
    row = train_one_epoch(model, Recording(loader, seen), *args, epoch=epoch, **kwargs)
    parameters = {name: p.detach().clone() for name, p in net.named_parameters()}
    torch.save({"parameters": parameters, "seen": seen}, probe / f"rank{rank}-{epoch + 1}.pt")
    return row


train._train_one_epoch = probed
app(prog_name="reidkit")
"""


def test_two_process_gloo_run_through_torchrun(tiny_overrides, tmp_path: Path):
    """The real launcher: 2 CPU processes, DistributedDataParallel over gloo."""
    out, probe = tmp_path / "ddp", tmp_path / "probe"
    probe.mkdir()
    script = tmp_path / "reidkit_probed.py"
    script.write_text(DDP_PROBE)
    settings = [arg for item in (*tiny_overrides, "train.epochs=2") for arg in ("--set", item)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(script),
        str(probe),
        "train",
        "--preset",
        "smoke",
        "--out",
        str(out),
        *settings,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("checkpoint:") == 1  # only rank 0 reports
    state = load_checkpoint(out / "last.pt")
    assert state.epoch == 2
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == [
        ".reidkit-run",
        "config.toml",
        "curves.png",
        "last.pt",
        "metrics.csv",
    ]

    start = torch.load(probe / "rank1-start.pt", weights_only=True)
    for epoch in (1, 2):
        ranks = [torch.load(probe / f"rank{r}-{epoch}.pt", weights_only=True) for r in (0, 1)]
        # each rank trained on its own half of the 48 training images...
        halves = [set(rank["seen"]) for rank in ranks]
        assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 24
        assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(48))
        # ...yet the two ranks hold the same weights: the gradients were averaged across them.
        # Trained alone on different images, their weights would have parted after one step.
        zero, one = ranks[0]["parameters"], ranks[1]["parameters"]
        assert zero.keys() == one.keys() == start.keys()
        assert [name for name in zero if not torch.equal(zero[name], one[name])] == []
    assert [name for name in one if torch.equal(one[name], start[name])] == []  # all trained
    assert [name for name in one if not torch.equal(one[name], state.model[name])] == []


def test_evaluation_during_training_is_recorded_per_evaluated_epoch(
    tiny_config, tmp_path: Path, capsys
):
    config = tiny_config("train.epochs=2", "train.eval_every=2")
    checkpoint = fit(config, tmp_path / "run", progress=False)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["rank1"].isna().tolist() == [True, False]
    # and said as it happens, not only in metrics.csv
    rank1, mean_ap = 100 * metrics["rank1"].iloc[1], 100 * metrics["mAP"].iloc[1]
    assert capsys.readouterr().out.splitlines() == [
        f"epoch 2: rank-1 {rank1:.1f}%, mAP {mean_ap:.1f}% on the query / gallery of tiny"
    ]
    # the recorded numbers are what `reidkit evaluate` gives for epoch 2's weights
    model, state = load_model(checkpoint)
    assert state.epoch == 2
    report = evaluate_model(model, state.config, progress=False)
    assert metrics["rank1"].iloc[1] == pytest.approx(report.metrics.rank(1), abs=1e-12)
    assert metrics["mAP"].iloc[1] == pytest.approx(report.metrics.mAP, abs=1e-12)
    assert metrics["mINP"].iloc[1] == pytest.approx(report.metrics.mINP, abs=1e-12)


def test_epoch_rows_hold_each_gates_mean_over_the_steps_and_the_epochs_cpu_time(
    tiny_config, tmp_path: Path, monkeypatch
):
    after_steps: list[dict[int, float]] = []  # each module's alpha after each step
    real_build = train_module._build_optimizer

    def recording(model, config):
        optimizer = real_build(model, config)
        real_step = optimizer.step

        def step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            after_steps.append({int(s): m.alpha.item() for s, m in model.attention.items()})
            return out

        optimizer.step = step
        return optimizer

    clock = iter([100.0, 103.5])  # the CPU clock read at the epoch's start and end
    monkeypatch.setattr(train_module, "_build_optimizer", recording)
    monkeypatch.setattr(train_module, "_cpu_seconds", lambda: next(clock))
    fit(tiny_config("train.epochs=1", "train.lr=0.05"), tmp_path / "run", progress=False)
    row = pd.read_csv(tmp_path / "run" / "metrics.csv").iloc[0]
    assert row["cpu_seconds"] == pytest.approx(3.5)
    assert len(after_steps) == 6  # 48 images in batches of 8
    for stage in (1, 2, 3):
        mean = sum(step[stage] for step in after_steps) / len(after_steps)
        assert row[f"alpha_stage{stage}"] == pytest.approx(mean, rel=1e-6, abs=1e-12)
        assert after_steps[-1][stage] != 0  # the gate trained away from its initial 0


def test_cpu_seconds_count_this_process_and_its_finished_children_not_waiting():
    start, burnt = train_module._cpu_seconds(), time.process_time()
    while time.process_time() - burnt < 0.3:
        pass  # 0.3 s of this process's CPU, however long other work keeps the cores
    assert train_module._cpu_seconds() - start >= 0.3
    start = train_module._cpu_seconds()
    time.sleep(0.3)
    assert train_module._cpu_seconds() - start < 0.1  # waiting costs no CPU
    start = train_module._cpu_seconds()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)  # a child, like a loader worker
    assert train_module._cpu_seconds() - start >= 0.25
