"""`ldm serve` as a child process (tests, bench/serve_load.py, scripts): start it on a free port and
wait until it answers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: str | Path, *flags: str, timeout: float = 120, **popen) -> tuple[subprocess.Popen, str]:
    """(the process, its base URL) once /sdapi/v1/progress answers; RuntimeError if it exits first
    or doesn't answer in `timeout` seconds. One torch thread unless OMP_NUM_THREADS says otherwise."""
    port = free_port()
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "ldm.cli", "serve", "--model", str(model), "--port", str(port),
                             *flags], env=env, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ldm serve exited with {proc.returncode} before answering")
        try:
            urllib.request.urlopen(f"{url}/sdapi/v1/progress", timeout=1).close()
            return proc, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"ldm serve did not answer within {timeout} s")
