"""Measurement for the benchmark scripts: interleaved timing, peak memory per process.

Every configuration is measured in Python processes of its own, so that no allocator state,
thread pool or memory high-water mark leaks from one into another:

- time: one worker process per configuration (`Worker`, `serve`) builds it, warms it up and
  waits; the parent then asks the workers for one timed step each, in turn, round after
  round (`time_interleaved`), so that a slow spell of the machine (a neighbour, the clock,
  the hypervisor) falls on every configuration alike, while each keeps the steady allocator
  state of a process that repeats one step, as training does. The median per configuration
  is reported. CUDA events on a GPU; on the CPU the wall clock, while the worker watches how
  many cores other processes keep busy, and a disturbed round is run again.
- memory (`measure_memory`): the peak of one more step above the warmed-up state. CUDA:
  ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the step, asked
  of the worker. CPU: the rise of the peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) above the resident set before the step, in a fresh process
  started with glibc told to map every block over 128 KiB on its own and unmap it when freed
  (:data:`STRICT_MALLOC_ENV`): otherwise freed tensors stay in the heap, later steps reuse
  them and the rise undercounts (the switch must come at start-up: blocks freed into the
  heap before it stay there). Timing runs under the default allocator, as training does.

Imports only the standard library and torch, so it runs on a bare PyTorch machine.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# glibc settings for a memory-measuring process: blocks over 128 KiB are mapped on their own
# and unmapped when freed, so the resident set follows the live tensors.
STRICT_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

# glibc settings that keep freed memory in the process for the next step: no block gets a
# mapping of its own and the heap top is never trimmed, so after warm-up a repeated step
# touches only pages it has touched before. Under glibc's defaults, blocks over 32 MiB are
# always mapped afresh, and the heap top goes back to the kernel after a step; each step
# then faults its memory back in, which on the 2-core VM costs more than the arithmetic on
# it (a 25 MB tensor: 3-20 ms of first touch, 2-3 ms of multiplying), and varies from run
# to run with the kernel's state: materialised SA's stage-1 step took 1.3 s in one run and
# 2.3 s in another. Timing under these settings measures the computation.
RETAIN_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
MALLOC_CHOICES = {"default": {}, "retain": RETAIN_MALLOC_ENV}

# A round is timed again when other processes kept more than this many cores busy, on average,
# while it ran (MKL's small batched solves slow down 100x or more on shared cores).
BUSY_CORES_LIMIT = 0.25

MIB = 1024 * 1024


# ---- the machine ------------------------------------------------------------------------------


def write_rows_json(
    path: Path, header: Sequence[str], args: Mapping[str, object], rows: Sequence[object]
) -> None:
    """A script's ``--json`` file: its header lines, arguments and rows, renamed into place."""
    temporary = path.with_name(f".{path.name}.tmp")  # renamed: never half-written
    payload = {"header": list(header), "args": dict(args) | {"json": str(path)}, "rows": rows}
    temporary.write_text(json.dumps(payload, indent=2, default=str))
    temporary.replace(path)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, or "n/a"."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line(device: str) -> str:
    """One line naming the hardware and software a table was measured on."""
    import torch

    if device == "cuda":
        hardware = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        hardware = f"{cpu_model()}, {os.cpu_count()} logical cores"
    return f"{hardware}; torch {torch.__version__}, Python {platform.python_version()}"


class BusyCores:
    """How many cores, on average, processes other than this one kept busy since `start()`.

    Busy time of all cores (/proc/stat: user, nice, system, irq, softirq and steal) minus this
    process's own CPU time, over the wall time. None where /proc/stat is missing.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        busy = self._busy_seconds()
        self._start = None if busy is None else (busy, self._own_seconds(), time.perf_counter())

    def stop(self) -> float | None:
        if self._start is None:
            return None
        busy, own, wall = self._start
        now = self._busy_seconds()
        elapsed = time.perf_counter() - wall
        if now is None or elapsed <= 0:
            return None
        others = (now - busy) - (self._own_seconds() - own)
        return max(0.0, others / elapsed)


# ---- inside a measuring process ----------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int | None:
    """Reset the peak resident set to the current one; the current one in bytes, or None."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return None


def time_step(step: Callable[[], None], device: str) -> float:
    """Milliseconds one call of `step` takes: CUDA events on a GPU, the wall clock on the CPU."""
    import torch

    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end)
    start = time.perf_counter()
    step()
    return 1000 * (time.perf_counter() - start)


def measure_memory(step: Callable[[], None], device: str, *, warmup: int) -> float | None:
    """Peak memory of one call of `step` above the state after `warmup` calls, in MiB.

    On the CPU, call it in a process started with :data:`STRICT_MALLOC_ENV`. None where the
    platform cannot measure it (no /proc/self/clear_refs).
    """
    import torch

    for _ in range(warmup):
        step()
    if device == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MIB
    base = _reset_peak_rss()
    if base is None:
        return None
    step()
    return (_status_kib("VmHWM") * 1024 - base) / MIB


def serve(step: Callable[[], None], device: str, *, warmup: int, info: dict[str, object]) -> None:
    """The worker side of `Worker`: warm up, say so, then answer requests on stdin.

    ``step``: one timed step, answered ``{"ms", "busy_cores"}``; ``memory``: the peak of one
    step (meant for CUDA), answered ``{"peak_mib"}``; ``quit`` or end of input: return.
    """
    for _ in range(warmup):
        step()
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        request = line.strip()
        if request == "step":
            busy = BusyCores()
            busy.start()
            ms = time_step(step, device)
            others = busy.stop() if device == "cpu" else None
            print(json.dumps({"ms": ms, "busy_cores": others}), flush=True)
        elif request == "memory":
            print(json.dumps({"peak_mib": measure_memory(step, device, warmup=0)}), flush=True)
        else:
            return


# ---- the parent side --------------------------------------------------------------------------


def isolated_env(threads: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a measuring process: thread pools fixed before torch loads them.

    Thread counts go in through the environment, never torch.set_num_threads(n > 1): on the
    2-core CPU's torch wheel that call makes MKL's LU hang on matrices of 192 rows or more.
    """
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(extra or {})
    return env


def run_isolated(
    command: Sequence[str],
    *,
    threads: int,
    env: Mapping[str, str] | None = None,
    timeout: float = 1800.0,
) -> dict[str, object]:
    """Run `command` in a fresh process; parse the JSON object it prints last.

    A failure (a crash, out of memory, a timeout) comes back as ``{"error": ...}``.
    """
    try:
        done = subprocess.run(
            list(command),
            env=isolated_env(threads, env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1])


class Worker:
    """A process that holds one configuration warmed up and times a step when asked.

    `command` must end in the script's serve mode (which calls :func:`serve`). Construction
    waits until the worker is warm, so warm-ups never overlap each other or a timed step.
    `info` is what the worker said when ready; `error` is set once it has failed.
    """

    def __init__(
        self, command: Sequence[str], *, threads: int, env: Mapping[str, str] | None = None
    ) -> None:
        self.error: str | None = None
        self.info: dict[str, object] = {}
        # stderr to a file, not a pipe: a chatty worker must never block on a full pipe.
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            list(command),
            env=isolated_env(threads, env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.info = self._read()

    def _read(self) -> dict[str, object]:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self._process.wait()
        self._stderr.seek(0)
        tail = self._stderr.read().strip().splitlines()
        self.error = (tail or [f"exit code {self._process.returncode}"])[-1][:200]
        return {"error": self.error}

    def request(self, what: str) -> dict[str, object]:
        """Send one request (``step`` or ``memory``) and return the worker's answer."""
        if self.error is not None:
            return {"error": self.error}
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(what + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            return self._read()
        return self._read()

    def close(self) -> None:
        """Ask the worker to quit and wait for it."""
        if self._process.poll() is None:
            try:
                assert self._process.stdin is not None
                self._process.stdin.write("quit\n")
                self._process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._stderr.close()


def time_interleaved(
    workers: Mapping[str, Worker],
    *,
    repeats: int,
    retries: int,
    log: Callable[[str], None],
) -> dict[str, dict[str, object]]:
    """Time one step of every worker per round, for `repeats` rounds; medians per worker.

    On the CPU, a round during which other processes kept more than :data:`BUSY_CORES_LIMIT`
    cores busy (time-weighted over its steps) is discarded and run again, at most `retries`
    times in all.

    Returns:
        Per worker: ``ms`` (median), ``ms_min``, ``ms_runs`` and ``busy_cores`` (the most
        other processes took in a kept round; None on CUDA or without /proc/stat), or
        ``error``.
    """
    live = {name: w for name, w in workers.items() if w.error is None}
    runs: dict[str, list[float]] = {name: [] for name in live}
    kept_busy: list[float] = []
    discarded = 0
    while live and len(kept_busy) < repeats:
        answers = {name: w.request("step") for name, w in live.items()}
        failed = [name for name, answer in answers.items() if "error" in answer]
        for name in failed:
            del live[name]
        total = sum(a["ms"] for n, a in answers.items() if n not in failed)
        busy = [
            (a["busy_cores"], a["ms"])
            for n, a in answers.items()
            if n not in failed and a["busy_cores"] is not None
        ]
        others = sum(b * ms for b, ms in busy) / total if busy and total > 0 else None
        if others is not None and others > BUSY_CORES_LIMIT and discarded < retries:
            discarded += 1
            log(f"  others kept {others:.2f} cores busy; round run again ({discarded}/{retries})")
            time.sleep(2)
            continue
        for name in live:
            runs[name].append(answers[name]["ms"])
        kept_busy.append(-1.0 if others is None else others)
        log(
            f"  round {len(kept_busy)}/{repeats}: "
            + ", ".join(f"{name} {runs[name][-1]:.1f}" for name in live)
            + " ms"
        )
    worst = max(kept_busy, default=-1.0)
    results: dict[str, dict[str, object]] = {}
    for name, worker in workers.items():
        if worker.error is not None or not runs.get(name):
            results[name] = {"error": worker.error or "no timed step"}
            continue
        results[name] = {
            "ms": statistics.median(runs[name]),
            "ms_min": min(runs[name]),
            "ms_runs": [round(r, 2) for r in runs[name]],
            "busy_cores": None if worst < 0 else worst,
        }
    return results


def measure_side_by_side(
    commands: Mapping[str, Sequence[str]],
    *,
    device: str,
    threads: int,
    repeats: int,
    retries: int,
    malloc: str,
    log: Callable[[str], None],
) -> dict[str, dict[str, object]]:
    """Time and memory of every configuration.

    ``commands[name]`` starts a measuring process for configuration `name` when followed by
    ``--serve`` (a `Worker`) or by ``--memory`` (a one-shot memory measurement that prints
    ``{"peak_mib": ...}``). The workers' ready message (say, a parameter count) is kept.
    `malloc` names the glibc settings of the timing workers (:data:`MALLOC_CHOICES`).
    """
    workers: dict[str, Worker] = {}
    try:
        for name, command in commands.items():
            log(f"warming up {name}")
            workers[name] = Worker(
                [*command, "--serve"], threads=threads, env=MALLOC_CHOICES[malloc]
            )
            if workers[name].error:
                log(f"  {name} failed: {workers[name].error}")
        results = time_interleaved(workers, repeats=repeats, retries=retries, log=log)
        for name, worker in workers.items():
            info = {k: v for k, v in worker.info.items() if k not in ("ready", "error")}
            results[name] = {**info, **results[name]}
            if device == "cuda" and worker.error is None:
                results[name] |= worker.request("memory")
    finally:
        for worker in workers.values():
            worker.close()
    if device != "cuda":
        for name, command in commands.items():
            if "error" in results[name]:
                continue
            log(f"memory of {name}")
            memory = run_isolated([*command, "--memory"], threads=threads, env=STRICT_MALLOC_ENV)
            if "error" in memory:
                results[name]["error"] = f"memory: {memory['error']}"
            else:
                results[name]["peak_mib"] = memory["peak_mib"]
    return results


def paired_ratio(runs: Sequence[float], base_runs: Sequence[float]) -> float:
    """The median over rounds of ``runs[r] / base_runs[r]``: steps timed in the same round
    shared the machine's state, so their ratio is steadier than a ratio of medians."""
    if len(runs) != len(base_runs) or not runs:
        return statistics.median(runs) / statistics.median(base_runs)
    return statistics.median(a / b for a, b in zip(runs, base_runs, strict=True))


# ---- the table --------------------------------------------------------------------------------


def format_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1
) -> str:
    """A plain-text table: the first `left` columns and the last left-aligned, the rest (the
    numbers) right-aligned, between rules."""
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    last = len(columns) - 1

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(cell).ljust(width) if i < left or i == last else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(columns))
    return "\n".join([title, rule, line(columns), rule, *(line(r) for r in rows), rule])
