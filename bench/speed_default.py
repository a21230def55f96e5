"""Speed bar of the default model: `ldm generate` from process start to the PNG on disk, at default
settings, median of 5 runs, with each run's peak memory (max RSS of the process).

    python bench/speed_default.py [--runs 5] [--prompt TEXT] [-- extra ldm generate arguments]

A two-object prompt ("a red circle to the left of a blue square") takes the regional path
(ldm/regions.py): one more UNet row per object during the layout-forming steps."""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(prompt: str, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one `ldm generate` process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.png"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "ldm.cli", "generate", prompt,
                                 "-o", str(out), "-q", *args], stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0 or not out.is_file():
            raise SystemExit(f"ldm generate failed (status {status})")
    return wall, usage.ru_maxrss / 2 ** 20


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt", default="a red circle on the left")
    p.add_argument("extra", nargs="*")
    a = p.parse_args()
    results = [run_once(a.prompt, a.extra) for _ in range(a.runs)]
    walls, peaks = [r[0] for r in results], [r[1] for r in results]
    print(f"ldm generate {a.prompt!r}, default model and settings, {a.runs} runs: median {statistics.median(walls):.2f} s "
          f"(min {min(walls):.2f}, max {max(walls):.2f}); peak RSS {max(peaks):.2f} GB")


if __name__ == "__main__":
    main()
