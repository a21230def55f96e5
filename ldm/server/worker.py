"""The one model worker: a thread that owns the pipeline and runs jobs from a FIFO queue one at a
time (requests wait their turn; none runs concurrently on the model), with A1111's progress state
and interrupt. A job whose client left before its turn is skipped; a job that fails fails alone."""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from .draw import Interrupted

log = logging.getLogger("uvicorn.error")          # uvicorn's server log, where its own lines go


class ShuttingDown(RuntimeError):
    """The server stopped before the job's turn."""


@dataclass
class Job:
    name: str                                   # A1111's state.job: "txt2img", "img2img", "load model"
    run: Callable                               # run(worker) -> result, on the worker thread
    future: Future = field(default_factory=Future)
    abandoned: bool = False                     # the client went away before the job started


class Worker:
    def __init__(self, load: Callable, entry):
        """load(entry) -> (pipeline, entry): the model loaded once, now, before the server listens."""
        self.pipe, self.entry = load(entry)
        self._load = load
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._interrupt = threading.Event()
        self._lock = threading.Lock()
        self._running: Job | None = None
        self._step = self._steps = 0
        self._started = 0.0
        self.completed = self.skipped = 0
        self._thread = threading.Thread(target=self._loop, name="ldm-model-worker", daemon=True)
        self._thread.start()

    # -- submitting ---------------------------------------------------------------------------------
    def submit(self, name: str, run: Callable) -> Job:
        job = Job(name, run)
        self._queue.put(job)
        return job

    def switch_model(self, entry) -> Job:
        """Load another model, in turn after the jobs queued before it; the old one stays on failure."""
        def run(worker):
            worker.pipe, worker.entry = worker._load(entry)
            return entry
        return self.submit("load model", run)

    # -- on the worker thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.abandoned or not job.future.set_running_or_notify_cancel():
                self.skipped += 1
                log.info("skipped a %s job: its client went away before its turn", job.name)
                continue
            with self._lock:
                self._running, self._step, self._steps, self._started = job, 0, 0, time.monotonic()
                self._interrupt.clear()
            try:
                job.future.set_result(job.run(self))
            except BaseException as e:      # noqa: BLE001  one job's failure is that job's answer
                job.future.set_exception(e)
            finally:
                with self._lock:
                    self._running = None
                self.completed += 1

    def begin(self, steps: int) -> None:
        """The running job's total sampler steps (for /progress)."""
        self._steps = max(int(steps), 1)

    def on_step(self, d: dict) -> None:
        """The pipeline's callback: count the step, stop at it if /interrupt was called."""
        self._step += 1
        if self._interrupt.is_set():
            raise Interrupted()

    # -- control and state ------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Stop the running job at its next step (queued jobs still run, as in A1111)."""
        with self._lock:
            if self._running is not None:
                self._interrupt.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def progress(self) -> dict:
        """A1111's /progress: progress in [0, 1], eta_relative (s), state."""
        with self._lock:
            job, step, steps, started = self._running, self._step, self._steps, self._started
            waiting = self._queue.qsize()
        progress = min(step / steps, 1.0) if job is not None and steps else 0.0
        elapsed = time.monotonic() - started if job is not None else 0.0
        eta = elapsed / progress - elapsed if progress > 0 else 0.0
        state = dict(skipped=False, interrupted=self._interrupt.is_set() and job is not None,
                     stopping_generation=False, job=job.name if job else "", job_count=waiting + (job is not None),
                     job_timestamp=time.strftime("%Y%m%d%H%M%S"), job_no=0, sampling_step=step if job else 0,
                     sampling_steps=steps if job else 0)
        return dict(progress=progress, eta_relative=eta, state=state, current_image=None, textinfo=None)

    def stop(self, timeout: float | None = None) -> None:
        """Fail the jobs still queued (ShuttingDown), stop the running one at its next step, end the
        thread. uvicorn calls this after the accepted requests are answered (SIGTERM), so both are
        empty then, unless --graceful-timeout ran out first."""
        pending = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                pending.append(job)
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server is shutting down"))
        self.interrupt()
        self._queue.put(None)
        self._thread.join(timeout)
