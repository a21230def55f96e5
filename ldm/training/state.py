"""What a training run persists and resumes from: checkpoints (`accelerator.save_state` into a
temporary folder renamed into place when complete, so a kill mid-write leaves the previous one; the
last K kept), the data position, and the metrics log (cut back to the checkpoint on resume)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from . import hooks

CKPT_RE = re.compile(r"^step-(\d{8})$")


# ---------------------------------------------------------------------------------------------
# Resumable checkpoints


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary `.tmp-step-*` folders are never listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CKPT_RE.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def _fsync_tree(folder: Path) -> None:
    """Flush the files and the folder entry, so the rename never exposes unwritten data."""
    for p in [*folder.iterdir(), folder]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(accelerator, folder: str | Path, step: int, meta: dict, keep: int) -> Path:
    """Model, optimizer, registered objects (EMA, LR schedule), RNG states of every process, and
    `meta` (step, data position, ...) into folder/step-NNNNNNNN. All processes must call it."""
    folder = Path(folder)
    final, tmp = folder / f"step-{step:08d}", folder / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # each process writes its own RNG state; weights from the main one
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        hooks.checkpoint_written(step, tmp)
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(folder)[:-max(keep, 1)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Restore everything save_checkpoint wrote (call after `accelerator.prepare` and
    `register_for_checkpointing`); returns its meta dict. Leftover temporary folders are removed."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    accelerator.load_state(str(path))
    if accelerator.is_main_process:
        for stale in path.parent.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return meta


def resume_or_start(accelerator, resume: bool, ckpt_dir: Path, log_path: Path, say) -> tuple[int, int, int]:
    """(step, data position, skipped images): from the newest checkpoint with `resume`, else a
    fresh log. The log is cut back to the checkpoint's step, so the curve continues without repeats."""
    if resume and (last := latest_checkpoint(ckpt_dir)) is not None:
        meta = load_checkpoint(accelerator, last)
        if accelerator.is_main_process:
            trim_jsonl(log_path, meta["step"])
        say(f"resumed from {last} at step {meta['step']}")
        return meta["step"], meta["position"], meta["skipped"]
    if resume:
        say(f"no checkpoint in {ckpt_dir}: starting from step 0")
    if accelerator.is_main_process:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
    return 0, 0, 0


def batches(accelerator, dataloader, position: int):
    """Endless batches starting after the first `position` batches (per process) of the data order,
    which is fixed by the seed and the epoch: a resumed run sees what the interrupted one would have."""
    epoch, skip = divmod(position, len(dataloader))
    while True:
        dataloader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        epoch, skip = epoch + 1, 0


def state_hash(sd: dict) -> str:
    """sha256 over sorted keys and float32 values: equal hashes mean equal weights."""
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Metrics log


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_jsonl(path: str | Path, max_step: int) -> None:
    """Drop records after `max_step` (logged by a run that was then killed), so the resumed curve
    continues the checkpoint's without duplicates."""
    path = Path(path)
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
        path.write_text("".join(ln + "\n" for ln in keep))
