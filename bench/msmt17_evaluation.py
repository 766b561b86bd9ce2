"""Evaluation at MSMT17's size: features in -> metrics out, time and peak memory.

    python bench/msmt17_evaluation.py                    # 11,659 x 82,161, 2,048-d features
    python bench/msmt17_evaluation.py --dims 2048,1536 --json msmt17.json

MSMT17's test split (11,659 queries and 82,161 gallery images of 3,060 identities, 15
cameras) with synthetic features shaped like a strong model's (bench/evaluation.py's
`identity_features`). Two paths from the same features to the same CMC/mAP/mINP, each in a
fresh process of its own:

- chunked: `cmc_map_from_features`, what `reidkit evaluate` runs: the distances of one chunk
  of queries are computed, ranked and dropped before the next;
- full matrix: `distance_matrix` then `cmc_map`, what `evaluate` ran before: the whole
  11,659 x 82,161 float32 matrix (3.6 GiB) is held while it is ranked.

Peak memory is the rise of the process's peak resident set above the state with the features
loaded (glibc set to return freed blocks, see measure.py), so it is what evaluation adds to
the features that extraction produced. Both paths must agree (asserted). Run on a quiet
machine: the time is one run of each, not a best of several.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/msmt17_evaluation.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import (  # noqa: E402 - after the path set-up above
    MIB,
    STRICT_MALLOC_ENV,
    format_table,
    load_average,
    machine_line,
    measure_memory,
    run_isolated,
    write_rows_json,
)

# MSMT17's test split (Wei et al., CVPR 2018).
MSMT17_QUERIES, MSMT17_GALLERY, MSMT17_TEST_IDS, MSMT17_CAMERAS = 11_659, 82_161, 3_060, 15
PATHS = {
    "chunked": "cmc_map_from_features (query chunks; what `evaluate` runs)",
    "full": "distance_matrix + cmc_map (the whole matrix; `evaluate` before)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="2048", help="comma-separated feature sizes")
    parser.add_argument("--paths", default="chunked,full", help=f"of {', '.join(PATHS)}")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this file")
    parser.add_argument("--child", choices=list(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, default=2048, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def msmt17_like_ids(rng):
    """Query and gallery pids and camids with MSMT17's test counts: every identity in both."""
    import numpy as np

    ids = np.arange(MSMT17_TEST_IDS)  # MSMT17's test pids start at 0
    q_pids = np.concatenate([ids, rng.integers(0, MSMT17_TEST_IDS, MSMT17_QUERIES - len(ids))])
    g_pids = np.concatenate([ids, rng.integers(0, MSMT17_TEST_IDS, MSMT17_GALLERY - len(ids))])
    q_camids = rng.integers(1, MSMT17_CAMERAS + 1, MSMT17_QUERIES)
    g_camids = rng.integers(1, MSMT17_CAMERAS + 1, MSMT17_GALLERY)
    return q_pids, g_pids, q_camids, g_camids


def child(args: argparse.Namespace) -> dict[str, object]:
    """One path in this process: features, then one measured evaluation of them."""
    import numpy as np
    import torch
    from evaluation import identity_features

    from reidkit.retrieval.metrics import cmc_map, cmc_map_from_features, distance_matrix

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    q_pids, g_pids, q_camids, g_camids = msmt17_like_ids(rng)
    ids = (q_pids, g_pids, q_camids, g_camids)
    pids, camids = np.concatenate([q_pids, g_pids]), np.concatenate([q_camids, g_camids])
    feats = identity_features(rng, pids, camids, args.dim)
    q_feats, g_feats = feats[: len(q_pids)], feats[len(q_pids) :]
    out: dict[str, object] = {}

    def evaluate() -> None:
        start = time.perf_counter()
        if args.child == "chunked":
            metrics = cmc_map_from_features(q_feats, g_feats, *ids)
        else:
            metrics = cmc_map(distance_matrix(q_feats, g_feats), *ids)
        out["seconds"] = time.perf_counter() - start
        out["metrics"] = [metrics.rank(1), metrics.mAP, metrics.mINP]

    out["peak_mib"] = measure_memory(evaluate, "cpu", warmup=0)
    out["features_mib"] = feats.nbytes / MIB
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    paths = [p for p in args.paths.split(",") if p.strip()]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    header = [
        machine_line("cpu"),
        f"{MSMT17_QUERIES:,} queries x {MSMT17_GALLERY:,} gallery ({MSMT17_TEST_IDS:,} "
        f"identities, {MSMT17_CAMERAS} cameras), {args.threads} threads",
        f"load average at start: {load_average()}",
    ]
    rows: list[dict[str, object]] = []
    for dim in dims:
        agreed = None
        for path in paths:
            log(f"{dim}-d, {path}: features, then one evaluation in a fresh process")
            command = [sys.executable, str(Path(__file__).resolve()), "--child", path]
            command += ["--dim", str(dim), "--seed", str(args.seed), "--threads", str(args.threads)]
            result = run_isolated(command, threads=args.threads, env=STRICT_MALLOC_ENV)
            if "error" in result:
                log(f"  failed: {result['error']}")
                rows.append({"dim": dim, "path": path, "error": result["error"]})
                continue
            rows.append({"dim": dim, "path": path, **result})
            log(f"  {result['seconds']:.1f} s, peak +{result['peak_mib']:,.0f} MiB")
            if agreed is None:
                agreed = result["metrics"]
            else:  # the same numbers, up to float32 products summed in another blocking
                pairs = zip(agreed, result["metrics"], strict=True)
                assert all(abs(a - b) < 1e-6 for a, b in pairs), (agreed, result["metrics"])
    header.append(f"load average at end: {load_average()}")
    table_rows = [
        [
            str(row["dim"]),
            PATHS[row["path"]],
            "failed" if "error" in row else f"{row['seconds']:.1f}",
            "" if "error" in row else f"{row['peak_mib']:,.0f}",
            "" if "error" in row else f"{row['features_mib']:,.0f}",
            ""
            if "error" in row
            else "R1 {:.2f} / mAP {:.2f} / mINP {:.2f}".format(*(100 * v for v in row["metrics"])),
        ]
        for row in rows
    ]
    columns = ["dim", "path", "seconds", "peak MiB", "features MiB", "metrics (%)"]
    table = format_table(
        "features in -> metrics out at MSMT17 size (peak: above the loaded features)",
        columns,
        table_rows,
        left=2,
    )
    if args.json:
        write_rows_json(args.json, header, vars(args), rows)
    print("\n".join(header))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
