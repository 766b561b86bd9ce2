"""ONNX export: how long `export_onnx` takes, and onnxruntime's CPU inference beside PyTorch's.

    python bench/export.py                       # PCB and PCB+CSALR, ResNet-50 at 384x128
    python bench/export.py --quick               # ResNet-18 at 192x64, to try the script

Each model is the paper preset's network with random weights (the cost does not depend on
them) saved as a checkpoint; `export_onnx` writes it and checks it against PyTorch on real
crops of the shared `cuhk03-subset` (linked, never copied), so the export time includes
that check, as `reidkit export` runs it. Then PyTorch (eval mode, no autograd, float32) and
onnxruntime (CPU provider, the same thread count) embed the same batch in alternating
rounds, and the table gives the median images/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/export.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from measure import format_table, machine_line  # noqa: E402 - after the path set-up above

SUBSET = Path(
    os.environ.get("REIDKIT_CUHK03_SUBSET")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "cuhk03-subset"
)
MODELS = {"pcb": "pcb", "pcb-csalr": "pcb-csalr"}  # name -> preset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="ResNet-18 at 192x64")
    return parser.parse_args(argv)


def make_checkpoint(preset: str, folder: Path, quick: bool) -> Path:
    import torch

    from reidkit.config import load_preset
    from reidkit.engine.checkpoint import Checkpoint, save_checkpoint
    from reidkit.models.net import build_model

    overrides = ["model.pretrained=false", "data.workers=0"]  # 32 check images
    if quick:
        overrides += ["model.arch=resnet18", "data.height=192", "data.width=64"]
        overrides += ["attention.grid=6,4"]
    config = load_preset(preset, overrides)
    torch.manual_seed(0)
    net = build_model(config, num_ids=751)
    path = folder / f"{preset}.pt"
    save_checkpoint(
        path, Checkpoint(config=config, model=net.state_dict(), num_ids=751, epoch=0, head="pcb")
    )
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime
    import torch

    from reidkit.engine.checkpoint import load_model
    from reidkit.engine.export import export_onnx
    from reidkit.engine.extract import embed_images

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if not SUBSET.is_dir():
        print(f"no shared images at {SUBSET}; set REIDKIT_CUHK03_SUBSET", file=sys.stderr)
        return 1
    print(machine_line("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = folder / "check"
        images.mkdir()
        for path in sorted((SUBSET / "query").glob("*.jpg"))[:32]:
            (images / path.name).symlink_to(path)
        for name in args.models.split(","):
            checkpoint = make_checkpoint(MODELS[name], folder, args.quick)
            report = export_onnx(checkpoint, folder / f"{name}.onnx", check_images=images)
            net, state = load_model(checkpoint)
            feature, flip = state.config.eval.feature, state.config.eval.flip
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            session = onnxruntime.InferenceSession(
                str(report.path), options, providers=["CPUExecutionProvider"]
            )
            batch = torch.randn(args.batch, 3, state.config.data.height, state.config.data.width)

            def run_torch(batch=batch, net=net, feature=feature, flip=flip) -> None:
                with torch.no_grad():
                    embed_images(net, batch, feature=feature, flip=flip)

            array = batch.numpy()

            def run_onnx(array=array, session=session) -> None:
                session.run(None, {"images": array})

            times: dict[str, list[float]] = {"torch": [], "onnx": []}
            for step in (run_torch, run_onnx):  # warm-up
                step()
            for _ in range(args.repeats):
                for key, step in (("torch", run_torch), ("onnx", run_onnx)):
                    started = time.perf_counter()
                    step()
                    times[key].append(time.perf_counter() - started)
            torch_ips = args.batch / statistics.median(times["torch"])
            onnx_ips = args.batch / statistics.median(times["onnx"])
            rows.append(
                [
                    name,
                    f"{report.seconds:.1f}",
                    str(report.solve_steps or "-"),
                    f"{report.min_cosine:.6f}",
                    f"{torch_ips:.1f}",
                    f"{onnx_ips:.1f}",
                    f"{onnx_ips / torch_ips:.2f}",
                ]
            )
            print(f"  {name}: export {report.seconds:.1f} s", flush=True)
    size = "192x64 ResNet-18" if args.quick else "384x128 ResNet-50"
    title = f"\n{size}, batch {args.batch}, {threads} threads, flip as the preset's eval.flip"
    header = ["model", "export s", "NS steps", "worst cos", "PyTorch img/s", "ORT img/s", "ORT/PT"]
    print(format_table(title, header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
