"""The set-up and bookkeeping every training script shares, so that a script holds only what is
specific to its model. In the order a script calls them:

    run = start(cfg, "train_x", n_train, args.resume, "x.safetensors", warnings)  # accelerator, checks, seed
    ... build the model, data and optimizer; accelerator.prepare ...
    run.resume(args.resume, lr_scheduler, model=...)   # per-process seeds, newest checkpoint or a fresh log
    data = run.start_loop(loader)                      # micro-batches from the data position on
    while run.step < cfg.max_steps:
        ... one optimizer step over next(data) ...
        run.step_done(lr_scheduler)
        if run.log_due(): run.write_log(run.log_record({...}, lr_scheduler))
        run.checkpoint_if_due()
    sd = run.final_weights(prepared_model, model=...); main process: save sd, run.exported()

`run_cli` runs a script's main() so that bad input exits 2 with one line."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import hooks
from .state import append_jsonl, batches, list_checkpoints, resume_or_start, save_checkpoint


def run_cli(main) -> None:
    """Run a training script's main(); bad input exits 2 with a message, not a traceback."""
    import sys

    from accelerate import PartialState
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        if PartialState().is_main_process:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def make_accelerator(cfg):
    """The Accelerator every script uses: accumulation by hand-marked steps, and the same shuffled
    order on every process, fixed by (seed, epoch), which resuming mid-epoch needs."""
    import importlib.util

    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import GradientAccumulationPlugin
    return Accelerator(
        mixed_precision=cfg.mixed_precision or None,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.optim.grad_accum,
                                                                sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        log_with="tensorboard" if importlib.util.find_spec("tensorboard") else None, project_dir=cfg.out_dir)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_run(cfg, n_train: int, num_processes: int, ckpt_dir: Path, resume: bool) -> None:
    """Refuse, before any work, a dataset smaller than one batch or an out_dir of another run."""
    if n_train < cfg.batch_size * num_processes:
        raise ValueError(f"{n_train} training images, but one batch needs batch_size × processes = "
                         f"{cfg.batch_size * num_processes}: lower batch_size or add images")
    if list_checkpoints(ckpt_dir) and not resume:
        raise ValueError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                         f"or choose another out_dir")


def start(cfg, name: str, n_train: int, resume: bool, export_name: str, warnings=()) -> Run:
    """The accelerator and output paths of a run named `name` (its progress bar and trackers),
    checked against the data and out_dir; the warnings said; the global RNG seeded alike on every
    process, so the models built next start from identical weights."""
    run = Run(cfg, make_accelerator(cfg), name, Path(cfg.export or Path(cfg.out_dir) / export_name))
    check_run(cfg, n_train, run.accelerator.num_processes, run.ckpt_dir, resume)
    for warning in warnings:
        run.say(f"warning: {warning}")
    set_seed(cfg.seed)
    return run


@dataclass
class Run:
    """A run's accelerator, paths and progress: the optimizer step, the data position (micro-batches
    drawn per process) and the images skipped as unreadable, which checkpoints save and restore."""
    cfg: object
    accelerator: object
    name: str
    export: Path
    step: int = 0
    position: int = 0
    skipped: int = 0
    _pbar: tqdm | None = field(default=None, repr=False)
    _clock: tuple[float, int] = (0.0, 0)  # (time, step) of the last log record: the throughput since

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.out_dir) / "checkpoints"

    @property
    def log_path(self) -> Path:
        return Path(self.cfg.out_dir) / "log.jsonl"

    @property
    def per_step(self) -> int:
        """Images per optimizer step, all processes together."""
        return self.cfg.batch_size * self.cfg.optim.grad_accum * self.accelerator.num_processes

    def say(self, message: str) -> None:
        if self.main_process:
            tqdm.write(message)

    def resume(self, resume: bool, *checkpointed, model) -> None:
        """After `accelerator.prepare`: register `checkpointed` (LR schedule, EMA; None is skipped)
        for checkpoints, seed each process differently (its noise, timesteps, posterior samples),
        then continue from the newest checkpoint with `resume`, or start a fresh log."""
        for obj in checkpointed:
            if obj is not None:
                self.accelerator.register_for_checkpointing(obj)
        set_seed(self.cfg.seed, device_specific=True)
        self.step, self.position, self.skipped = resume_or_start(self.accelerator, resume, self.ckpt_dir,
                                                                 self.log_path, self.say)
        if self.accelerator.log_with:
            self.accelerator.init_trackers(self.name)
        hooks.weights("start", model.state_dict(), self.accelerator.process_index)

    def start_loop(self, loader):
        """Start the progress bar and the throughput clock; return the endless micro-batches from
        the data position on, each counted in `position` and its unreadable images in `skipped`."""
        self._pbar = tqdm(total=self.cfg.max_steps, initial=self.step, disable=not self.main_process,
                          desc=self.name, dynamic_ncols=True)
        self._clock = time.perf_counter(), self.step

        def counted():
            for batch in batches(self.accelerator, loader, self.position):
                self.position += 1
                self.skipped += int(batch["skipped"])
                yield batch
        return counted()

    def step_done(self, lr_scheduler) -> None:
        """After an optimizer step: the LR schedule and the step count move on."""
        lr_scheduler.step()
        self.step += 1
        self._pbar.update(1)

    def train_step(self, loss, module, optimizer, lr_scheduler, ema=None, **stats) -> None:
        """One optimizer step of a one-micro-batch loop (train_classifier.py, train_unclip.py):
        backward, clip, step, EMA, the log when due, a checkpoint when due."""
        accelerator, clip = self.accelerator, self.cfg.optim.grad_clip
        accelerator.backward(loss)
        if clip:
            accelerator.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step_done(lr_scheduler)
        if ema is not None:
            ema.update(accelerator.unwrap_model(module))
        if self.log_due():
            value = loss.item()
            self.write_log(self.log_record({"loss": value, **stats}, lr_scheduler), loss=f"{value:.4f}")
        self.checkpoint_if_due()

    def log_due(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps

    def log_record(self, metrics: dict, lr_scheduler) -> dict:
        """{"step", **metrics, "lr", "images_per_s", "skipped_images"}. Every process must call it."""
        skipped = int(self.accelerator.reduce(torch.tensor(self.skipped, device=self.accelerator.device), "sum"))
        now, (then, step_then) = time.perf_counter(), self._clock
        self._clock = now, self.step
        return {"step": self.step, **metrics, "lr": lr_scheduler.get_last_lr()[0],
                "images_per_s": (self.step - step_then) * self.per_step / (now - then), "skipped_images": skipped}

    def write_log(self, record: dict, **postfix: str) -> None:
        """The record into log.jsonl (main process) and the trackers; `postfix` beside the progress bar."""
        if self.main_process:
            append_jsonl(self.log_path, record)
            self._pbar.set_postfix(**postfix, img_s=f"{record['images_per_s']:.2f}")
        self.accelerator.log(record, step=self.step)

    def checkpoint_if_due(self) -> None:
        """Every checkpoint_every steps: a resumable checkpoint. Every process must call it."""
        if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            save_checkpoint(self.accelerator, self.ckpt_dir, self.step,
                            {"position": self.position, "skipped": self.skipped, "config": asdict(self.cfg)},
                            self.cfg.keep_checkpoints)

    def final_weights(self, prepared, model) -> dict:
        """After the last step, on every process (FSDP/DeepSpeed gather here): the state dict of the
        prepared module."""
        self._pbar.close()
        self.accelerator.wait_for_everyone()
        sd = self.accelerator.get_state_dict(prepared)
        hooks.weights("end", model.state_dict(), self.accelerator.process_index)
        return sd

    def exported(self, note: str = "", **record) -> None:
        """Main process, once the export is written: a last log record and a message."""
        append_jsonl(self.log_path, {"step": self.step, "exported": str(self.export), **record,
                                     "peak_rss_mb": peak_rss_mb()})
        self.say(f"exported {self.export} ({note}peak RSS {peak_rss_mb():.0f} MiB)")
