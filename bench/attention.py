"""Attention cost: forward+backward time and peak memory of SA, CSA and CSALR, side by side.

    python bench/attention.py                          # every config, stages 1-3, batch 8
    python bench/attention.py --quick                  # stage 1, the headline configs
    python bench/attention.py --shapes 1 --configs sa-mat,csalr-g2 --json attention.json

The three feature maps an attention module sees in the paper's network (a 384x128 input:
256x96x32, 512x48x16 and 1024x24x8), for each configuration two measurements:

- core: the attention alone on grouped q, k, v (``full_attention_materialised``,
  ``full_attention``, ``csa_attention``, ``csalr_attention``), q/k at C/4 channels;
- module: the whole module (Q/K/V convs, core, fuse conv, gated residual) on a C x H x W map.

Both are forward + backward into every input (and parameter), and are reported beside
materialised SA (the paper's cost) of the same part and shape. Each measurement runs in its
own process (bench/measure.py says how time and memory are taken). The hand-written autograd
Functions reidkit had before its plain-autograd rewrite were timed beside today's modules for
issue 10; that table is in bench/RESULTS.md, which names the commit that holds the old code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/attention.py` from a checkout
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

# The maps after ResNet-50 stages 1-3 for a 384x128 input: channels, height, width.
STAGES = {1: (256, 96, 32), 2: (512, 48, 16), 3: (1024, 24, 8)}
QK_RATIO = 0.25  # reidkit's default and the authors' code: C' = C/4


@dataclass(frozen=True)
class Spec:
    kind: str  # "sa", "csa" or "csalr"
    groups: int
    grid: tuple[int, int] = (12, 8)  # CSALR landmarks: 12x8 = 96, the paper's
    bases: int = 32  # CSA's base vectors per group
    materialise: bool = False  # SA with the n x n map in memory
    projection: str = "landmarks"  # CSALR module: where value and fuse run
    parts: tuple[str, ...] = ("core", "module")


CONFIGS: dict[str, Spec] = {
    "sa-mat": Spec("sa", 1, materialise=True),
    "sa-sdpa": Spec("sa", 1),
    "csa": Spec("csa", 2),
    "csalr-g2": Spec("csalr", 2),
    "csalr-g2-map": Spec("csalr", 2, projection="map", parts=("module",)),
    "csalr-g1": Spec("csalr", 1),
    "csalr-g4": Spec("csalr", 4, projection="map"),
    "csalr-g8": Spec("csalr", 8, projection="map"),
    "csalr-g2-m24": Spec("csalr", 2, grid=(6, 4)),
    "csalr-g2-m48": Spec("csalr", 2, grid=(12, 4)),
    "csalr-g2-m192": Spec("csalr", 2, grid=(24, 8)),
}
QUICK = ["sa-mat", "sa-sdpa", "csa", "csalr-g2", "csalr-g2-map"]
BASELINE = "sa-mat"
PARTS = ("core", "module")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shapes", default="1,2,3", help="stages whose map to use, from 1,2,3")
    parser.add_argument(
        "--configs", default="all", help=f"comma-separated, from: {', '.join(CONFIGS)}"
    )
    parser.add_argument("--parts", default="core,module", help="core, module or both")
    parser.add_argument("--quick", action="store_true", help=f"stage 1 only, {', '.join(QUICK)}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--amp", choices=("off", "bf16"), default="off", help="bfloat16 autocast (CUDA or CPU)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument(
        "--retries", type=int, default=3, help="rounds run again when others kept cores busy"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this file")
    parser.add_argument(
        "--malloc",
        choices=sorted(MALLOC_CHOICES),
        default="retain",
        help="glibc settings while timing: keep freed memory for the next step (retain), or "
        "glibc's defaults, which fault memory back in every step (bench/measure.py)",
    )
    # Internal: the measuring process of one config, a timing worker or a memory run.
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part", default="core", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.configs = "1", ",".join(QUICK)
    return args


# ---- one measurement (in its own process) -----------------------------------------------------


def sdpa_backend(device: str):
    """The SDPA kernel to pin: flash on CPU (reidkit pads q/k/v for it), memory-efficient on
    CUDA (it takes d != e in float32). Neither forms the n x n map."""
    from torch.nn.attention import SDPBackend

    if device == "cuda":
        return SDPBackend.EFFICIENT_ATTENTION
    return SDPBackend.FLASH_ATTENTION


def build_step(spec: Spec, part: str, stage: int, batch: int, device: str, amp: bool):
    """The forward+backward step of one configuration, and a note on how it ran."""
    import contextlib

    import torch

    from reidkit.models import attention as attn

    channels, h, w = STAGES[stage]
    gen = torch.Generator().manual_seed(0)
    note = ""
    pin = contextlib.nullcontext
    if spec.kind == "sa" and not spec.materialise:
        from torch.nn.attention import sdpa_kernel

        backend = sdpa_backend(device)

        def pin():
            return sdpa_kernel([backend])

        note = f"SDPA pinned to {backend.name}"

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    if part == "core":
        d = round(QK_RATIO * channels) // spec.groups
        e = channels // spec.groups
        # Logits q.k of std ~1: attention rows neither uniform nor one-hot.
        q = torch.randn(batch, spec.groups, d, h, w, generator=gen) * d**-0.25
        k = torch.randn(batch, spec.groups, d, h, w, generator=gen) * d**-0.25
        v = torch.randn(batch, spec.groups, e, h, w, generator=gen)
        bases = torch.randn(spec.groups, spec.bases, spec.groups * d, generator=gen)
        inputs = [t.to(device).requires_grad_() for t in (q, k, v, bases)]
        grad = torch.randn(batch, spec.groups, e, h, w, generator=gen).to(device)
        if spec.kind == "sa":
            core = attn.full_attention_materialised if spec.materialise else attn.full_attention

            def run():
                return core(*inputs[:3])
        elif spec.kind == "csa":  # every group's bases see all of Q

            def run():
                return attn.csa_attention(inputs[0].flatten(1, 2), inputs[2], inputs[3])
        else:

            def run():
                return attn.csalr_attention(*inputs[:3], spec.grid)

        def step():
            with pin(), autocast():
                y = run()
            y.backward(grad.to(y.dtype))
            for t in inputs:
                t.grad = None

    else:
        if spec.kind == "sa":
            module = attn.SelfAttention(channels, groups=spec.groups, materialise=spec.materialise)
        elif spec.kind == "csa":
            module = attn.CSA(channels, groups=spec.groups, bases=spec.bases)
        else:
            module = attn.CSALR(
                channels, groups=spec.groups, grid=spec.grid, projection=spec.projection
            )
        if spec.kind == "csalr":
            on_rows = spec.projection != "map"
            note += (
                ("; " if note else "")
                + "value/fuse on "
                + ("landmark rows" if on_rows else "the map")
            )
        module.to(device)
        with torch.no_grad():
            module.alpha.fill_(0.5)  # any value costs the same; 0.5 keeps every path live
        x = torch.randn(batch, channels, h, w, generator=gen).to(device).requires_grad_()
        grad = torch.randn(batch, channels, h, w, generator=gen).to(device)

        def step():
            with pin(), autocast():
                out, _fused = module(x)
            out.backward(grad.to(out.dtype))
            x.grad = None
            module.zero_grad(set_to_none=True)

    return step, note


def run_one(args: argparse.Namespace) -> None:
    """The internal measuring process for ``--one CONFIG``: a worker, or one memory step."""
    import torch

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    spec = CONFIGS[args.one]
    step, note = build_step(spec, args.part, args.stage, args.batch, device, args.amp == "bf16")
    if args.memory:
        print(json.dumps({"peak_mib": measure_memory(step, device, warmup=args.warmup)}))
    else:
        serve(step, device, warmup=args.warmup, info={"note": note, "device": device})


# ---- the side-by-side run ---------------------------------------------------------------------


def resolve_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        run_one(args)
        return 0

    import os

    device = resolve_device(args.device)
    threads = args.threads or os.cpu_count() or 1
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    stages = [int(s) for s in args.shapes.split(",")]
    parts = [p for p in args.parts.split(",") if p]
    if any(s not in STAGES for s in stages) or any(p not in PARTS for p in parts):
        raise SystemExit("--shapes takes stages from 1,2,3 and --parts core and/or module")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    header = [
        f"attention forward+backward, batch {args.batch}, {device}"
        + (f", {threads} threads, malloc {args.malloc}" if device == "cpu" else "")
        + f", amp {args.amp}; {machine_line(device)}",
        f"load average at start: {load_average()}",
    ]
    log(header[0])
    started = time.perf_counter()
    rows: list[dict[str, object]] = []
    script = Path(__file__).resolve()
    for stage in stages:
        channels, h, w = STAGES[stage]
        for part in parts:
            group = [n for n in names if part in CONFIGS[n].parts]
            common = [
                *("--part", part, "--stage", str(stage), "--batch", str(args.batch)),
                *("--device", device, "--amp", args.amp, "--warmup", str(args.warmup)),
            ]
            commands = {n: [sys.executable, str(script), "--one", n, *common] for n in group}
            log(f"[stage {stage}, {part}] {len(group)} configs")
            results = measure_side_by_side(
                commands,
                device=device,
                threads=threads,
                repeats=args.repeats,
                retries=args.retries,
                malloc=args.malloc,
                log=log,
            )
            for name in group:
                spec, result = CONFIGS[name], results[name]
                landmarks = {"csalr": spec.grid[0] * spec.grid[1], "csa": spec.bases}
                rows.append(
                    {
                        "stage": stage,
                        "shape": f"{channels}x{h}x{w}",
                        "part": part,
                        "config": name,
                        **asdict(spec),
                        "landmarks": landmarks.get(spec.kind),
                        **result,
                    }
                )
                if "error" in result:
                    log(f"[stage {stage}, {part}] {name}: FAILED {result['error']}")
                else:
                    log(
                        f"[stage {stage}, {part}] {name}: {result['ms']:.1f} ms "
                        f"(runs {result['ms_runs']}), peak {result['peak_mib'] or 0:.1f} MiB"
                    )
    baselines = {(r["stage"], r["part"]): r for r in rows if r["config"] == BASELINE}
    for row in rows:
        base = baselines.get((row["stage"], row["part"]))
        if base is not None and "error" not in row and "error" not in base:
            row["time_vs_sa"] = paired_ratio(row["ms_runs"], base["ms_runs"])
            if row["peak_mib"] is not None and base["peak_mib"]:
                row["memory_vs_sa"] = row["peak_mib"] / base["peak_mib"]

    took = time.perf_counter() - started
    header.append(f"load average at end: {load_average()}; took {took:.0f} s")
    header.append(
        "ms: median of the timed steps; peak MiB: "
        + (
            "max_memory_allocated above memory_allocated before the step"
            if device == "cuda"
            else "peak resident-set rise of the measuring process above its warmed-up state"
        )
        + "; x SA: over materialised SA (sa-mat) of the same part and shape (time: the median "
        "of the per-round ratios)"
    )
    if device == "cpu":
        header.append(
            "others: the most cores other processes kept busy in a timed round (a round over "
            f"{BUSY_CORES_LIMIT} is run again, up to --retries rounds in all)"
        )
    if args.json:
        write_rows_json(args.json, header, vars(args), rows)
    columns = ["config", "part", "map", "groups", "m", "ms", "x SA", "peak MiB", "x SA"]
    if device == "cpu":
        columns.append("others")
    columns.append("note")
    table_rows = []
    for row in rows:
        if "error" in row:
            cells = [row["config"], row["part"], row["shape"], str(row["groups"]), ""]
            cells += ["failed", "", "", ""] + ([""] if device == "cpu" else [])
            table_rows.append([*cells, str(row["error"])])
            continue
        busy = row.get("busy_cores")
        cells = [
            row["config"],
            row["part"],
            row["shape"],
            str(row["groups"]),
            str(row["landmarks"] or ""),
            f"{row['ms']:.1f}",
            f"{row['time_vs_sa']:.3f}" if "time_vs_sa" in row else "",
            "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}",
            f"{row['memory_vs_sa']:.3f}" if "memory_vs_sa" in row else "",
        ]
        if device == "cpu":
            cells.append("" if busy is None else f"{busy:.2f}")
        table_rows.append([*cells, str(row.get("note", ""))])
    for line in header:
        print(line)
    print(format_table("attention cost, forward + backward", columns, table_rows, left=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
