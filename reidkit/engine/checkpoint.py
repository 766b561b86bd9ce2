"""Self-describing checkpoints: weights, config as plain data, training state; saved atomically.

Every value is a tensor, a number, a string, a list or a dict, so `torch.load(weights_only=True)`
reads it without unpickling arbitrary objects: a checkpoint from someone else is safe to open.
Every tensor's bytes are covered by a SHA-256 stored in the file and checked when it loads:
torch does not check the zip's CRCs, so a flipped byte would otherwise load as a wrong weight.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import pickletools
import random
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reidkit import __version__
from reidkit.config import RunConfig, config_from_dict, config_to_dict
from reidkit.errors import CheckpointError, ConfigError
from reidkit.models.net import ReidNet, build_model
from reidkit.outputs import atomic_write

FORMAT = "reidkit-checkpoint"
# 2: a "checksum" of every tensor. Version 1 files (without one) still load, unchecked.
FORMAT_VERSION = 2


@dataclass
class Checkpoint:
    """What a checkpoint file holds, typed."""

    config: RunConfig
    model: dict[str, torch.Tensor]
    num_ids: int
    epoch: int  # completed epochs (0-based count); training resumes at this epoch
    head: str  # "pcb", "rpp" or "global": the head the weights belong to (RPP starts as PCB)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    version: str = __version__


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`.

    A crash or kill at any moment leaves either the previous file or the new one, never a
    truncated `path`.
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "reidkit": checkpoint.version,
        "config": config_to_dict(checkpoint.config),
        "model": checkpoint.model,
        "num_ids": int(checkpoint.num_ids),
        "epoch": int(checkpoint.epoch),
        "head": checkpoint.head,
        "optimizer": checkpoint.optimizer,
        "scheduler": checkpoint.scheduler,
        "rng": checkpoint.rng,
        "history": checkpoint.history,
    }
    payload["checksum"] = {"sha256": tensor_checksum(payload)}
    with atomic_write(path, durable=True) as temporary:
        with open(temporary, "wb") as f:
            try:
                torch.save(payload, f)
            except RuntimeError as err:
                # Interrupted by Ctrl-C or a full disk, torch's zip writer still finalises the
                # archive on the way out, fails ("unexpected pos") and raises that instead:
                # re-raise the cause, which the caller reports in one line.
                cause = err.__context__
                if isinstance(cause, KeyboardInterrupt | OSError):
                    raise cause from None
                raise


def tensor_checksum(payload: Any) -> str:
    """SHA-256 over every tensor in `payload` (nested dicts and lists): where it sits, its
    dtype, shape and bytes. A "checksum" entry is left out: it is what this computes."""
    digest = hashlib.sha256()
    for where, tensor in _tensors(payload, ()):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(f"{where}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(data.numpy()))
    return digest.hexdigest()


def _tensors(value: Any, where: tuple[str, ...]):
    """(path, tensor) of every tensor under `value`, in an order that survives a save/load."""
    if isinstance(value, torch.Tensor):
        yield "/".join(where), value
    elif isinstance(value, dict):
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            if not (where == () and key == "checksum"):
                yield from _tensors(value[key], (*where, str(key)))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _tensors(item, (*where, str(i)))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint without pickle; anything else fails with one line naming the file."""
    path = Path(path)
    if path.is_dir():
        inside = path / "last.pt"
        expected = (
            f"the checkpoint file inside it, {inside}"
            if inside.is_file()
            else "a checkpoint file written by `reidkit train` (runs/<name>/last.pt)"
        )
        raise CheckpointError(f"checkpoint {path} is a folder, not a file; give {expected}")
    if not path.is_file():
        if os.path.exists(path):  # a device, a pipe or a socket: reading it would not end
            raise CheckpointError(
                f"checkpoint {path} is not a regular file (a device, pipe or socket); give a "
                "checkpoint file written by `reidkit train` (runs/<name>/last.pt)"
            )
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `reidkit train`")
    try:
        with warnings.catch_warnings():
            # torch warns about a pickle protocol it does not expect before it refuses the
            # file; the refusal below is the one line the user gets
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load reports wrong bytes with many exception types
        try:
            what = _what_it_is_not(path, err)
        except OSError as unreadable:
            what = f"cannot be read ({unreadable.strerror or unreadable}); check its permissions"
        raise CheckpointError(f"{path} {what}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a reidkit checkpoint (no '{FORMAT}' marker); give "
            "a file written by `reidkit train` (runs/<name>/last.pt)"
        )
    version = payload.get("format_version", 0)
    if not _is_int(version):
        raise _damaged(path, f"format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by reidkit {payload.get('reidkit')} in a newer format; "
            f"upgrade reidkit (this is {__version__})"
        )
    _check_payload(path, payload)
    _check_tensors(path, payload, version)
    try:
        config = config_from_dict(payload["config"], source=f"{path} config")
    except ConfigError as err:
        raise CheckpointError(f"{path}: its config does not load here: {err}") from None
    return Checkpoint(
        config=config,
        model=payload["model"],
        num_ids=payload["num_ids"],
        epoch=payload["epoch"],
        head=str(payload.get("head", config.model.head)),
        optimizer=payload.get("optimizer"),
        scheduler=payload.get("scheduler"),
        rng=payload.get("rng"),
        history=list(payload.get("history", [])),
        version=str(payload.get("reidkit", "unknown")),
    )


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive holding data.pkl and tensors
PICKLE_PROTOCOL = b"\x80"  # pickles of protocol 2+ (and legacy torch.save files) start so
# Opcodes that name or call a Python callable: a pickle with them holds objects, not data.
OBJECT_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}
NOT_A_CHECKPOINT = "give a file written by `reidkit train` (runs/<name>/last.pt)"
PICKLED_OBJECTS = (
    "holds Python objects that only pickle can load, which could run code; reidkit "
    "checkpoints never need it (re-save the weights as a plain state dict)"
)


def _what_it_is_not(path: Path, err: Exception) -> str:
    """Why `torch.load(weights_only=True)` refused `path`, as the rest of one line.

    torch reports random bytes, text and pickled objects alike as an unpickling error, so
    the file's first bytes decide what it is; pickle is named only for a pickle with objects.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return f"is empty, not a checkpoint; {NOT_A_CHECKPOINT}"
    if head == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
                data = archive.read(pickles[0]) if pickles else None
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error):
            return (
                "is truncated or damaged: it starts as a PyTorch file but its end is missing or "
                "corrupt; use an intact copy or train again"
            )
        if data is None:
            return f"is a zip archive, not a PyTorch file; {NOT_A_CHECKPOINT}"
        # the weights-only unpickler refused a well-formed pickle: it names objects
        if isinstance(err, pickle.UnpicklingError) and _pickle_opcodes(data) is not None:
            return PICKLED_OBJECTS
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"is a damaged PyTorch file ({first}); use an intact copy or train again"
    if head.startswith(PICKLE_PROTOCOL):
        opcodes = _pickle_opcodes(path.read_bytes())
        if opcodes is not None and opcodes & OBJECT_OPCODES:
            return PICKLED_OBJECTS
        if opcodes is not None:
            return f"is a pickle of plain data, not a PyTorch file; {NOT_A_CHECKPOINT}"
    return f"is not a PyTorch file; {NOT_A_CHECKPOINT}"


def _pickle_opcodes(data: bytes) -> set[str] | None:
    """The opcode names of the pickle `data` starts with; None unless it is a whole pickle."""
    try:
        return {opcode.name for opcode, _arg, _pos in pickletools.genops(data)}
    except Exception:  # other bytes fail in many ways: unknown opcode, no STOP, bad argument
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is a damaged reidkit checkpoint: {what}; use an intact copy or train again"
    )


def _check_payload(path: Path, payload: dict[str, Any]) -> None:
    """Refuse, naming the key, a payload with the marker but missing or mistyped entries."""
    missing = [key for key in ("config", "model", "num_ids", "epoch") if key not in payload]
    if missing:
        raise _damaged(path, f"it lacks {', '.join(missing)}")
    if not isinstance(payload["config"], dict):
        raise _damaged(path, "config is not a table of settings")
    model = payload["model"]
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    ):
        raise _damaged(path, "model is not a state dict of named tensors")
    if not _is_int(payload["num_ids"]) or payload["num_ids"] < 1:
        raise _damaged(path, f"num_ids {payload['num_ids']!r} is not a positive integer")
    if not _is_int(payload["epoch"]) or payload["epoch"] < 0:
        raise _damaged(path, f"epoch {payload['epoch']!r} is not a count of epochs")
    if payload.get("head", "pcb") not in ("pcb", "rpp", "global"):
        raise _damaged(path, f"head {payload['head']!r} is none of pcb, rpp, global")
    for key in ("optimizer", "scheduler", "rng"):
        if payload.get(key) is not None and not isinstance(payload[key], dict):
            raise _damaged(path, f"{key} is not a table")
    if not isinstance(payload.get("history", []), list):
        raise _damaged(path, "history is not a list of epochs")


def _check_tensors(path: Path, payload: dict[str, Any], version: int) -> None:
    """Refuse tensors that differ from those saved (the checksum) or weights that are not
    finite (NaN or infinity: every feature of such a model is NaN)."""
    if version >= 2:
        stored = payload.get("checksum")
        if not isinstance(stored, dict) or not isinstance(stored.get("sha256"), str):
            raise _damaged(path, "it lacks the checksum of its tensors")
        if stored["sha256"] != tensor_checksum(payload):
            raise _damaged(
                path,
                "its tensors do not match the checksum stored in it (bytes changed after it "
                "was written: a bad disk, copy or download)",
            )
    for name, tensor in payload["model"].items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{path} holds non-finite weights: {bad:,} of the {tensor.numel():,} values of "
                f"{name} are NaN or infinite, so every feature would be NaN; use a checkpoint "
                "from before the run diverged, or train again"
            )


def capture_rng() -> dict[str, Any]:
    """Random states of torch (CPU and CUDA), numpy and Python as checkpoint-safe plain data."""
    np_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def model_from_checkpoint(checkpoint: Checkpoint, source: Path | str = "the checkpoint") -> ReidNet:
    """The network a checkpoint describes, with its weights; ImageNet files are not needed.

    `source` (the file) names it when its weights do not fit its config: missing, unexpected
    or differently shaped tensors, summarised in one line.
    """
    config = checkpoint.config
    # The head recorded is the one the weights belong to (an RPP run saves PCB weights first).
    model_config = replace(config.model, pretrained=False, head=checkpoint.head)
    model = build_model(replace(config, model=model_config), checkpoint.num_ids)
    expected = model.state_dict()
    missing = [key for key in expected if key not in checkpoint.model]
    unexpected = [key for key in checkpoint.model if key not in expected]
    reshaped = [
        f"{key} is {_shape(checkpoint.model[key])} in the file, {_shape(expected[key])} here"
        for key in expected
        if key in checkpoint.model and checkpoint.model[key].shape != expected[key].shape
    ]
    if missing or unexpected or reshaped:
        found = []
        if reshaped:
            found.append(f"{len(reshaped)} of another shape (e.g. {reshaped[0]})")
        if missing:
            found.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            found.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{source}: its weights do not fit its own config (num_ids {checkpoint.num_ids}, "
            f"head {checkpoint.head}): {'; '.join(found)}; it was edited or written by an "
            "incompatible reidkit: use an intact checkpoint or train again"
        )
    model.load_state_dict(checkpoint.model)
    return model


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "a scalar"


def load_model(path: Path) -> tuple[ReidNet, Checkpoint]:
    """`load_checkpoint` + `model_from_checkpoint`, in evaluation mode on the CPU."""
    checkpoint = load_checkpoint(path)
    return model_from_checkpoint(checkpoint, path).eval(), checkpoint


def checkpoint_digest(path: Path) -> str:
    """SHA-256 of a checkpoint file: which weights made a set of features.

    A path alone does not say it: `train` rewrites last.pt after every epoch. Features and
    galleries record this digest, so a shard of another run or a query embedded by other
    weights is refused rather than mixed in. About a second per GB.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err.strerror or err})") from None
    return digest.hexdigest()
