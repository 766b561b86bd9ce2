"""Training: `fit(config)` runs PCB (and then RPP) with the paper's recipe (section 4.2, eq. 18),
or a global head with the strong baseline's (Luo et al., CVPR-W 2019).

One visible loop, no callbacks: per epoch, set the learning rate, iterate the loader, write
metrics, save `last.pt`. PCB-RPP is two named stages in `fit`: PCB epochs, then RPP
initialised from them (the part classifier alone with everything else frozen, then all).
The strong baseline's pieces are config keys, each off in the paper presets: label
smoothing, the batch-hard triplet loss, Adam, linear warm-up, milestones and cosine decay.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from reidkit.config import RunConfig, apply_overrides, config_to_dict, data_root, load_preset
from reidkit.data.loading import (
    build_loader,
    epoch_seed,
    manifest_path,
    read_manifest,
    split_dataset,
)
from reidkit.engine.checkpoint import (
    Checkpoint,
    capture_rng,
    load_checkpoint,
    model_from_checkpoint,
    restore_rng,
    save_checkpoint,
)
from reidkit.engine.distributed import Distributed, process_device
from reidkit.engine.distributed import init_distributed as _init_distributed
from reidkit.engine.losses import batch_hard_triplet_loss
from reidkit.errors import CheckpointError, ConfigError, Interrupted, ReidkitError
from reidkit.models.net import NetOutput, ReidNet, build_model
from reidkit.outputs import (
    atomic_write,
    check_output_folder,
    mark_folder,
    os_error_reason,
    remove_stale_temporaries,
    write_text,
)

# Config fields a resumed run may change: they steer evaluation and I/O, not the optimisation
# of the epochs already run. train.epochs may grow (an RPP run keeps its PCB stage's length:
# the extra epochs go to its RPP stage, so train.rpp_epochs grows with it).
RESUMABLE_CHANGES = {
    ("data", "workers"),
    ("data", "root"),
    ("train", "eval_every"),
    ("eval", "batch_size"),
    ("train", "epochs"),
}


# Written into a run folder before anything else: reidkit writes only into a folder that is
# new, empty or carries it, so `train --out` never replaces a user's config.toml or metrics.csv.
RUN_MARKER = ".reidkit-run"
RUN_MARKER_TEXT = "a run folder written by `reidkit train`; reidkit may write into this folder"


class TrainingDiverged(ReidkitError):
    """The loss became NaN or infinite, or a landmark solve failed; completed epochs are kept."""


@dataclass(frozen=True)
class RunFiles:
    """The files a run writes in its output folder."""

    folder: Path

    @property
    def checkpoint(self) -> Path:
        return self.folder / "last.pt"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.csv"

    @property
    def curves(self) -> Path:
        return self.folder / "curves.png"

    @property
    def config(self) -> Path:
        return self.folder / "config.toml"


def default_run_folder(config: RunConfig) -> Path:
    """`runs/<preset>-<dataset>/`."""
    return Path("runs") / f"{config.name}-{config.data.dataset}"


def learning_rate(config: RunConfig, epoch: int) -> float:
    """Base rate for a 0-based epoch, counted across stages.

    Warm-up (epoch < W = warmup_epochs): lr x (f + (1 - f) epoch / W), f = warmup_factor, which
    multiplies the decayed rate as the strong baseline's WarmupMultiStepLR does. Step: x gamma
    once per milestone already reached, or every `step_size` epochs without milestones.
    Cosine: lr x (1 + cos(pi (epoch - W) / (epochs - W))) / 2 after the warm-up.
    """
    train = config.train
    if train.schedule == "cosine":
        span = max(1, train.epochs - train.warmup_epochs)  # a run shorter than its warm-up
        decay = 0.5 * (1 + math.cos(math.pi * max(0, epoch - train.warmup_epochs) / span))
    elif train.milestones:
        decay = train.gamma ** sum(epoch >= m for m in train.milestones)
    else:
        decay = train.gamma ** (epoch // train.step_size)
    warmup = 1.0
    if epoch < train.warmup_epochs:
        progress = epoch / train.warmup_epochs
        warmup = train.warmup_factor + (1 - train.warmup_factor) * progress
    return train.lr * warmup * decay


def stage_of(config: RunConfig, epoch: int) -> str:
    """ "pcb", "rpp-classifier" (part classifier alone) or "rpp" (everything) for an epoch;
    "global" throughout for a global head."""
    if config.model.head == "global":
        return "global"
    if config.model.head != "rpp":
        return "pcb"
    rpp_start = config.train.epochs - config.train.rpp_epochs
    if epoch < rpp_start:
        return "pcb"
    if epoch < rpp_start + config.train.rpp_classifier_epochs:
        return "rpp-classifier"
    return "rpp"


def _diverged(problem: str, epoch: int, fix: str) -> TrainingDiverged:
    """One line: what failed in 0-based `epoch`, what is on disk now, and how to run again."""
    if epoch == 0:  # last.pt is first written at the end of epoch 1 (a resumed run has one)
        saved, again = "no epoch completed, so no checkpoint was saved", "train again"
    else:
        # A changed setting cannot be resumed (RESUMABLE_CHANGES), hence a new run.
        saved = f"last.pt keeps epoch {epoch}, the last completed one"
        again = "start a new run (another --out)"
    return TrainingDiverged(f"{problem}; {saved}; {again} with {fix}")


def _interrupted(files: RunFiles, completed: int, epoch: int) -> Interrupted:
    """The one line for Ctrl-C: what last.pt keeps, what was dropped, the command to resume."""
    # atomic_write removes its temporary on an interrupt, so no partial file is left
    if completed > epoch:  # stopped while writing metrics.csv after the checkpoint
        dropped = "nothing was lost"
    else:
        dropped = f"epoch {epoch + 1} was cut short and dropped, with no partial file left"
    if completed == 0 or not files.checkpoint.exists():
        return Interrupted(
            f"interrupted in epoch {epoch + 1}: no epoch completed, so no checkpoint was saved; "
            f"{dropped}; start again with the same command"
        )
    return Interrupted(
        f"interrupted in epoch {epoch + 1}: {files.checkpoint} keeps epoch {completed}, the last "
        f"complete one; {dropped}; resume with: reidkit train --out {files.folder} --resume"
    )


def _singular_landmarks(epoch: int, step: int, err: Exception) -> TrainingDiverged:
    """The one-line error for a CSALR landmark solve that failed in forward or backward."""
    # A_mm = softmax + cI is invertible in exact arithmetic, but with the paper's c = 1 its
    # diagonal dominance is only 2 s_kk, and once a landmark attends away from itself it goes
    # singular in floating point. c = 2 bounds ||A_mm^-1|| by 1 (models/attention.py).
    return _diverged(
        f"a CSALR landmark matrix became singular at epoch {epoch + 1}, step {step + 1} "
        f"({str(err).splitlines()[0]})",
        epoch,
        "--set attention.landmark_weight=2 (or a lower train.lr)",
    )


LOSS_TERMS = ("loss", "loss_parts", "loss_triplet", "loss_ds")  # metrics.csv columns


def reid_loss(
    output: NetOutput,
    labels: torch.Tensor,
    ds_weight: float,
    *,
    label_smoothing: float = 0.0,
    triplet: str = "off",
    triplet_margin: float = 0.3,
) -> dict[str, torch.Tensor]:
    """L = L_id + L_tri + lambda * sum_i L_DS_i (eq. 18 when the triplet term is off).

    L_id (`loss_parts`) is the sum of the per-part CEs (PCB's L_F; one part for a global head);
    every CE, the deep-supervision ones too, uses `label_smoothing`. L_tri is the batch-hard
    triplet loss on the pooled features before any reduction or BN (`part_features`, flattened:
    BNNeck's f_t for a global head), 0 when `triplet` is "off".
    """
    parts = output.part_logits.shape[1]
    part_loss = (
        F.cross_entropy(
            output.part_logits.flatten(0, 1).float(),  # (B*P, num_ids)
            labels.repeat_interleave(parts),  # (B*P,)
            reduction="sum",
            label_smoothing=label_smoothing,
        )
        / labels.numel()
    )
    zero = torch.zeros((), device=labels.device)
    aux_loss = sum(
        (
            F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
            for logits in output.aux_logits
        ),
        start=zero,
    )
    triplet_loss = zero
    if triplet != "off":
        triplet_loss = batch_hard_triplet_loss(
            output.part_features.flatten(1), labels, margin=triplet_margin, kind=triplet
        )
    return {
        "loss": part_loss + triplet_loss + ds_weight * aux_loss,
        "loss_parts": part_loss,
        "loss_triplet": triplet_loss,
        "loss_ds": aux_loss,
    }


def fit(
    config: RunConfig,
    out_dir: Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train `config` into `out_dir` (default `runs/<preset>-<dataset>/`); return `last.pt`.

    `resume` continues from `last.pt` at the epoch after the last completed one, with the same
    learning rate and the same data order from then on. `stop_after` ends the run after that
    many epochs of this call (an interruption, for tests and time-boxed runs).
    Under `torchrun` each process trains on its share of every batch (DistributedDataParallel);
    only rank 0 writes files and shows progress.
    """
    place = _init_distributed()
    try:
        return _fit(config, out_dir, place, resume=resume, progress=progress, stop_after=stop_after)
    finally:
        if place.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _fit(
    config: RunConfig,
    out_dir: Path | None,
    place: Distributed,
    *,
    resume: bool,
    progress: bool,
    stop_after: int | None,
) -> Path:
    config = _with_absolute_root(config)
    files = RunFiles(Path(out_dir) if out_dir else default_run_folder(config))
    # A folder holding last.pt but no marker is a run from before runs were marked: it is
    # resumed (its checkpoint is read first) or refused below for already existing.
    check_output_folder(
        "--out", files.folder, RUN_MARKER, "a run folder", adopt=files.checkpoint.is_file()
    )
    if place.is_main:
        _remove_stale_temporaries(files.folder)
    device = process_device(place)
    manifest = read_manifest(manifest_path(data_root(config.data.root), config.data.dataset))
    data = config.data
    train_set = split_dataset(manifest, "train", data, train=True)
    num_ids = train_set.num_ids
    if num_ids < 2:
        raise ConfigError(f"dataset {data.dataset!r} has {num_ids} training identities; need 2+")

    start_epoch, history, state = 0, [], None
    if resume:
        state, config = _resumable_checkpoint(files, config)
        start_epoch, history = state.epoch, list(state.history)
        if place.is_main:
            Console().print(
                f"resumed from epoch {start_epoch} of {config.train.epochs}: {files.checkpoint}",
                highlight=False,
                soft_wrap=True,
            )
    elif files.checkpoint.exists():
        raise ConfigError(
            f"{files.checkpoint} already exists; pass --resume to continue it or --out to start "
            "a new run elsewhere"
        )

    torch.manual_seed(config.train.seed)
    if state is None:
        # An RPP run starts as PCB; its RPP stage converts the head in place.
        first_head = "pcb" if config.model.head == "rpp" else config.model.head
        model = build_model(replace(config, model=replace(config.model, head=first_head)), num_ids)
    else:
        if state.num_ids != num_ids:
            raise ConfigError(
                f"--resume: {files.checkpoint} has {state.num_ids} identities but the training "
                f"split of {config.data.dataset!r} has {num_ids}; was the dataset re-prepared?"
            )
        model = model_from_checkpoint(state, files.checkpoint)
    model.to(device)
    if config.train.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    # every batch this run will draw can be formed: refused now, not in the first step
    _check_batches(config, train_set, place, start_epoch)

    if place.is_main:
        mark_folder(files.folder, RUN_MARKER, RUN_MARKER_TEXT)
        write_text(files.config, tomli_w.dumps(_toml_safe(config_to_dict(config))))

    amp_dtype = _amp_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    # The optimiser state of a checkpoint fits only the stage it was saved in.
    saved_stage = stage_of(config, start_epoch - 1) if start_epoch > 0 else None
    if state is not None:
        # Torch's generator is re-seeded per epoch below; this restores numpy's and Python's
        # too, for anything outside reidkit that draws from them.
        if state.rng is not None:
            restore_rng(state.rng)
        if state.scheduler and "scaler" in state.scheduler:
            scaler.load_state_dict(state.scheduler["scaler"])
    optimizer = None
    current_stage = None
    warned_condition = False
    end_epoch = (
        config.train.epochs
        if stop_after is None
        else min(config.train.epochs, start_epoch + stop_after)
    )
    completed = start_epoch  # epochs that last.pt holds
    epoch = start_epoch
    curves = CurvesPNG(files.curves, drawn_epochs=start_epoch)
    try:
        for epoch in range(start_epoch, end_epoch):
            # Every random draw of an epoch (dropout, augmentation without workers, an RPP part
            # classifier's initialisation) follows from (seed, epoch): a resumed run replays it.
            torch.manual_seed(epoch_seed(config.train.seed, epoch, place.rank))
            stage = stage_of(config, epoch)
            if stage != current_stage:
                # Parameter sets change between stages (new part classifier, frozen trunk), so
                # the optimiser and the DDP wrapper are rebuilt; momentum starts afresh.
                _enter_stage(model, stage)
                optimizer = _build_optimizer(model, config)
                if state is not None and epoch == start_epoch and stage == saved_stage:
                    optimizer.load_state_dict(state.optimizer)
                train_model = _wrap(model, place, device)
                current_stage = stage
            _set_learning_rate(optimizer, config, epoch)
            loader = build_loader(
                train_set,
                "train",
                config.data,
                train=True,
                batch_size=config.train.batch_size // place.world_size,
                seed=config.train.seed,
                epoch=epoch,
                num_replicas=place.world_size,
                rank=place.rank,
                pin_memory=device.type == "cuda",
            )
            row = _train_one_epoch(
                train_model,
                loader,
                optimizer,
                scaler,
                config,
                epoch=epoch,
                stage=stage,
                device=device,
                amp_dtype=amp_dtype,
                place=place,
                progress=progress and place.is_main,
            )
            if config.train.eval_every and (epoch + 1) % config.train.eval_every == 0:
                row.update(_evaluate_during_training(model, config, device, place))
                if place.is_main:
                    Console().print(
                        f"epoch {epoch + 1}: rank-1 {100 * row['rank1']:.1f}%, mAP "
                        f"{100 * row['mAP']:.1f}% on the query / gallery of {data.dataset}",
                        highlight=False,
                        soft_wrap=True,
                    )
            history.append(row)
            if place.is_main and not warned_condition:
                warned_condition = _warn_if_ill_conditioned(row, config)
            if place.is_main:
                _save_epoch(
                    files,
                    completed,
                    Checkpoint(
                        config=config,
                        model=model.state_dict(),
                        num_ids=num_ids,
                        epoch=epoch + 1,
                        head=model.head_kind,
                        optimizer=optimizer.state_dict(),
                        # The rate itself is a function of the epoch (learning_rate), so the
                        # schedule's state is the epoch plus the fp16 loss scaler.
                        scheduler={"epoch": epoch + 1, "scaler": scaler.state_dict()},
                        rng=capture_rng(),
                        history=history,
                    ),
                )
                completed = epoch + 1
                _write_metrics(files, history)
                curves.refresh(history)
            if place.world_size > 1:
                dist.barrier()
    except BaseException as err:
        if place.is_main:
            # The picture should show what last.pt keeps; the error in flight is the news.
            with suppress(Exception):
                curves.draw(history[:completed])
            if isinstance(err, KeyboardInterrupt):
                raise _interrupted(files, completed, epoch) from None
        raise
    if place.is_main:
        curves.draw(history)
    return files.checkpoint


def _save_epoch(files: RunFiles, completed: int, checkpoint: Checkpoint) -> None:
    """Save last.pt; a failure (a full disk) is one line saying what last.pt still holds."""
    try:
        save_checkpoint(files.checkpoint, checkpoint)
    except OSError as err:
        kept = (
            f"{files.checkpoint} still holds epoch {completed}; then resume with: "
            f"reidkit train --out {files.folder} --resume"
            if completed and files.checkpoint.exists()
            else "no checkpoint was saved"
        )
        raise CheckpointError(
            f"cannot save epoch {checkpoint.epoch} to {files.checkpoint}: "
            f"{os_error_reason(err)}; {kept}"
        ) from None


def _check_batches(config: RunConfig, train_set, place: Distributed, epoch: int) -> None:
    """Refuse, before anything is written, batches that cannot train: fewer than 2 images
    per process (BatchNorm), P x K identity batches that cannot be drawn, or one identity per
    batch with the triplet loss (no negatives: its loss would be 0)."""
    train, data = config.train, config.data
    share = train.batch_size // place.world_size
    processes = f" per process ({place.world_size} processes)" if place.world_size > 1 else ""
    if share < 2:
        raise ConfigError(
            f"train.batch_size = {train.batch_size} gives {share} image(s){processes}; "
            f"BatchNorm needs at least 2: set train.batch_size to {2 * place.world_size} or more"
        )
    if data.sampler == "identity":
        if share % data.instances:
            raise ConfigError(
                f"train.batch_size = {train.batch_size} gives batches of {share}{processes}, not "
                f"a multiple of data.instances = {data.instances} (P x K identity batches)"
            )
        if train.triplet != "off" and share // data.instances < 2:
            raise ConfigError(
                f"train.triplet = {train.triplet} needs 2 identities per batch, but "
                f"train.batch_size / data.instances = {share // data.instances}{processes}: "
                "raise train.batch_size or lower data.instances"
            )
    # the sampler's own checks (identities per batch, images for one batch), nothing read
    build_loader(
        train_set,
        "train",
        data,
        train=True,
        batch_size=share,
        seed=train.seed,
        epoch=epoch,
        num_replicas=place.world_size,
        rank=place.rank,
    )


def _with_absolute_root(config: RunConfig) -> RunConfig:
    """`config` with a relative data.root made absolute. The checkpoint keeps the root for
    `evaluate` and `extract`, which run from other folders: a relative one would name another
    place there (and send the user to prepare a second copy). Empty (the default root) and
    `~` roots are kept as written: they mean the same on the machine that reads them."""
    root = config.data.root
    if not root or root.startswith("~") or os.path.isabs(root):
        return config
    return replace(config, data=replace(config.data, root=os.path.abspath(root)))


def _train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: RunConfig,
    *,
    epoch: int,
    stage: str,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    place: Distributed,
    progress: bool,
) -> dict[str, float]:
    """One pass over the loader; returns the epoch's row of metrics.csv."""
    model.train()
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    correct = seen = 0
    margins: dict[int, torch.Tensor] = {}  # stage -> smallest landmark margin this epoch
    net = model.module if isinstance(model, DistributedDataParallel) else model
    gates = {
        int(stage): module.alpha
        for stage, module in net.attention.items()
        if isinstance(getattr(module, "alpha", None), torch.Tensor)
    }
    gate_sums = dict.fromkeys(gates, 0.0)  # stage -> sum over steps of alpha after the step
    steps = len(loader)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    channels_last = config.train.channels_last and device.type == "cuda"
    with _epoch_progress(progress, epoch, config.train.epochs, stage, steps) as advance:
        for step, (images, labels, _camids, _indices) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
            try:
                with autocast:
                    output = model(images)
            except torch.linalg.LinAlgError as err:
                raise _singular_landmarks(epoch, step, err) from None
            for module_stage, margin in net.landmark_margins().items():
                margins[module_stage] = torch.minimum(margins.get(module_stage, margin), margin)
            losses = reid_loss(
                output,
                labels,
                config.attention.ds_weight,
                label_smoothing=config.train.label_smoothing,
                triplet=config.train.triplet,
                triplet_margin=config.train.triplet_margin,
            )
            loss_value = losses["loss"].item()
            if not math.isfinite(loss_value):
                raise _diverged(
                    f"the loss became {loss_value} at epoch {epoch + 1}, step {step + 1}",
                    epoch,
                    "a lower train.lr, or --set train.amp=off",
                )
            optimizer.zero_grad(set_to_none=True)
            try:
                scaler.scale(losses["loss"]).backward()
            except torch.linalg.LinAlgError as err:  # the transposed solve of CSALR's backward
                raise _singular_landmarks(epoch, step, err) from None
            if config.train.grad_clip:
                scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
                nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            for gate_stage, alpha in gates.items():
                gate_sums[gate_stage] += float(alpha.detach())
            batch = labels.numel()
            for key in sums:
                sums[key] += losses[key].item() * batch
            predictions = output.part_logits.detach().float().softmax(-1).sum(1).argmax(-1)
            correct += int((predictions == labels).sum())
            seen += batch
            elapsed = time.perf_counter() - start
            # the running epoch mean, what metrics.csv stores for the epoch (this process's share)
            advance(loss=sums["loss"] / seen, images_per_second=seen * place.world_size / elapsed)
    seconds = time.perf_counter() - start
    # After the loop: a loader's workers are joined when it is exhausted, so theirs count too.
    cpu_seconds = _cpu_seconds() - cpu_start
    totals = torch.tensor([*sums.values(), correct, seen], dtype=torch.float64, device=device)
    stages = sorted(margins)
    worst = torch.stack([margins[s] for s in stages]).double() if stages else None
    if place.world_size > 1:
        dist.all_reduce(totals)
        if worst is not None:
            dist.all_reduce(worst, op=dist.ReduceOp.MIN)
    *loss_sums, correct_total, seen_total = totals.tolist()
    row = {"epoch": epoch + 1, "stage": stage}
    row.update({key: value / seen_total for key, value in zip(sums, loss_sums, strict=True)})
    row.update(
        {
            "lr": learning_rate(config, epoch),
            "train_accuracy": correct_total / seen_total,
            "images_per_second": seen_total / seconds,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "peak_memory_mib": _peak_memory_mib(device),
        }
    )
    for gate_stage in sorted(gates):  # the gate of eq. 2 / 17, mean over the epoch's steps
        row[f"alpha_stage{gate_stage}"] = gate_sums[gate_stage] / max(steps, 1)
    if worst is not None:
        c = config.attention.landmark_weight
        for stage_number, margin in zip(stages, worst.tolist(), strict=True):
            row[f"cond_bound_stage{stage_number}"] = landmark_condition_bound(margin, c)
    return row


# Warn when Varah's bound on cond(A_mm) passes this. LU in float32 returns F with a relative
# error of order cond x 2^-24 (6e-8): at 1e4 the landmark solve keeps at most three of float32's
# seven digits, and the bound rises fast once a landmark stops attending to itself (the path to
# the singular matrices that stopped runs from scratch with the paper's weight c = 1).
CONDITION_WARNING = 1e4


def _warn_if_ill_conditioned(row: dict[str, float], config: RunConfig) -> bool:
    """Print one warning naming the fix when a module's bound passes CONDITION_WARNING."""
    worst = {key: value for key, value in row.items() if key.startswith("cond_bound_stage")}
    bad = {key: value for key, value in worst.items() if value > CONDITION_WARNING}
    if not bad:
        return False
    key, value = max(bad.items(), key=lambda item: item[1])
    fix = (
        "train again with --set attention.landmark_weight=2, which bounds it by 3"
        if config.attention.landmark_weight < 2
        else "lower train.lr"
    )
    Console(stderr=True).print(
        f"[yellow]warning:[/] CSALR's landmark matrix after stage {key[-1]} is nearing singular "
        f"at epoch {row['epoch']} (condition bound {value:.3g} > {CONDITION_WARNING:g}, "
        f"metrics.csv {key}); if the loss jumps or training stops, {fix}",
        highlight=False,
        soft_wrap=True,
    )
    return True


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process (every thread) and its finished children (the
    DataLoader workers of loaders already exhausted): an epoch's cost on a shared machine,
    which wall-clock seconds overstate when other work competes for the cores."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _peak_memory_mib(device: torch.device) -> float:
    """CUDA: the most memory allocated since the epoch began; CPU: the process's resident
    high-water mark (it never falls, so it is the run's peak so far)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def landmark_condition_bound(margin: float, landmark_weight: float) -> float:
    """Varah's bound on cond_inf(A_mm) from its smallest diagonal margin: (1 + c) / margin.

    Each row of A_mm = softmax + cI is non-negative and sums to 1 + c, so ||A_mm||_inf = 1 + c,
    and ||A_mm^-1||_inf <= 1 / min_k (A_kk - sum_{j != k} A_kj). It bounds every A_mm seen.
    """
    return math.inf if margin <= 0 else (1 + landmark_weight) / margin


@contextmanager
def _epoch_progress(
    enabled: bool, epoch: int, epochs: int, stage: str, steps: int
) -> Iterator[Callable[..., None]]:
    """A Rich bar for one epoch: loss, images/s, ETA. Yields `advance(**fields)`."""
    if not enabled:
        yield lambda **_: None
        return
    columns = (
        TextColumn(f"epoch {epoch + 1}/{epochs} {stage}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[images_per_second]:.1f} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"), images_per_second=0.0)
        yield lambda **fields: bar.update(task, advance=1, **fields)


def _enter_stage(model: ReidNet, stage: str) -> None:
    if stage in ("pcb", "global"):
        return
    if not model.head.is_rpp:
        model.convert_to_rpp()
    if stage == "rpp-classifier":
        model.freeze_all_but_part_classifier()
    else:
        model.unfreeze_all()


def _build_optimizer(model: ReidNet, config: RunConfig) -> torch.optim.Optimizer:
    """SGD (the paper's) or Adam (the strong baseline's) with rates per group: trunk and
    attention modules at their multipliers of the base rate (0.1x in the paper presets), heads
    and deep-supervision classifiers at 1x.

    Each param group carries its `name` and `lr_mult`; groups without parameters are left out.
    Parameters that never train (BNNeck's bias) are left out too, so that no optimiser, whatever
    it does with a missing gradient, can move them.
    """
    train = config.train
    multipliers = {
        "trunk": train.trunk_lr_mult,
        "attention": train.attention_lr_mult,
        "new": 1.0,
    }
    frozen = {id(p) for p in getattr(model.head, "frozen_parameters", list)()}
    groups = []
    for name, params in model.parameter_groups().items():
        params = [p for p in params if id(p) not in frozen]
        if params:
            groups.append({"params": params, "name": name, "lr_mult": multipliers[name]})
    if train.optimizer == "adam":
        # L2 decay added to the gradient (torch's Adam), as the baseline's code, not AdamW.
        return torch.optim.Adam(groups, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(
        groups,
        lr=train.lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        nesterov=False,
    )


def _set_learning_rate(optimizer: torch.optim.Optimizer, config: RunConfig, epoch: int) -> None:
    base = learning_rate(config, epoch)
    for group in optimizer.param_groups:
        group["lr"] = base * group["lr_mult"]


def _wrap(model: nn.Module, place: Distributed, device: torch.device) -> nn.Module:
    if place.world_size == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _amp_dtype(config: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 with a scaler; full precision on CPU."""
    amp = config.train.amp
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def resume_config(
    folder: Path, overrides: Sequence[str] = (), *, preset: str | Path | None = None
) -> RunConfig:
    """The config a resumed run continues with: its checkpoint's own, with safe `--set`s.

    Only RESUMABLE_CHANGES may change; any other key given a new value is refused, naming it,
    because the epochs already trained were optimised under it (repeating the run's own value
    is harmless). A longer train.epochs extends the run. A `preset` given is refused unless it
    is the one the run was trained with, as a conflicting dataset is.
    """
    files = RunFiles(Path(folder))
    if not files.checkpoint.exists():
        raise ConfigError(
            f"--resume: {files.checkpoint} does not exist; drop --resume to start a new run"
        )
    saved = load_checkpoint(files.checkpoint).config
    if preset is not None and load_preset(preset).name != saved.name:
        raise ConfigError(
            f"--resume: {files.checkpoint} was trained with preset {saved.name}, not "
            f"{load_preset(preset).name}; drop --preset to resume it with its own settings, or "
            "start a new run with another --out"
        )
    for item in overrides:
        dotted = item.split("=", 1)[0].strip()
        section, _, key = dotted.partition(".")
        if (section, key) not in RESUMABLE_CHANGES and apply_overrides(saved, [item]) != saved:
            safe = ", ".join(f"{s}.{k}" for s, k in sorted(RESUMABLE_CHANGES))
            raise ConfigError(
                f"--resume: --set {dotted} cannot change for a run that has already trained "
                f"under it; a resumed run may change only {safe}; start a new run with --out"
            )
    config = apply_overrides(saved, overrides)
    return _extended(saved, config)


def _extended(saved: RunConfig, config: RunConfig) -> RunConfig:
    """`config` with a changed train.epochs checked, and for RPP the PCB stage kept."""
    added = config.train.epochs - saved.train.epochs
    if added < 0:
        raise ConfigError(
            f"--resume: train.epochs={config.train.epochs} is fewer than the run's "
            f"{saved.train.epochs}; a resumed run may only be extended"
        )
    if added and config.model.head == "rpp" and config.train.rpp_epochs == saved.train.rpp_epochs:
        train = replace(config.train, rpp_epochs=saved.train.rpp_epochs + added)
        config = replace(config, train=train)
    return config


def _resumable_checkpoint(files: RunFiles, config: RunConfig) -> tuple[Checkpoint, RunConfig]:
    """The checkpoint to resume and the config to go on with (an extended RPP run keeps its
    PCB stage); a change outside RESUMABLE_CHANGES is refused, naming the keys."""
    if not files.checkpoint.exists():
        raise ConfigError(
            f"--resume: {files.checkpoint} does not exist; drop --resume to start a new run"
        )
    state = load_checkpoint(files.checkpoint)
    config = _extended(state.config, config)
    saved, wanted = config_to_dict(state.config), config_to_dict(config)
    # an RPP run extended by _extended has its rpp_epochs grown with train.epochs
    extended_rpp = (
        wanted["model"]["head"] == "rpp"
        and wanted["train"]["rpp_epochs"] - saved["train"]["rpp_epochs"]
        == wanted["train"]["epochs"] - saved["train"]["epochs"]
    )
    changed = [
        f"{section}.{key}"
        for section in ("data", "model", "attention", "train")
        for key in wanted[section]
        if wanted[section][key] != saved[section][key]
        and (section, key) not in RESUMABLE_CHANGES
        and not ((section, key) == ("train", "rpp_epochs") and extended_rpp)
    ]
    if changed:
        raise ConfigError(
            f"--resume: {files.checkpoint} was trained with different {', '.join(changed)}; "
            "resume with the same settings or start a new run with --out"
        )
    if state.epoch >= config.train.epochs:
        raise ConfigError(
            f"--resume: {files.checkpoint} already completed all {config.train.epochs} epochs; "
            "resume with --set train.epochs=N (more than that) to train longer"
        )
    return state, config


def _evaluate_during_training(
    model: ReidNet, config: RunConfig, device: torch.device, place: Distributed
) -> dict[str, float]:
    """Rank-1, mAP and mINP on the query/gallery split, with the same code as `reidkit
    evaluate`."""
    if not place.is_main:
        return {}
    from reidkit.engine.evaluate import evaluate_model

    report = evaluate_model(model, config, device=device, progress=False)
    metrics = report.metrics
    return {"rank1": float(metrics.cmc[0]), "mAP": float(metrics.mAP), "mINP": float(metrics.mINP)}


def _remove_stale_temporaries(folder: Path) -> None:
    """A run killed mid-write (kill -9, power cut) leaves its temporary file, as large as a
    checkpoint; remove reidkit's own of the run folder and say so in one line."""
    removed = remove_stale_temporaries(folder)
    if removed:
        names = ", ".join(p.name for p in removed)
        Console(stderr=True).print(
            f"removed {len(removed)} temporary file(s) left in {folder} by an interrupted "
            f"run: {names}",
            highlight=False,
            soft_wrap=True,
        )


def _write_metrics(files: RunFiles, history: list[dict[str, float]]) -> None:
    frame = pd.DataFrame(history)
    with atomic_write(files.metrics) as temporary:
        frame.to_csv(temporary, index=False)


# Drawing curves.png costs about a second of CPU (matplotlib's constrained layout): nothing
# beside a real epoch, but most of an epoch of a small run. So it is drawn after the first
# epoch, then at most this often, and once more when the run stops for any reason.
CURVES_EVERY_SECONDS = 30.0


class CurvesPNG:
    """curves.png of a run, redrawn at most every CURVES_EVERY_SECONDS while it trains."""

    def __init__(self, path: Path, drawn_epochs: int) -> None:
        self.path = path
        self.drawn_epochs = drawn_epochs  # rows the file on disk shows
        self.drawn_at = -math.inf

    def refresh(self, history: list[dict[str, float]]) -> None:
        """Redraw if this is the first epoch drawn here or the file is half a minute old."""
        if time.monotonic() - self.drawn_at >= CURVES_EVERY_SECONDS:
            self.draw(history)

    def draw(self, history: list[dict[str, float]]) -> None:
        if history and len(history) != self.drawn_epochs:
            save_curves(pd.DataFrame(history), self.path)
            self.drawn_epochs, self.drawn_at = len(history), time.monotonic()


def plotted_loss_terms(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(column, legend label) of each loss term curves.png draws: all of L = L_id + L_tri +
    lambda sum L_DS that the run has. The triplet and deep-supervision terms only when they
    were on: a model without the triplet loss, or without attention modules, records 0."""
    terms = (
        ("loss", "total"),
        ("loss_parts", "identity (L_F / L_id)"),
        ("loss_triplet", "triplet"),
        ("loss_ds", "deep sup."),
    )
    optional = ("loss_triplet", "loss_ds")
    return [
        (key, label)
        for key, label in terms
        if key in frame and (key not in optional or bool(frame[key].abs().sum() > 0))
    ]


# One look per attention module's bound: lines that coincide (modules equally conditioned)
# stay visible as different markers, hollow and of different sizes.
BOUND_STYLES = (("o", "-", 7), ("s", "--", 5), ("^", ":", 4), ("D", "-.", 4))


def curves_figure(frame: pd.DataFrame):
    """The figure of curves.png: loss terms, training accuracy, rank-1/mAP where evaluated and
    CSALR's landmark condition bounds, per epoch (integer ticks), with a dotted line where a
    training stage begins (RPP's part classifier, then all of RPP) and legends below the axes,
    off the lines. An infinite bound (a singular landmark matrix) is drawn at a ceiling above
    every finite one, labelled inf."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    has_eval = "rank1" in frame and frame["rank1"].notna().any()
    bounds = [key for key in frame.columns if key.startswith("cond_bound_stage")]
    panels = 2 + has_eval + bool(bounds)
    figure = Figure(figsize=(4.4 * panels, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    epochs = frame["epoch"]
    for key, label in plotted_loss_terms(frame):
        axes[0].plot(epochs, frame[key], marker="o", markersize=3, label=label)
    axes[0].set(xlabel="epoch", ylabel="loss", title="training loss")
    axes[1].plot(epochs, frame["train_accuracy"] * 100, marker="o", markersize=3)
    axes[1].set(xlabel="epoch", ylabel="%", title="training accuracy")
    if has_eval:
        evaluated = frame[frame["rank1"].notna()]
        axes[2].plot(evaluated["epoch"], evaluated["rank1"] * 100, marker="o", label="rank-1")
        axes[2].plot(evaluated["epoch"], evaluated["mAP"] * 100, marker="o", label="mAP")
        axes[2].set(xlabel="epoch", ylabel="%", title="query / gallery")
    if bounds:
        _plot_bounds(axes[-1], epochs, frame[bounds])
    starts = []
    if "stage" in frame:
        stages = frame["stage"].tolist()
        starts = [
            (epoch, f"{before} \u2192 {stage}")
            for epoch, stage, before in zip(epochs.tolist()[1:], stages[1:], stages, strict=False)
            if stage != before
        ]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for epoch, change in starts:
            # between the last epoch of one stage and the first of the next, named along it
            ax.axvline(epoch - 0.5, color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                change,
                (epoch - 0.5, 1),
                xycoords=("data", "axes fraction"),
                xytext=(2, -3),
                textcoords="offset points",
                rotation=90,
                ha="left",
                va="top",
                fontsize=7,
                color="dimgrey",
            )
        if ax.get_legend_handles_labels()[0]:
            below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.18), "frameon": False}
            ax.legend(ncol=2, fontsize=8, **below)
    return figure


def _plot_bounds(ax, epochs: pd.Series, bounds: pd.DataFrame) -> None:
    """The condition bounds on a log axis; an infinite one drawn at a labelled ceiling."""
    finite = bounds.to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    highest = max([CONDITION_WARNING, *finite.tolist()])
    ceiling = 10 ** (math.floor(math.log10(highest)) + 2)  # a decade of room above the rest
    for (key, values), (marker, line, size) in zip(
        bounds.items(), itertools.cycle(BOUND_STYLES), strict=False
    ):
        shown = values.where(~np.isinf(values), ceiling)  # NaN (no value) stays a gap
        ax.plot(
            epochs,
            shown,
            marker=marker,
            linestyle=line,
            markersize=size,
            markerfacecolor="none",
            label=f"stage {key.removeprefix('cond_bound_stage')}",
        )
    ax.axhline(CONDITION_WARNING, color="red", linestyle="--", linewidth=1, label="warning")
    infinite = np.isinf(bounds.to_numpy(dtype=float))
    if infinite.any():
        at = infinite.any(axis=1)
        ax.scatter(epochs[at], [ceiling] * int(at.sum()), marker="^", s=40, color="red", zorder=3)
        ax.axhline(ceiling, color="black", linewidth=0.8)
        ax.annotate(
            "singular landmark matrix",
            (0, ceiling),
            xycoords=("axes fraction", "data"),
            xytext=(3, 3),
            textcoords="offset points",
            fontsize=7,
        )
    ax.set_yscale("log")
    ax.set_ylim(top=ceiling * 4)
    if infinite.any():
        _label_inf_at(ax.yaxis, ceiling)
    ax.set(xlabel="epoch", ylabel="bound on cond(A_mm)", title="CSALR landmark conditioning")


def _label_inf_at(axis, ceiling: float) -> None:
    """Write `inf` for the tick at the ceiling infinite bounds are drawn at (10^k otherwise)."""
    from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation

    powers = LogFormatterSciNotation()
    powers.set_axis(axis)

    def label(value: float, pos: int | None) -> str:
        return "inf" if math.isclose(value, ceiling) else powers(value, pos)

    axis.set_major_formatter(FuncFormatter(label))


def save_curves(frame: pd.DataFrame, path: Path) -> None:
    """curves.png (see `curves_figure`), written by rename."""
    figure = curves_figure(frame)
    with atomic_write(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")


def _toml_safe(value):
    """TOML has no null: drop empty optional values."""
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items() if v is not None}
    return value
