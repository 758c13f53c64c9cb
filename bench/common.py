"""Helpers shared by the benchmarks: machine description, timing, memory bandwidth, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or lscpu, or the platform module)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def machine_info(extra_packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """CPU model, cores, threads in use, key ISA flags, library versions, the command line and the date."""
    import torch

    flags = set(cpu_flags())
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for name in extra_packages:
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            info[name] = None
    return info


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def median_time(fn: Callable[[], Any], reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def memory_bandwidth(megabytes: int = 512, reps: int = 5) -> dict[str, float]:
    """Measured read and copy bandwidth in GB/s (1e9 bytes/s) with torch's current thread count.

    The buffers are filled with randn: untouched torch.empty pages map to the zero page and
    read implausibly fast.
    """
    import torch

    a = torch.randn(megabytes * 2**20 // 4)
    b = torch.randn_like(a)
    nbytes = a.numel() * 4
    read = median_time(lambda: a.sum(), reps=reps, warmup=1)
    copy = median_time(lambda: b.copy_(a), reps=reps, warmup=1)
    return {"read_gbps": nbytes / read / 1e9, "copy_gbps": 2 * nbytes / copy / 1e9, "buffer_mb": megabytes}


def bench_threads() -> int:
    """Torch threads for a benchmark: $BENCH_THREADS, default 2 (all of this project's machine)."""
    return int(os.environ.get("BENCH_THREADS", "2"))


def rss_bytes() -> int:
    """The resident set size now."""
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs), so that what was
    allocated before (loading a model) does not count in `peak_rss_bytes`."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """VmHWM: the peak resident set size since the last reset."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_results(name: str, figures: dict[str, Any], table_md: str, machine: dict[str, Any] | None = None,
                  folder: Path = RESULTS) -> tuple[Path, Path]:
    """Write results/<name>.json (figures, plus `machine` under "machine" when given) and
    results/<name>.md (the markdown report, ending with the command that made it when `machine` is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    if machine is not None:
        figures = {**figures, "machine": machine}
        table_md = f"{table_md.rstrip()}\n\nCommand: `{machine['command']}`"
    js, md = folder / f"{name}.json", folder / f"{name}.md"
    js.write_text(json.dumps(figures, indent=2) + "\n")
    md.write_text(table_md.rstrip() + "\n")
    return js, md


def read_results(run: str, folder: Path = RESULTS) -> tuple[Path, dict[str, Any]]:
    """(the path, the figures) of a committed results/<run>.json; a clear exit when there is none."""
    path = folder / f"{run}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no such results file")
    return path, json.loads(path.read_text())


def print_paired(a: list[bool], b: list[bool], name_a: str, name_b: str, keep: list[bool] | None = None,
                 subset: str = "") -> None:
    """McNemar's exact test between two per-question correctness lists on the same questions, optionally
    only those where `keep` is true (named by `subset`, such as "group IMG")."""
    from llama_adapter.eval.paired import compare_paired

    if keep is not None:
        a, b = [x for x, k in zip(a, keep, strict=True) if k], [x for x, k in zip(b, keep, strict=True) if k]
    print(compare_paired(a, b).format(name_a, name_b) + (f" ({subset})" if subset else ""))


SCIENCEQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa"


def scienceqa_validation(limit: int) -> tuple[list, list]:
    """(every problem of the shared ScienceQA copy, `limit` validation problems of the development protocol
    spread evenly over the pids; 0: all 1,045), as every ScienceQA benchmark here selects them."""
    from llama_adapter.eval.scienceqa import dev_protocol_val, load_scienceqa

    problems = load_scienceqa(SCIENCEQA / "problems.json", SCIENCEQA / "images", missing_images="text")
    val = sorted(dev_protocol_val(problems), key=lambda p: int(p.pid))
    return problems, (val[:: max(1, len(val) // limit)][:limit] if limit else val)
