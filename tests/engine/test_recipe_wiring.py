"""The recipe reaches the run: each training setting, changed, changes what `fit()` does.

Every field of DataConfig, ModelConfig, AttentionConfig and TrainConfig, and what observes it.
Expected values are written here from the config's numbers (x multipliers, x gamma), never
read back from the code under test.

DataConfig
  dataset, root     which prepared data: the recorded run trains on the tiny set's 8 ids
                    (test_fit_records_batches_of_the_configured_size_and_sampler: num_ids)
  height, width     test_fit_records_batches_of_the_configured_size_and_sampler (batch shape)
  flip              test_fit_training_images_are_flipped_and_erased_as_configured (p = 1),
                    test_loader_flip_probability_reaches_the_images (p = 0, p = 0.2)
  random_erasing    test_fit_training_images_are_flipped_and_erased_as_configured (p = 1),
                    test_loader_erasing_off_leaves_images_untouched (p = 0)
  pad_crop          test_loader_pad_crop_shifts_images_within_the_padding
  sampler, instances test_fit_records_batches_of_the_configured_size_and_sampler (P x K),
                    test_loader_random_sampler_is_not_identity_structured
  workers           does not change what is trained, only where images are decoded (a
                    resumable change, RESUMABLE_CHANGES); tests/data/test_loading.py
ModelConfig
  arch              test_build_model_takes_arch_last_stride_parts_reduced_and_head,
                    mobilenet_v2: test_mobilenet_v2_arch_weights_and_last_stride_reach_the_net
                    (every width read from the trunk: modules 24 / 32 / 96, head 1280)
  pretrained, weights  test_build_model_loads_the_configured_weight_file,
                    test_mobilenet_v2_arch_weights_and_last_stride_reach_the_net (the shared
                    ImageNet file, tensor by tensor; either layout)
  last_stride, parts, reduced, head (rpp built directly)
                    test_build_model_takes_arch_last_stride_parts_reduced_and_head,
                    test_mobilenet_v2_arch_weights_and_last_stride_reach_the_net
  head (PCB -> RPP in fit)  test_fit_stages_schedule_and_optimiser_follow_the_config
  dropout           test_head_dropout_drops_the_configured_fraction_of_pooled_stripes
  shared_reduction  test_build_model_takes_arch_last_stride_parts_reduced_and_head
AttentionConfig
  kind, stages      test_build_model_attention_kind_and_stages
  groups, grid, qk_ratio, landmark_weight
                    test_csalr_module_computes_eq_11_17_with_the_configured_settings
                    (attributes, conv shapes and output against a dense float64 formula),
                    test_fit_builds_modules_with_the_configured_settings
  projection        same function by design (test_csalr_projection_is_the_same_function)
  bases             test_build_model_attention_kind_and_stages (CSA bases shape)
  deep_supervision  test_build_model_attention_kind_and_stages (no aux classifiers/logits)
  ds_weight         test_fit_loss_is_eq_18_with_the_configured_ds_weight (metrics.csv loss
                    against an independent CE sum; the aux classifier's gradient against its
                    closed form lambda (softmax - onehot)^T GAP / B)
  recompute         same gradients by design; test_recompute_reruns_attention_in_backward
                    (the checkpointed forward runs)
TrainConfig
  epochs, rpp_epochs, rpp_classifier_epochs, lr, trunk_lr_mult, attention_lr_mult,
  momentum, weight_decay, step_size, gamma
                    test_fit_stages_schedule_and_optimiser_follow_the_config (stage and lr
                    of every group at every epoch, members, momentum, wd, nesterov)
  rpp_classifier_epochs (frozen phase)
                    test_fit_rpp_classifier_phase_changes_only_the_part_classifier
  batch_size        test_fit_records_batches_of_the_configured_size_and_sampler
  grad_clip         test_fit_clips_to_grad_clip_and_initialises_from_the_seed
  seed              test_fit_clips_to_grad_clip_and_initialises_from_the_seed
  amp, channels_last  ignored on the CPU (config.py says so); CUDA-only paths
  eval_every        evaluation, not training: tests/engine/test_train.py
                    (test_evaluation_during_training_is_recorded_per_evaluated_epoch)

Deliberate breakages tried, one at a time, each reverted (the test that failed):
  - momentum hard-coded 0.9: test_fit_stages_schedule_and_optimiser_follow_the_config
  - weight decay hard-coded 1e-4: test_fit_stages_schedule_and_optimiser_follow_the_config
  - nesterov on: test_fit_stages_schedule_and_optimiser_follow_the_config
  - attention_lr_mult dropped (attention at the trunk's rate):
      test_fit_stages_schedule_and_optimiser_follow_the_config
  - trunk_lr_mult dropped (trunk at 1x): test_fit_stages_schedule_and_optimiser_follow_the_config
  - attention params counted in the new group:
      test_fit_stages_schedule_and_optimiser_follow_the_config
  - gamma ignored (0.1): test_fit_stages_schedule_and_optimiser_follow_the_config
  - step_size ignored (40): test_fit_stages_schedule_and_optimiser_follow_the_config
  - RPP stage restarts the schedule: test_fit_stages_schedule_and_optimiser_follow_the_config
  - RPP classifier-alone phase skipped:
      test_fit_rpp_classifier_phase_changes_only_the_part_classifier
      test_fit_stages_schedule_and_optimiser_follow_the_config
  - RPP classifier phase does not freeze:
      test_fit_rpp_classifier_phase_changes_only_the_part_classifier
  - frozen modules left in train mode (BN stats move):
      test_fit_rpp_classifier_phase_changes_only_the_part_classifier
  - ds weight 1.0 at the call site: test_fit_loss_is_eq_18_with_the_configured_ds_weight
  - ds weight only in the logged loss, not in backward:
      test_fit_loss_is_eq_18_with_the_configured_ds_weight
  - grad_clip ignored: test_fit_clips_to_grad_clip_and_initialises_from_the_seed
  - seed ignored: test_fit_clips_to_grad_clip_and_initialises_from_the_seed
  - landmark_weight not passed:
      test_csalr_module_computes_eq_11_17_with_the_configured_settings
      test_fit_builds_modules_with_the_configured_settings
  - groups not passed:
      test_csalr_module_computes_eq_11_17_with_the_configured_settings
      test_fit_builds_modules_with_the_configured_settings
  - qk_ratio not passed:
      test_csalr_module_computes_eq_11_17_with_the_configured_settings
      test_fit_builds_modules_with_the_configured_settings
  - grid hard-coded 3x2:
      test_csalr_module_computes_eq_11_17_with_the_configured_settings
      test_fit_builds_modules_with_the_configured_settings
  - projection not passed: test_csalr_projection_is_the_same_function
  - bases not passed: test_build_model_attention_kind_and_stages
  - deep_supervision ignored: test_build_model_attention_kind_and_stages
  - recompute not passed: test_recompute_reruns_attention_in_backward
  - dropout not passed to the head:
      test_head_dropout_drops_the_configured_fraction_of_pooled_stripes
  - dropout after the reduction instead of before:
      test_head_dropout_drops_the_configured_fraction_of_pooled_stripes
  - shared_reduction not passed: test_build_model_takes_arch_last_stride_parts_reduced_and_head
  - last_stride not passed: test_build_model_takes_arch_last_stride_parts_reduced_and_head
  - weights ignored: test_build_model_loads_the_configured_weight_file,
      test_mobilenet_v2_arch_weights_and_last_stride_reach_the_net
  - MobileNetV2 last_stride ignored (features.14 kept at stride 2):
      test_mobilenet_v2_arch_weights_and_last_stride_reach_the_net
  - MobileNetV2 stage split moved (stage 3 ending at features.12: the same widths and map
      sizes, so only the values tell): tests/models/test_mobilenet.py
  - torchvision's key mapping dropped: tests/models/test_mobilenet.py
  - flip probability ignored (0.5):
      test_fit_training_images_are_flipped_and_erased_as_configured
      test_loader_flip_probability_reaches_the_images
  - flip not passed to the transform:
      test_fit_training_images_are_flipped_and_erased_as_configured
      test_loader_flip_probability_reaches_the_images
  - random_erasing not passed: test_fit_training_images_are_flipped_and_erased_as_configured
  - erasing always on:
      test_fit_training_images_are_flipped_and_erased_as_configured
      test_loader_erasing_off_leaves_images_untouched
  - pad_crop not passed: test_loader_pad_crop_shifts_images_within_the_padding
  - identity sampler ignored: test_fit_records_batches_of_the_configured_size_and_sampler
  - instances ignored (4): test_fit_records_batches_of_the_configured_size_and_sampler
  - batch_size hard-coded 16: test_fit_records_batches_of_the_configured_size_and_sampler
  - image size ignored: test_fit_records_batches_of_the_configured_size_and_sampler
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reidkit.data.datasets import manifest_path
from reidkit.data.loading import build_loader, build_transform, read_manifest, split_dataset
from reidkit.engine import train as train_module
from reidkit.engine.train import fit
from reidkit.models import net as net_module
from reidkit.models.attention import CSA, CSALR
from reidkit.models.net import build_model
from reidkit.models.pcb import PartLinear

# The recorded run: PCB for 2 epochs, then RPP (1 epoch part classifier alone, 1 epoch all),
# with every number different from its default and from the smoke preset.
LR, TRUNK_MULT, ATTENTION_MULT = 0.03, 0.2, 0.3
MOMENTUM, WEIGHT_DECAY, GAMMA, STEP_SIZE = 0.7, 3e-4, 0.5, 2
DS_WEIGHT = 0.35
GROUPS, GRID, QK_RATIO, LANDMARK_WEIGHT = 4, (6, 2), 0.5, 2.5
BATCH, INSTANCES = 8, 2
RECORDED = (
    f"train.lr={LR}",
    f"train.trunk_lr_mult={TRUNK_MULT}",
    f"train.attention_lr_mult={ATTENTION_MULT}",
    f"train.momentum={MOMENTUM}",
    f"train.weight_decay={WEIGHT_DECAY}",
    f"train.gamma={GAMMA}",
    f"train.step_size={STEP_SIZE}",
    "train.grad_clip=0",
    "train.epochs=4",
    "model.head=rpp",
    "train.rpp_epochs=2",
    "train.rpp_classifier_epochs=1",
    f"attention.ds_weight={DS_WEIGHT}",
    f"attention.groups={GROUPS}",
    f"attention.grid={GRID[0]},{GRID[1]}",
    f"attention.qk_ratio={QK_RATIO}",
    f"attention.landmark_weight={LANDMARK_WEIGHT}",
    "data.flip=1.0",
    "data.random_erasing=1.0",
    "data.sampler=identity",
    f"data.instances={INSTANCES}",
    f"train.batch_size={BATCH}",
)


class Recording:
    """Wraps a training loader: keeps every batch it yields."""

    def __init__(self, loader, batches: list) -> None:
        self.loader, self.batches = loader, batches
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.batches.append(batch)
            yield batch


def record_fit(config, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run `fit` with each epoch observed from outside: the optimiser it was given, the
    trainable parameters, state dicts before and after, the batches, the model's outputs and
    the first step's gradients."""
    epochs: list[dict] = []
    real_epoch = train_module._train_one_epoch

    def observed(model, loader, optimizer, *args, epoch, stage, **kwargs):
        net = model
        names = {id(p): n for n, p in net.named_parameters()}
        record = {
            "epoch": epoch,
            "stage": stage,
            "net": net,
            "groups": [
                {
                    **{k: v for k, v in group.items() if k != "params"},
                    "params": {names[id(p)] for p in group["params"]},
                }
                for group in optimizer.param_groups
            ],
            "names": set(names.values()),
            "trainable": {name for name, p in net.named_parameters() if p.requires_grad},
            "before": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "batches": [],
            "outputs": [],
            "aux_inputs": [],
            "grads": [],
        }

        def keep_output(_module, _inputs, output):
            record["outputs"].append(
                (
                    output.part_logits.detach().clone(),
                    [a.detach().clone() for a in output.aux_logits],
                )
            )

        def keep_aux_input(_module, inputs, _output):
            record["aux_inputs"].append(inputs[0].detach().clone())

        hooks = [net.register_forward_hook(keep_output)]
        first = next(iter(net.aux_classifiers.values()), None)
        if first is not None:
            hooks.append(first.register_forward_hook(keep_aux_input))
        real_step = optimizer.step

        def step(*a, **k):
            record["grads"].append(
                {
                    n: p.grad.detach().clone()
                    for n, p in net.named_parameters()
                    if p.grad is not None
                }
            )
            return real_step(*a, **k)

        optimizer.step = step
        try:
            row = real_epoch(
                model,
                Recording(loader, record["batches"]),
                optimizer,
                *args,
                epoch=epoch,
                stage=stage,
                **kwargs,
            )
        finally:
            for hook in hooks:
                hook.remove()
            optimizer.step = real_step
        record["after"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        epochs.append(record)
        return row

    monkeypatch.setattr(train_module, "_train_one_epoch", observed)
    fit(config, out, progress=False)
    return {"epochs": epochs, "metrics": pd.read_csv(out / "metrics.csv"), "config": config}


@pytest.fixture(scope="module")
def recorded(tiny_config, tmp_path_factory: pytest.TempPathFactory) -> dict:
    with pytest.MonkeyPatch.context() as monkeypatch:
        return record_fit(tiny_config(*RECORDED), tmp_path_factory.mktemp("wired"), monkeypatch)


def group_of(name: str) -> str:
    """Which optimiser group a parameter belongs in, from its module path."""
    if name.startswith("trunk."):
        return "trunk"
    if name.startswith("attention."):
        return "attention"
    return "new"  # heads, deep-supervision classifiers, the RPP part classifier


# ---- optimiser and schedule -----------------------------------------------------------------


def test_fit_stages_schedule_and_optimiser_follow_the_config(recorded):
    epochs = recorded["epochs"]
    assert [e["stage"] for e in epochs] == ["pcb", "pcb", "rpp-classifier", "rpp"]
    assert list(recorded["metrics"]["stage"]) == ["pcb", "pcb", "rpp-classifier", "rpp"]
    # base lr x gamma^(epoch // step_size), counted across both stages
    base = [LR, LR, LR * GAMMA, LR * GAMMA]
    mults = {"trunk": TRUNK_MULT, "attention": ATTENTION_MULT, "new": 1.0}
    for record, expected_base in zip(epochs, base, strict=True):
        groups = {g["name"]: g for g in record["groups"]}
        assert set(groups) == {"trunk", "attention", "new"}, record["epoch"]
        for name, group in groups.items():
            assert group["lr"] == pytest.approx(expected_base * mults[name]), (
                record["epoch"],
                name,
            )
            assert group["momentum"] == MOMENTUM
            assert group["weight_decay"] == WEIGHT_DECAY
            assert group["nesterov"] is False
            assert group["dampening"] == 0
            expected = {n for n in record["names"] if group_of(n) == name}
            assert group["params"] == expected, (record["epoch"], name)
    assert list(recorded["metrics"]["lr"]) == pytest.approx(base)
    # the RPP part classifier appears at the stage boundary, in the 1x group
    part_classifier = {"head.pooling.classifier.weight", "head.pooling.classifier.bias"}
    assert not part_classifier & epochs[1]["names"]
    assert part_classifier <= {
        n for g in epochs[2]["groups"] if g["name"] == "new" for n in g["params"]
    }


def test_fit_rpp_classifier_phase_changes_only_the_part_classifier(recorded):
    pcb_end, phase = recorded["epochs"][1], recorded["epochs"][2]
    assert phase["stage"] == "rpp-classifier"
    assert phase["trainable"] == {"head.pooling.classifier.weight", "head.pooling.classifier.bias"}
    # converting keeps every PCB weight and statistic
    for key, value in pcb_end["after"].items():
        assert torch.equal(phase["before"][key], value), key
    changed = {k for k, v in phase["before"].items() if not torch.equal(v, phase["after"][k])}
    # every weight and every BN running statistic (and its batch count) bit-identical
    assert changed == {"head.pooling.classifier.weight", "head.pooling.classifier.bias"}
    # then the last epoch trains everything again
    last = recorded["epochs"][3]
    assert last["trainable"] == {n for n, _ in last["net"].named_parameters()}
    moved = {k for k, v in last["before"].items() if not torch.equal(v, last["after"][k])}
    assert any(k.startswith("trunk.") and "running_mean" in k for k in moved)
    assert any(k.startswith("attention.") for k in moved)


# ---- loss -----------------------------------------------------------------------------------


def independent_loss(part_logits, aux_logits, labels, ds_weight):
    """Eq. 18 written out: per image, the sum over parts of -log p(label), then lambda times
    the sum over modules of -log p(label); the mean over the batch."""
    log_p = part_logits.double().log_softmax(-1)  # (B, P, ids)
    picked = log_p.gather(-1, labels.view(-1, 1, 1).expand(-1, log_p.shape[1], 1))
    parts = -picked.sum(dim=(1, 2)).mean()
    aux = sum(
        -a.double().log_softmax(-1)[torch.arange(len(labels)), labels].mean() for a in aux_logits
    )
    return parts + ds_weight * aux


def test_fit_loss_is_eq_18_with_the_configured_ds_weight(recorded):
    first = recorded["epochs"][0]
    losses, sizes = [], []
    for (part_logits, aux_logits), batch in zip(first["outputs"], first["batches"], strict=True):
        labels = batch[1]
        assert len(aux_logits) == 3  # one per attention module (stages 1-3)
        losses.append(float(independent_loss(part_logits, aux_logits, labels, DS_WEIGHT)))
        sizes.append(len(labels))
    expected = np.average(losses, weights=sizes)
    assert recorded["metrics"]["loss"].iloc[0] == pytest.approx(expected, rel=1e-5)
    # the weight reaches backward too: the stage-1 aux classifier's gradient at the first step
    # is lambda (softmax(z) - onehot)^T GAP(x * fused) / B, weight decay not included
    labels = first["batches"][0][1]
    pooled = first["aux_inputs"][0].double()  # (B, C)
    logits = first["outputs"][0][1][0].double()  # (B, ids)
    onehot = F.one_hot(labels, logits.shape[1]).double()
    expected_grad = DS_WEIGHT * (logits.softmax(-1) - onehot).T @ pooled / len(labels)
    found = first["grads"][0]["aux_classifiers.1.weight"].double()
    torch.testing.assert_close(found, expected_grad, rtol=1e-4, atol=1e-7)


# ---- data reaching the run ------------------------------------------------------------------


def source_images(dataset, indices, height, width) -> torch.Tensor:
    """The training images resized and normalised, without augmentation."""
    plain = build_transform(height, width, train=False)
    images = []
    for index in indices:
        with Image.open(str(dataset.paths[int(index)])) as image:
            images.append(plain(image))
    return torch.stack(images)


def erased_box(augmented: torch.Tensor, reference: torch.Tensor) -> tuple[int, int] | None:
    """(h, w) of the one rectangle where `augmented` differs from `reference` and is 0 there;
    None where they are equal. Fails if the difference is not such a rectangle."""
    differs = (augmented != reference).any(dim=0)  # (H, W)
    if not differs.any():
        return None
    rows = torch.nonzero(differs.any(dim=1)).flatten()
    cols = torch.nonzero(differs.any(dim=0)).flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    assert torch.all(augmented[:, top:bottom, left:right] == 0)
    outside = torch.ones_like(differs)
    outside[top:bottom, left:right] = False
    assert not differs[outside].any()
    return bottom - top, right - left


def test_fit_training_images_are_flipped_and_erased_as_configured(recorded):
    config = recorded["config"]
    first = recorded["epochs"][0]
    dataset = split_dataset(
        read_manifest(manifest_path(Path(config.data.root), config.data.dataset)),
        "train",
        config.data,
        train=True,
    )
    seen = 0
    for images, _labels, _camids, indices in first["batches"]:
        source = source_images(dataset, indices, config.data.height, config.data.width)
        for augmented, plain in zip(images, source, strict=True):
            if torch.equal(plain, plain.flip(-1)):
                continue  # a symmetric image cannot show a flip
            # flip = 1: every image is the mirror of its source, except one erased box
            box = erased_box(augmented, plain.flip(-1))
            assert box is not None  # random_erasing = 1: every image has one
            area = box[0] * box[1] / (config.data.height * config.data.width)
            assert 0.015 <= area <= 0.42
            seen += 1
    assert seen >= 40


def test_fit_records_batches_of_the_configured_size_and_sampler(recorded):
    config = recorded["config"]
    for record in recorded["epochs"]:
        for images, labels, _camids, _indices in record["batches"]:
            assert images.shape == (BATCH, 3, config.data.height, config.data.width)
            counts = torch.bincount(labels)
            # P x K: batch / K identities, K images each
            assert sorted(counts[counts > 0].tolist()) == [INSTANCES] * (BATCH // INSTANCES)
        assert record["net"].head.num_ids == 8
    assert len(recorded["epochs"][0]["batches"]) == 48 // BATCH


def test_loader_flip_probability_reaches_the_images(tiny_config):
    for p, low, high in ((0.0, 0.0, 0.0), (0.2, 0.05, 0.38)):
        config = tiny_config(f"data.flip={p}")
        dataset = split_dataset(
            read_manifest(manifest_path(Path(config.data.root), config.data.dataset)),
            "train",
            config.data,
            train=True,
        )
        flipped = total = 0
        for epoch in range(3):
            torch.manual_seed(epoch)
            loader = build_loader(
                dataset, "train", config.data, batch_size=8, train=True, epoch=epoch
            )
            for images, _, _, indices in loader:
                source = source_images(dataset, indices, config.data.height, config.data.width)
                for augmented, plain in zip(images, source, strict=True):
                    if torch.equal(plain, plain.flip(-1)):
                        continue
                    assert torch.equal(augmented, plain) or torch.equal(augmented, plain.flip(-1))
                    flipped += torch.equal(augmented, plain.flip(-1))
                    total += 1
        assert low <= flipped / total <= high, (p, flipped, total)


def test_loader_erasing_off_leaves_images_untouched(tiny_config):
    config = tiny_config("data.flip=0", "data.random_erasing=0")
    dataset = split_dataset(
        read_manifest(manifest_path(Path(config.data.root), config.data.dataset)),
        "train",
        config.data,
        train=True,
    )
    torch.manual_seed(0)
    for images, _, _, indices in build_loader(
        dataset, "train", config.data, batch_size=8, train=True
    ):
        source = source_images(dataset, indices, config.data.height, config.data.width)
        assert torch.equal(images, source)


def test_loader_pad_crop_shifts_images_within_the_padding(tiny_config):
    pad = 3
    config = tiny_config("data.flip=0", f"data.pad_crop={pad}")
    dataset = split_dataset(
        read_manifest(manifest_path(Path(config.data.root), config.data.dataset)),
        "train",
        config.data,
        train=True,
    )
    black = build_transform(config.data.height, config.data.width, train=False)(
        Image.new("RGB", (config.data.width, config.data.height))
    )[:, 0, 0]  # a zero pixel after normalisation, per channel
    torch.manual_seed(0)
    shifts = set()
    images, _, _, indices = next(
        iter(build_loader(dataset, "train", config.data, batch_size=8, train=True))
    )
    source = source_images(dataset, indices, config.data.height, config.data.width)
    h, w = config.data.height, config.data.width
    for augmented, plain in zip(images, source, strict=True):
        canvas = black.view(3, 1, 1).expand(3, h + 2 * pad, w + 2 * pad).clone()
        canvas[:, pad : pad + h, pad : pad + w] = plain
        found = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.allclose(augmented, canvas[:, dy : dy + h, dx : dx + w], atol=1e-6)
        ]
        assert found, "the image is not a crop of the zero-padded source"
        shifts.add(found[0])
    assert len(shifts) > 1 and shifts != {(pad, pad)}


def test_loader_random_sampler_is_not_identity_structured(tiny_config):
    config = tiny_config("data.sampler=random")
    dataset = split_dataset(
        read_manifest(manifest_path(Path(config.data.root), config.data.dataset)),
        "train",
        config.data,
        train=True,
    )
    config_data = replace(config.data, flip=0.0)
    loader = build_loader(dataset, "train", config_data, batch_size=8, train=True)
    seen = sorted(int(i) for _, _, _, indices in loader for i in indices)
    assert seen == list(range(48))  # a shuffle of every image once, not P x K draws


# ---- modules built from the config ----------------------------------------------------------


def dense_csalr(module: CSALR, x: torch.Tensor, groups, grid, qk_ratio, c) -> torch.Tensor:
    """Eq. 11-17 with every matrix formed, in float64, from the config's numbers:
    Y = A_nm A_mm^-1 B V with A_nm = softmax(Q K'^T) + cP, A_mm = softmax(Q' K'^T) + cI,
    B = softmax(Q' K^T); the module's fuse(Y) (before the gate)."""
    b, channels, h, w = x.shape
    qk = round(qk_ratio * channels)
    q = F.conv2d(x, module.query.weight, module.query.bias)
    k = F.conv2d(x, module.key.weight, module.key.bias)
    v = F.conv2d(x, module.value.weight, module.value.bias)
    assert q.shape[1] == qk
    gh, gw = grid
    ph, pw = h // gh, w // gw
    m = gh * gw
    # P[i, j] = 1 when position i lies in landmark j's patch
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    patch = (rows // ph) * gw + cols // pw
    P = F.one_hot(patch, m).double()  # (n, m)
    outputs = []
    for g in range(groups):
        Qg = q[:, g * qk // groups : (g + 1) * qk // groups].flatten(2).mT  # (B, n, d)
        Kg = k[:, g * qk // groups : (g + 1) * qk // groups].flatten(2).mT
        Vg = v[:, g * channels // groups : (g + 1) * channels // groups].flatten(2).mT  # (B, n, e)
        Q_land = (P.T @ Qg) / (ph * pw)  # (B, m, d): patch means
        K_land = (P.T @ Kg) / (ph * pw)
        A_nm = torch.softmax(Qg @ K_land.mT, -1) + c * P
        A_mm = torch.softmax(Q_land @ K_land.mT, -1) + c * torch.eye(m, dtype=torch.float64)
        B = torch.softmax(Q_land @ Kg.mT, -1)  # (B, m, n)
        W = A_nm @ torch.linalg.inv(A_mm)  # the combination coefficient map
        outputs.append((W @ B @ Vg).mT.reshape(b, -1, h, w))
    Y = torch.cat(outputs, dim=1)
    return F.conv2d(Y, module.fuse.weight, module.fuse.bias)


def wired_config(tiny_config, *extra):
    return tiny_config(
        f"attention.groups={GROUPS}",
        f"attention.grid={GRID[0]},{GRID[1]}",
        f"attention.qk_ratio={QK_RATIO}",
        f"attention.landmark_weight={LANDMARK_WEIGHT}",
        *extra,
    )


@pytest.mark.parametrize("projection", ["landmarks", "map"])
def test_csalr_module_computes_eq_11_17_with_the_configured_settings(tiny_config, projection):
    config = wired_config(tiny_config, f"attention.projection={projection}")
    torch.manual_seed(0)
    net = build_model(config, 8).double()
    module = net.attention["1"]
    assert isinstance(module, CSALR)
    assert (module.groups, module.grid, module.landmark_weight) == (GROUPS, GRID, LANDMARK_WEIGHT)
    assert module.query.weight.shape == (round(QK_RATIO * 64), 64, 1, 1)
    assert module.key.weight.shape == (round(QK_RATIO * 64), 64, 1, 1)
    with torch.no_grad():  # sharpen the attention: near-uniform softmaxes hide c (W = P then)
        for conv in (module.query, module.key):
            conv.weight.mul_(30)
    x = torch.randn(2, 64, 24, 8, dtype=torch.float64)
    _, fused = module(x)
    expected = dense_csalr(module, x, GROUPS, GRID, QK_RATIO, LANDMARK_WEIGHT)
    torch.testing.assert_close(fused, expected, rtol=1e-9, atol=1e-9)
    # and the weight matters: the paper's c = 1 gives another output
    other = dense_csalr(module, x, GROUPS, GRID, QK_RATIO, 1.0)
    assert (fused - other).abs().max() > 1e-3


def test_csalr_projection_is_the_same_function(tiny_config):
    outputs = []
    for projection in ("landmarks", "map"):
        torch.manual_seed(0)
        net = build_model(wired_config(tiny_config, f"attention.projection={projection}"), 8)
        module = net.attention["2"].double()
        assert module.projection == projection
        torch.manual_seed(1)
        outputs.append(module(torch.randn(2, 128, 12, 4, dtype=torch.float64))[1])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-9, atol=1e-9)


def test_fit_builds_modules_with_the_configured_settings(recorded):
    net = recorded["epochs"][0]["net"]
    assert sorted(net.attention) == ["1", "2", "3"]
    for key, channels in (("1", 64), ("2", 128), ("3", 256)):
        module = net.attention[key]
        assert isinstance(module, CSALR)
        assert (module.groups, module.grid, module.landmark_weight) == (
            GROUPS,
            GRID,
            LANDMARK_WEIGHT,
        )
        assert module.query.out_channels == round(QK_RATIO * channels)


def test_build_model_attention_kind_and_stages(tiny_config):
    net = build_model(
        tiny_config("attention.kind=csa", "attention.stages=2,4", "attention.bases=5"), 8
    )
    assert sorted(net.attention) == ["2", "4"] and sorted(net.aux_classifiers) == ["2", "4"]
    assert all(isinstance(m, CSA) for m in net.attention.values())
    assert net.attention["4"].bases.shape == (2, 5, round(0.25 * 512))
    out = net(torch.randn(2, 3, 96, 32))
    assert [a.shape for a in out.aux_logits] == [(2, 8), (2, 8)]
    net = build_model(tiny_config("attention.deep_supervision=false"), 8)
    assert len(net.aux_classifiers) == 0
    assert net(torch.randn(2, 3, 96, 32)).aux_logits == ()
    net = build_model(tiny_config("attention.kind=none"), 8)
    assert len(net.attention) == 0 and len(net.aux_classifiers) == 0


def test_build_model_takes_arch_last_stride_parts_reduced_and_head(tiny_config):
    config = tiny_config(
        "model.arch=resnet34",
        "model.last_stride=2",
        "model.parts=3",
        "model.reduced=40",
        "model.shared_reduction=true",
        "model.head=rpp",
        "train.rpp_epochs=1",
        "attention.kind=none",
    )
    net = build_model(config, 8)
    assert [len(stage) for stage in net.trunk.stages] == [3, 4, 6, 3]  # ResNet-34's blocks
    assert net.head.is_rpp
    assert isinstance(net.head.reduce, torch.nn.Linear) and net.head.reduce.weight.shape == (
        40,
        512,
    )
    assert net.head.bn.num_features == 40  # one BN shared by the parts
    net.eval()
    fmap, _ = net.forward_features(torch.randn(2, 3, 96, 32))
    assert fmap.shape == (2, 512, 3, 1)  # stride 32 with last_stride 2
    out = net(torch.randn(2, 3, 96, 32))
    assert out.part_logits.shape == (2, 3, 8) and out.reduced_features.shape == (2, 3, 40)
    # the defaults of the tiny config: last stride 1, six independent reductions
    net = build_model(tiny_config("model.reduced=24"), 8)
    assert isinstance(net.head.reduce, PartLinear)
    assert net.head.reduce.weight.shape == (6, 512, 24)
    assert net.forward_features(torch.randn(2, 3, 96, 32))[0].shape[-2:] == (6, 2)


def test_build_model_loads_the_configured_weight_file(tiny_config, tmp_path: Path):
    source = build_model(tiny_config("attention.kind=none"), 8).trunk
    state = {
        k: torch.full_like(v, 0.125) if v.is_floating_point() else v
        for k, v in source.state_dict().items()
    }
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    file = tmp_path / "resnet18.pth"
    torch.save(state, file)
    net = build_model(tiny_config("model.pretrained=true", f"model.weights={file}"), 8)
    assert all(
        torch.all(v == 0.125) for k, v in net.trunk.state_dict().items() if v.is_floating_point()
    )
    scratch = build_model(tiny_config("model.pretrained=false", f"model.weights={file}"), 8)
    assert not all(
        torch.all(v == 0.125) for v in scratch.trunk.state_dict().values() if v.is_floating_point()
    )


def test_head_dropout_drops_the_configured_fraction_of_pooled_stripes(tiny_config):
    p = 0.3
    net = build_model(tiny_config(f"model.dropout={p}", "attention.kind=none"), 8).train()
    seen = {}
    net.head.reduce.register_forward_hook(lambda _m, inputs, _o: seen.update(x=inputs[0]))
    torch.manual_seed(0)
    out = net(torch.randn(4, 3, 96, 32))
    g, dropped = out.part_features, seen["x"]  # (B, P, C) before and after dropout
    live = g != 0
    zeroed = (dropped == 0) & live
    assert abs(zeroed.sum().item() / live.sum().item() - p) < 0.03
    kept = live & ~zeroed
    torch.testing.assert_close(dropped[kept], g[kept] / (1 - p))


def test_recompute_reruns_attention_in_backward(tiny_config, monkeypatch):
    calls = []
    real = net_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(net_module, "checkpoint", counting)
    for recompute, expected in (("false", []), ("true", ["1", "2", "3"])):
        calls.clear()
        net = build_model(tiny_config(f"attention.recompute={recompute}"), 8).train()
        net(torch.randn(2, 3, 96, 32)).part_logits.sum().backward()
        assert calls == expected


# ---- other training settings through fit ----------------------------------------------------


def test_fit_clips_to_grad_clip_and_initialises_from_the_seed(
    tiny_config, tmp_path: Path, monkeypatch
):
    clip = 1e-3  # far below the gradient norm of an untrained net, so every step is clipped
    config = tiny_config("train.epochs=1", f"train.grad_clip={clip}", "train.seed=17")
    run = record_fit(config, tmp_path / "run", monkeypatch)
    for grads in run["epochs"][0]["grads"]:
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
        assert norm == pytest.approx(clip, rel=1e-3)
    # the run's initial weights are those of the model built right after seeding with 17
    torch.manual_seed(17)
    expected = build_model(config, 8).state_dict()
    start = run["epochs"][0]["before"]
    assert all(torch.equal(start[k], v) for k, v in expected.items())
    torch.manual_seed(0)
    other = build_model(config, 8).state_dict()
    assert not all(torch.equal(start[k], v) for k, v in other.items())


def test_mobilenet_v2_arch_weights_and_last_stride_reach_the_net(
    tiny_config, mobilenet_weights: Path
):
    from reidkit.models.mobilenet import MobileNetV2

    shared = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    sets = ("model.arch=mobilenet_v2", "model.pretrained=true")
    sets += (f"model.weights={mobilenet_weights}",)
    net = build_model(tiny_config(*sets, "attention.kind=csalr", "model.reduced=40"), 8).eval()
    assert isinstance(net.trunk, MobileNetV2)
    trunk = net.trunk.state_dict()
    assert trunk.keys() == shared.keys()
    assert all(torch.equal(trunk[k], v) for k, v in shared.items())
    # every width comes from the trunk: 24 / 32 / 96 channels after stages 1-3, 1280 after 4
    widths = {key: module.channels for key, module in net.attention.items()}
    assert widths == {"1": 24, "2": 32, "3": 96}
    assert {k: c.in_features for k, c in net.aux_classifiers.items()} == widths
    assert net.head.reduce.weight.shape == (6, 1280, 40)
    images = torch.randn(2, 3, 96, 32)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, x: seen.append(x[0].shape[1:]))
             for m in net.attention.values()]  # fmt: skip
    with torch.no_grad():
        fmap, aux = net.forward_features(images)
    for hook in hooks:
        hook.remove()
    assert seen == [(24, 24, 8), (32, 12, 4), (96, 6, 2)]  # strides 4, 8, 16
    assert fmap.shape == (2, 1280, 6, 2) and [a.shape for a in aux] == [(2, 8)] * 3  # 1/16
    out = net(images)
    assert out.part_features.shape == (2, 6, 1280) and out.reduced_features.shape == (2, 6, 40)
    # last stride 2: the final map at 1/32; a global head reads 1280 channels too
    plain = build_model(tiny_config(*sets, "model.last_stride=2", "model.head=global"), 8).eval()
    with torch.no_grad():
        assert plain.forward_features(images)[0].shape == (2, 1280, 3, 1)
    assert plain.head.bn.num_features == 1280 and plain.head.classifier.weight.shape == (8, 1280)
    # model.pretrained=false ignores the file
    scratch = build_model(tiny_config(*sets, "model.pretrained=false"), 8).trunk.state_dict()
    assert not torch.equal(scratch["features.5.conv.3.weight"], shared["features.5.conv.3.weight"])
