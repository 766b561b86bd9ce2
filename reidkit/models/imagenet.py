"""ImageNet trunk weights: find the file (a given path, else torch's hub cache), load it strictly.

Shared by every trunk (ResNet, MobileNetV2): each describes its files in a `WeightSource`;
the lookup, the offline message and the key-by-key check live here once.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from reidkit.errors import CheckpointError

__all__ = [
    "WEIGHTS_URL",
    "WeightSource",
    "fetch_weights",
    "find_or_fetch",
    "load_imagenet_weights",
    "read_state_dict",
]

WEIGHTS_URL = "https://download.pytorch.org/models/{file}"
_REACHABILITY_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class WeightSource:
    """Where one trunk's ImageNet weights come from and how a file's names reach the model.

    `files` are looked for in torch's hub cache, preferred first; `download` is the one fetched
    there when its host answers (None: nothing to download). `by_hand` is the phrase that tells
    a user offline how to get a file. Keys under `ignored` (an ImageNet classifier, which
    reidkit's heads replace) are dropped from the file and never compared. `translate` renames
    a file's keys to the model's own (another layout of the same tensors); identity if None.
    """

    arch: str
    family: str  # what the file is, in messages: "torchvision ResNet", "MobileNetV2"
    files: tuple[str, ...]
    download: str | None
    by_hand: str
    ignored: tuple[str, ...] = ()
    translate: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None


def _reachable(host: str, port: int = 443, timeout: float = _REACHABILITY_TIMEOUT_S) -> bool:
    """Whether `host:port` accepts a TCP connection within `timeout` seconds (DNS included)."""
    answered: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.append(True)
        except OSError:
            pass

    # A thread bounds the whole probe: create_connection's timeout does not cover the name
    # lookup, which can stall for far longer on a machine without a resolver.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def fetch_weights(url: str, destination: Path) -> bool:
    """Download `url` to `destination` when its host answers quickly; False when unreachable.

    The quick probe keeps an offline machine from waiting on a long HTTP timeout.
    """
    host = url.split("/")[2]
    if not _reachable(host):
        return False
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes to a temporary file and renames it, so a broken transfer leaves no half file.
        torch.hub.download_url_to_file(url, str(destination), progress=True)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(
            f"downloading {url} to {destination} failed ({err}); place the file there by hand "
            "or train from scratch with --set model.pretrained=false"
        ) from None
    return True


def find_or_fetch(source: WeightSource, fetch: Callable[[str, Path], bool] | None = None) -> Path:
    """`source`'s file in torch's hub cache; downloaded there when its host is reachable."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in source.files:
        if (folder / name).is_file():
            return folder / name
    # Looked up at call time so tests (and callers) can swap in a fake for the network step.
    fetch = fetch_weights if fetch is None else fetch
    if source.download is not None:
        name = source.download.rsplit("/", 1)[-1]
        if fetch(source.download, folder / name):
            return folder / name
        unreachable = f" and {source.download.split('/')[2]} is unreachable"
    else:
        unreachable = ""
    raise CheckpointError(
        f"ImageNet weights for {source.arch} not found{unreachable}: place {source.by_hand} in "
        f"{folder}, or give its path with --set model.weights=PATH, or train from scratch with "
        "--set model.pretrained=false"
    )


def _name_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} key(s): {shown}{more}"


def read_state_dict(file: Path, family: str) -> dict[str, Tensor]:
    """A flat name -> tensor mapping from a tensor-only PyTorch file; one line otherwise."""
    if not file.is_file():
        raise CheckpointError(f"weight file {file} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many different types for a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{file} is not a loadable tensor-only PyTorch weight file ({reason})"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{file} is not a {family} state dict (expected a flat name -> tensor mapping)"
        )
    return dict(state)


def load_imagenet_weights(
    model: nn.Module,
    path: str | Path | None,
    source: WeightSource,
    *,
    fetch: Callable[[str, Path], bool] | None = None,
) -> Path:
    """Copy an ImageNet weight file into `model`, strictly by name; returns the file used.

    `path=None` looks for `source.files` in `torch.hub.get_dir()/checkpoints` and, when absent,
    downloads `source.download` there if its host answers within a few seconds (`fetch`,
    default `fetch_weights`, does that step). Keys under `source.ignored` are left out on both
    sides; any other missing or unexpected key, or a shape mismatch, fails in one line naming
    the first few, and nothing is loaded. BatchNorm's `num_batches_tracked` may be absent
    (older files lack it; BN fills it in).
    """
    file = find_or_fetch(source, fetch) if path is None else Path(path).expanduser()
    state = read_state_dict(file, source.family)
    if source.translate is not None:
        state = source.translate(state)

    def kept(mapping: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in mapping.items() if not k.startswith(source.ignored)}

    expected, given = kept(model.state_dict()), kept(state)
    missing = [k for k in expected if k not in given and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_name_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {_name_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch (file vs model) in {_name_keys(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{file} does not fit {source.arch}: {'; '.join(problems)}. "
            f"Is it an ImageNet {source.family} file for {source.arch}?"
        )
    # Every kept key has been checked above; strict=False only lets the ignored ones (and a
    # missing num_batches_tracked) keep their own values.
    model.load_state_dict(given, strict=False)
    return file
