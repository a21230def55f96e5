"""`ldm serve` as a process under load and faults: every request of a concurrent burst gets its
own image, a client killed mid-request leaves the queue working, and SIGTERM finishes the jobs
already accepted before the process exits."""
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from ldm.server.process import launch
from test_server import model  # noqa: F401  the tiny model fixture

REPO = Path(__file__).resolve().parents[1]


def start_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """The server with its log in a file (a pipe nobody reads would fill and block it)."""
    with open(log, "w") as out:
        proc, url = launch(model, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return proc, url + "/sdapi/v1"


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "serve.log"
    proc, url = start_server(model, log)
    yield url, log
    proc.kill()
    proc.wait()


def wait_for(url: str, condition, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = requests.get(f"{url}/progress").json()
        if condition(p):
            return p
        time.sleep(0.05)
    raise AssertionError(f"progress never satisfied the condition: {p}")


def txt2img(url: str, **kw) -> requests.Response:
    return requests.post(f"{url}/txt2img", json=dict(prompt="a red circle", width=16, height=16) | kw, timeout=120)


def test_every_request_of_a_burst_gets_its_image(server):
    server, _ = server
    seen = []
    stop = threading.Event()

    def watch():                      # the queue's length while the burst is in flight
        while not stop.is_set():
            seen.append(requests.get(f"{server}/progress").json()["state"]["job_count"])
            time.sleep(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda seed: txt2img(server, seed=seed, steps=8), range(100, 116)))
    stop.set()
    watcher.join()
    assert [r.status_code for r in answers] == [200] * 16
    infos = [json.loads(r.json()["info"]) for r in answers]
    assert [i["all_seeds"] for i in infos] == [[s] for s in range(100, 116)]
    assert len({r.json()["images"][0] for r in answers}) == 16              # each its own image
    assert max(seen) > 1                                                       # they queued: one model, one job at a time


def client_process(url: str, **kw) -> subprocess.Popen:
    code = f"import requests; requests.post({url + '/txt2img'!r}, json={kw!r})"
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_killed_client_leaves_the_queue_working(server):
    server, log = server
    running = client_process(server, prompt="x", width=16, height=16, steps=150)
    wait_for(server, lambda p: p["state"]["sampling_step"] > 0)
    queued = client_process(server, prompt="y", width=16, height=16, steps=150)
    wait_for(server, lambda p: p["state"]["job_count"] == 2)
    for proc in (queued, running):
        proc.kill()
        proc.wait()
    r = txt2img(server, seed=1, steps=3)
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    wait_for(server, lambda p: p["state"]["job_count"] == 0)
    # the running job finished unread; the queued one was never drawn
    assert log.read_text().count("skipped a txt2img job: its client went away before its turn") == 1


def test_sigterm_finishes_the_accepted_jobs_then_exits(model, tmp_path):
    proc, url = start_server(model, tmp_path / "serve.log")
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(txt2img, url, seed=s, steps=40) for s in range(3)]
        wait_for(url, lambda p: p["state"]["sampling_step"] > 0 and p["state"]["job_count"] == 3)
        proc.send_signal(signal.SIGTERM)
        answers = [f.result() for f in futures]
    assert [r.status_code for r in answers] == [200] * 3
    assert all(len(r.json()["images"]) == 1 for r in answers)
    assert proc.wait(60) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/progress", timeout=2)
    log = (tmp_path / "serve.log").read_text()
    assert "Waiting for connections to close" in log and "Finished server process" in log
