"""Where the memory of a ``compress`` command goes: resident set size over time, with the code.

Runs a ``compress`` CLI command in this process while a thread samples, every ``--interval``
seconds, the resident set size and the innermost frames of the main thread that lie inside the
``compress`` package. Writes the samples as JSON and prints the peak and the largest RSS seen
in each stretch of time spent in one function, so a peak can be tied to the line that made it.

    python scripts/trace_rss.py --out /tmp/rss.json -- apply recipe.yaml --no-evaluate
    python scripts/trace_rss.py --show /tmp/rss.json              # summarise a saved trace

Linux only (reads ``/proc/self/statm``). The sampler holds the GIL briefly each time; the
traced command runs a little slower, its memory is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

PACKAGE_DIR = os.sep + "compress" + os.sep
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
GIB = 1024**3


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


class Sampler(threading.Thread):
    """Samples (seconds, RSS bytes, innermost compress frames) of the thread that started it."""

    def __init__(self, interval: float, depth: int = 4) -> None:
        super().__init__(daemon=True)
        self.target_id = threading.get_ident()
        self.interval = interval
        self.depth = depth
        self.samples: list[tuple[float, int, list[str]]] = []
        self._stop_event = threading.Event()
        self._start = time.perf_counter()

    def run(self) -> None:
        while not self._stop_event.is_set():
            frame = sys._current_frames().get(self.target_id)
            stack = traceback.extract_stack(frame) if frame is not None else []
            ours = [
                f"{Path(f.filename).name}:{f.name}:{f.lineno}"
                for f in stack
                if PACKAGE_DIR in f.filename
            ]
            elapsed = time.perf_counter() - self._start
            self.samples.append((elapsed, resident_bytes(), ours[-self.depth :]))
            self._stop_event.wait(self.interval)

    def stop(self) -> list[tuple[float, int, list[str]]]:
        self._stop_event.set()
        self.join()
        return list(self.samples)


def summarise(samples: list[Any], min_seconds: float) -> str:
    """The peak, then one line per stretch of samples in the same innermost function."""
    if not samples:
        return "no samples"
    peak = max(samples, key=lambda s: s[1])
    lines = [f"peak {peak[1] / GIB:.3f} GiB at {peak[0]:.1f} s in {' < '.join(peak[2][::-1])}"]
    stretches: list[list[Any]] = []  # [function chain, start, end, max rss]
    for seconds, rss, frames in samples:
        chain = " < ".join(f.rsplit(":", 1)[0] for f in frames[::-1][:3]) or "-"
        if stretches and stretches[-1][0] == chain:
            stretches[-1][2] = seconds
            stretches[-1][3] = max(stretches[-1][3], rss)
        else:
            stretches.append([chain, seconds, seconds, rss])
    for chain, start, end, rss in stretches:
        if end - start >= min_seconds:
            lines.append(f"{start:8.1f}-{end:8.1f} s  max {rss / GIB:6.3f} GiB  {chain}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("rss-trace.json"))
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="shortest stretch shown")
    parser.add_argument("--show", type=Path, help="summarise a saved trace instead of running")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then a compress command")
    args = parser.parse_args()
    if args.show:
        print(summarise(json.loads(args.show.read_text()), args.min_seconds))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a compress command after --, e.g. -- apply recipe.yaml")

    from compress.cli import run

    sampler = Sampler(args.interval)
    sampler.start()
    try:
        code = run(command)
    finally:
        samples = sampler.stop()
        args.out.write_text(json.dumps(samples))
    print(summarise(samples, args.min_seconds), file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
