"""Model cost: training images/s and memory per image of PCB with and without attention.

    python bench/model.py                             # every model, batch 8 on CPU
    python bench/model.py --models pcb,pcb-csalr-g2 --batch 4 --repeats 3
    python bench/model.py --models mobilenet          # the MobileNetV2 presets, side by side
    python bench/model.py --device cuda --json model.json   # batch 64, bf16 autocast

The paper's Table 5 (section 4.7) measured side by side: ResNet-50 (last stride 1, random
weights: the cost does not depend on them) at 384x128 with the PCB head, 751 identities as
Market-1501, attention after stages 1-3 with deep supervision, as in the paper. One step is
what `reidkit train` does per batch: forward (bf16 autocast on CUDA), the loss of
``reidkit.engine.train.reid_loss`` (eq. 18), backward, an SGD step with momentum.

Memory per image is the peak rise of one training step above the warmed-up state (weights,
gradients and momentum already allocated) divided by the batch: the activations and the
temporaries of forward and backward, which grow with the batch. Parameters, gradients and
momentum are a fixed cost per model, printed apart. Each model runs in its own processes
(bench/measure.py says how time and memory are taken), and the table prints the increase
over PCB beside the paper's.

The mobilenet-* rows are the MobileNetV2 presets as they train (random weights: the cost does
not depend on them), at their own 192x64 input with 743 identities (the cuhk03-subset's), each
attention row beside its own plain preset: mobilenet-pcb for the PCB rows, mobilenet-bot for
the strong baseline's. The step is the same (eq. 18 loss without the triplet term, SGD).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/model.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from measure import (  # noqa: E402 - after the path set-up above
    BUSY_CORES_LIMIT,
    MALLOC_CHOICES,
    format_table,
    load_average,
    machine_line,
    measure_memory,
    measure_side_by_side,
    paired_ratio,
    serve,
    write_rows_json,
)

NUM_IDS = 751  # Market-1501's training identities
HEIGHT, WIDTH = 384, 128


@dataclass(frozen=True)
class Spec:
    kind: str  # attention kind: "none", "sa", "csa" or "csalr"
    groups: int = 2
    materialise: bool = False  # SA with the n x n map in memory (the paper's cost)
    recompute: bool = False  # attention.recompute: modules re-run in backward
    projection: str = "landmarks"  # attention.projection for CSALR
    # The paper's Table 5: memory (MB/image) and FPS, None where it has no row.
    paper_mb: float | None = None
    paper_fps: float | None = None
    # A shipped preset to measure as it trains (its arch, input, head, attention), with `sets`
    # on top; empty: ResNet-50 PCB at the paper's 384x128, as Table 5.
    preset: str = ""
    sets: tuple[str, ...] = ()
    baseline: str = "pcb"  # the row the increases are over
    landmarks: int = 96  # per group, for the note


# SA and CSA in the CSALR twin's places and widths on the MobileNetV2 PCB preset
MOBILENET_MODULES = ("attention.stages=1,2,3", "attention.qk_ratio=1.0")


MODELS: dict[str, Spec] = {
    "pcb": Spec("none", paper_mb=137.64, paper_fps=581.81),
    # The paper's SA holds the n x n map; reidkit's SA runs SDPA's flash kernel instead.
    "pcb-sa-mat": Spec("sa", 1, materialise=True, paper_mb=300.68, paper_fps=266.67),
    "pcb-sa": Spec("sa", 1),
    "pcb-csa": Spec("csa", 2),
    "pcb-csalr-g1": Spec("csalr", 1, paper_mb=165.00, paper_fps=507.93),
    "pcb-csalr-g2": Spec("csalr", 2, paper_mb=192.25, paper_fps=460.43),
    "pcb-csalr-g4": Spec("csalr", 4, projection="map", paper_mb=221.97, paper_fps=418.30),
    "pcb-csalr-g8": Spec("csalr", 8, projection="map", paper_mb=254.75, paper_fps=380.95),
    "pcb-csalr-g2-recompute": Spec("csalr", 2, recompute=True),
    "mobilenet-pcb": Spec("none", preset="mobilenet-pcb", baseline="mobilenet-pcb"),
    "mobilenet-pcb-sa": Spec(
        "sa", 1, preset="mobilenet-pcb", sets=MOBILENET_MODULES, baseline="mobilenet-pcb"
    ),
    "mobilenet-pcb-csa": Spec(
        "csa", 2, preset="mobilenet-pcb", sets=MOBILENET_MODULES, baseline="mobilenet-pcb"
    ),
    "mobilenet-pcb-csalr": Spec(
        "csalr", 2, preset="mobilenet-pcb-csalr", baseline="mobilenet-pcb", landmarks=24
    ),
    "mobilenet-bot": Spec("none", preset="mobilenet-bot", baseline="mobilenet-bot"),
    "mobilenet-bot-csalr": Spec(
        "csalr", 2, preset="mobilenet-bot-csalr", baseline="mobilenet-bot", landmarks=24
    ),
}
BASELINE = "pcb"
# --models takes these group names too
GROUPS = {"mobilenet": tuple(name for name in MODELS if name.startswith("mobilenet-"))}
MOBILENET_IDS = 743  # the cuhk03-subset's training identities


def select_models(text: str) -> list[str]:
    """`--models`: all, a group (mobilenet) or comma-separated names; a row's baseline is
    measured with it even when not asked for, so every increase has its reference."""
    if text == "all":
        names = list(MODELS)
    else:
        names = []
        for item in text.split(","):
            names += list(GROUPS.get(item, (item,)))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        choices = ", ".join([*MODELS, *GROUPS])
        raise SystemExit(f"unknown model(s) {unknown}; choose from {choices}")
    for name in list(names):
        base = MODELS[name].baseline
        if base not in names:
            names.insert(0, base)
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--amp",
        choices=("auto", "off", "bf16"),
        default="auto",
        help="bfloat16 autocast; auto: on CUDA only, as `reidkit train` does",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument(
        "--retries", type=int, default=3, help="rounds run again when others kept cores busy"
    )
    parser.add_argument(
        "--malloc",
        choices=sorted(MALLOC_CHOICES),
        default="retain",
        help="glibc settings while timing: keep freed memory for the next step (retain), or "
        "glibc's defaults, which fault memory back in every step (bench/measure.py)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this file")
    # Internal: the measuring process of one model, a timing worker or a memory run.
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- one model (in its own process) --------------------------------------------------------------


def build_step(spec: Spec, batch: int, device: str, amp: bool):
    """One training step of the model, and its parameter count."""
    import contextlib

    import torch

    from reidkit.config import RunConfig, apply_overrides, load_preset
    from reidkit.engine.train import reid_loss
    from reidkit.models.net import build_model

    overrides = [
        "model.pretrained=false",
        f"attention.kind={spec.kind}",
        f"attention.groups={spec.groups}",
        f"attention.recompute={str(spec.recompute).lower()}",
        f"attention.projection={spec.projection}",
    ]
    if spec.preset:
        config = load_preset(spec.preset, [*overrides, *spec.sets])
        num_ids = MOBILENET_IDS
    else:
        sizes = [f"data.height={HEIGHT}", f"data.width={WIDTH}"]
        config = apply_overrides(RunConfig(), [*overrides, *sizes])
        num_ids = NUM_IDS
    height, width = config.data.height, config.data.width
    torch.manual_seed(0)
    net = build_model(config, num_ids)
    for module in net.attention.values():
        if spec.materialise:
            module.materialise = True
        with torch.no_grad():
            module.alpha.fill_(0.1)  # a trained value: the residual path carries attention
    net.to(device).train()
    memory_format = torch.contiguous_format
    if device == "cuda" and config.train.channels_last:
        memory_format = torch.channels_last
        net.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(
        net.parameters(),
        lr=0.01,
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=gen).to(device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_ids, (batch,), generator=gen).to(device)

    def step():
        autocast = torch.autocast(device, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with autocast:
            output = net(images)
        loss = reid_loss(output, labels, config.attention.ds_weight)["loss"]
        loss.backward()
        optimizer.step()
        # In place: gradients stay allocated like the weights and momentum, so the measured
        # rise is the per-batch memory alone.
        optimizer.zero_grad(set_to_none=False)

    params = sum(p.numel() for p in net.parameters())
    return step, params


def run_one(args: argparse.Namespace) -> None:
    """The internal measuring process for ``--one MODEL``: a worker, or one memory step."""
    import torch

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    step, params = build_step(MODELS[args.one], args.batch, device, args.amp == "bf16")
    if args.memory:
        print(json.dumps({"peak_mib": measure_memory(step, device, warmup=args.warmup)}))
    else:
        serve(step, device, warmup=args.warmup, info={"params": params, "device": device})


# ---- the side-by-side run ---------------------------------------------------------------------


def note(spec: Spec) -> str:
    where = [f"{spec.preset} (MobileNetV2, 192x64)"] if spec.preset else []
    if spec.kind == "none":
        return ", ".join([*where, "no attention"])
    parts = [*where, f"{spec.kind}, {spec.groups} group{'s' if spec.groups > 1 else ''}"]
    if spec.kind == "sa":
        parts.append("materialised n x n" if spec.materialise else "SDPA")
    if spec.kind == "csalr":
        parts.append(f"{spec.landmarks} landmarks")
        parts.append(f"projection {spec.projection}")
    if spec.recompute:
        parts.append("attention.recompute=true")
    return ", ".join(parts)


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.1f}%"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        run_one(args)
        return 0

    import os

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    batch = args.batch or (64 if device == "cuda" else 8)
    amp = args.amp if args.amp != "auto" else ("bf16" if device == "cuda" else "off")
    threads = args.threads or os.cpu_count() or 1
    names = select_models(args.models)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    sizes = [f"ResNet-50 PCB at {HEIGHT}x{WIDTH}, {NUM_IDS} ids"]
    if any(MODELS[n].preset for n in names):
        sizes.append(f"MobileNetV2 presets at 192x64, {MOBILENET_IDS} ids")
    header = [
        f"training step, {' / '.join(sizes)}, batch {batch}, "
        f"{device}"
        + (f", {threads} threads, malloc {args.malloc}" if device == "cpu" else "")
        + f", amp {amp}; "
        f"{machine_line(device)}",
        f"load average at start: {load_average()}",
    ]
    log(header[0])
    started = time.perf_counter()
    script = Path(__file__).resolve()
    rows: list[dict[str, object]] = []
    common = [
        *("--batch", str(batch), "--device", device, "--amp", amp, "--warmup", str(args.warmup))
    ]
    commands = {name: [sys.executable, str(script), "--one", name, *common] for name in names}
    results = measure_side_by_side(
        commands,
        device=device,
        threads=threads,
        repeats=args.repeats,
        retries=args.retries,
        malloc=args.malloc,
        log=log,
    )
    for name in names:
        result = results[name]
        rows.append({"model": name, **asdict(MODELS[name]), "batch": batch, **result})
        if "error" in result:
            log(f"{name}: FAILED {result['error']}")
        else:
            log(
                f"{name}: {result['ms']:.0f} ms/step (runs {result['ms_runs']}), "
                f"peak {result['peak_mib'] or 0:.0f} MiB"
            )

    for row in rows:
        if "error" in row:
            continue
        row["images_per_s"] = 1000 * batch / row["ms"]
        if row["peak_mib"] is not None:
            row["mib_per_image"] = row["peak_mib"] / batch
    measured = {r["model"]: r for r in rows if "error" not in r}
    paper_base = MODELS[BASELINE]
    for row in rows:
        if row["paper_fps"] is not None:
            row["paper_time_increase"] = paper_base.paper_fps / row["paper_fps"] - 1
            row["paper_memory_increase"] = row["paper_mb"] / paper_base.paper_mb - 1
        base = measured.get(MODELS[row["model"]].baseline)
        if base is None or "error" in row:
            continue
        row["time_increase"] = paired_ratio(row["ms_runs"], base["ms_runs"]) - 1
        if row.get("mib_per_image") is not None and base.get("mib_per_image"):
            row["memory_increase"] = row["mib_per_image"] / base["mib_per_image"] - 1

    took = time.perf_counter() - started
    header.append(f"load average at end: {load_average()}; took {took:.0f} s")
    header.append(
        "img/s: batch / median step time; time/img: increase over the row's plain model (PCB; "
        "a mobilenet row: its preset without attention) in time per training image, the "
        "median of the per-round ratios (paper: its FPS ratio, FPS_PCB / FPS - 1)"
    )
    header.append(
        "MiB/img: "
        + (
            "max_memory_allocated in one step above memory_allocated before it"
            if device == "cuda"
            else "peak resident-set rise of the measuring process in one step above its "
            "warmed-up state"
        )
        + ", over the batch; weights, gradients and momentum (fixed MiB) are allocated "
        "before the step and not counted; mem/img: increase over the same plain model (paper: "
        "MB/image ratio)"
    )
    if device == "cpu":
        header.append(
            "others: the most cores other processes kept busy in a timed round (a round over "
            f"{BUSY_CORES_LIMIT} is run again, up to --retries rounds in all)"
        )
    if args.json:
        write_rows_json(args.json, header, vars(args), rows)

    columns = ["model", "params M", "fixed MiB", "ms/step", "img/s", "time/img", "paper"]
    columns += ["MiB/img", "mem/img", "paper"]
    if device == "cpu":
        columns.append("others")
    columns.append("note")
    table_rows = []
    for row in rows:
        paper = [percent(row.get("paper_time_increase")), percent(row.get("paper_memory_increase"))]
        if "error" in row:
            cells = [row["model"], "", "", "failed", "", "", paper[0], "", "", paper[1]]
            table_rows.append([*cells, *([""] if device == "cpu" else []), str(row["error"])])
            continue
        # Weights, gradients and SGD momentum: three float32 copies of the parameters.
        fixed = 3 * 4 * row["params"] / 2**20
        cells = [
            row["model"],
            f"{row['params'] / 1e6:.2f}",
            f"{fixed:.0f}",
            f"{row['ms']:.0f}",
            f"{row['images_per_s']:.2f}" if device == "cpu" else f"{row['images_per_s']:.1f}",
            percent(row.get("time_increase")),
            paper[0],
            "n/a" if row.get("mib_per_image") is None else f"{row['mib_per_image']:.1f}",
            percent(row.get("memory_increase")),
            paper[1],
        ]
        if device == "cpu":
            busy = row.get("busy_cores")
            cells.append("" if busy is None else f"{busy:.2f}")
        table_rows.append([*cells, note(MODELS[row["model"]])])
    for line in header:
        print(line)
    title = "training cost per image, beside the paper's Table 5 (increase over the plain model)"
    print(format_table(title, columns, table_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
