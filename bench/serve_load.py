"""Load on `ldm serve`: N txt2img requests from C concurrent clients (default 50 from 8), reporting
throughput and latency percentiles (p50/p90/p99, from sending the request to its image).

    python bench/serve_load.py                              # a tiny random model, served here
    python bench/serve_load.py --model weights/ldm-default.safetensors --size 512 --steps 10
    python bench/serve_load.py --url http://127.0.0.1:7860  # a server already running

The server runs one job at a time, so throughput is the model's, and latency grows with the queue
(a request waits for the ones before it): p50 ≈ half the queue's drain time at full load."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from ldm.server.process import launch

REPO = Path(__file__).resolve().parents[1]


def tiny_model(folder: Path) -> Path:
    """A tiny random-weight SD1-layout model (the tests' tests/tiny_models.py)."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import random_model, tiny_sd1

    from ldm import Pipeline
    path = folder / "tiny.safetensors"
    Pipeline(random_model(tiny_sd1())).save_pretrained(path)
    return path


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the two nearest ranks (numpy's default)."""
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run(url: str, n: int, clients: int, size: int, steps: int) -> dict:
    def one(i: int) -> float:
        t = time.perf_counter()
        r = requests.post(f"{url}/sdapi/v1/txt2img", json=dict(prompt=f"a red circle {i}", seed=i, steps=steps,
                                                             width=size, height=size, sampler_name="Euler"))
        r.raise_for_status()
        assert len(r.json()["images"]) == 1
        return time.perf_counter() - t
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    return dict(requests=n, clients=clients, size=size, steps=steps, wall_s=round(wall, 3),
                throughput_rps=round(n / wall, 3), mean_s=round(statistics.mean(latencies), 3),
                **{f"p{q}_s": round(percentile(latencies, q / 100), 3) for q in (50, 90, 99)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start `ldm serve` here)")
    p.add_argument("--model", help="the model to serve (default: a tiny random one)")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", metavar="PATH", help="also write the numbers here")
    args = p.parse_args()
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            model = Path(args.model) if args.model else tiny_model(Path(tmp))
            proc, url = launch(model, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            run(url, args.clients, args.clients, args.size, args.steps)          # warm-up, not counted
            result = run(url, args.requests, args.clients, args.size, args.steps)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()
    result.update(model=args.model or ("tiny random" if not args.url else "?"), threads=os.environ.get("OMP_NUM_THREADS"))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
