"""What every benchmark script shares: the machine it ran on, median/range, and the result file.

Each script writes one JSON (default `benchmarks/results/<name>.json`) through `write_result`:

    {"benchmark": name, "date": ..., "command": ..., "machine": {...}, "settings": {...},
     "summary": "<one line>", "markdown": "<its section for RESULTS.md>", ...its own numbers}

and prints the one-line summary. `benchmarks/write_results.py` renders `benchmarks/RESULTS.md` from
those files, so the table a script prints and the one in RESULTS.md are the same text.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"


def machine_info() -> dict[str, Any]:
    """Where a number was measured: CPU/GPU, core count, library versions."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    for name in ("deepspeed", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a version is a nicety, never a reason to fail
            info[name] = None
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def spread(values: list[float]) -> dict[str, float]:
    """Median and range: what RESULTS.md reports for repeated measurements."""
    if not values:
        raise ValueError("no measurements")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_spread(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def command_line(argv: list[str] | None) -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script_name = str(script.relative_to(REPO))
    except ValueError:
        script_name = script.name
    args = argv if argv is not None else sys.argv[1:]
    return shlex.join(["python", script_name, *args])


def md_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (cells already formatted as text, or numbers)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, out: str | Path | None, argv: list[str] | None, summary: str, markdown: str,
                 **fields: Any) -> Path:  # fmt: skip
    """Write the benchmark's JSON (with machine, date, command) and print its one-line summary."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    result = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv),
        "machine": machine_info(),
        "summary": summary,
        "markdown": markdown,
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{name}: {summary}; {path}")
    return path
