"""What the training scripts persist, shared by train_ldm.py and train_vae.py: resumable checkpoints
(`accelerator.save_state` into a temporary folder renamed into place when complete, so a kill
mid-write leaves the previous one; the last K kept), the data position, the metrics log, the
autoencoder export, and two test hooks (LDM_TEST_CKPT_PAUSE, LDM_TEST_HASH_DIR)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from . import checkpoint
from .config import AutoencoderConfig, from_dict
from .formats.files import read_safetensors, write_safetensors
from .formats.keys import VAE, split

CKPT_RE = re.compile(r"^step-(\d{8})$")


# ---------------------------------------------------------------------------------------------
# Resumable checkpoints


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
    """The Accelerator both scripts use: accumulation by hand-marked steps, and the same shuffled
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


def lr_factor(optim, max_steps: int):
    """LambdaLR factor at optimizer step s: linear warm-up over optim.warmup_steps, then constant
    or a cosine decay to 0 at max_steps (optim.lr_schedule)."""
    def factor(s: int) -> float:
        if s < optim.warmup_steps:
            return (s + 1) / optim.warmup_steps
        if optim.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (s - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def check_run(cfg, n_train: int, num_processes: int, ckpt_dir: Path, resume: bool) -> None:
    """Refuse, before any work, a dataset smaller than one batch or an out_dir of another run."""
    if n_train < cfg.batch_size * num_processes:
        raise ValueError(f"{n_train} training images, but one batch needs batch_size × processes = "
                         f"{cfg.batch_size * num_processes}: lower batch_size or add images")
    if list_checkpoints(ckpt_dir) and not resume:
        raise ValueError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                         f"or choose another out_dir")


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


def _test_pause(step: int) -> None:
    """Test hook: LDM_TEST_CKPT_PAUSE="STEP:SECONDS" sleeps half-way through that step's checkpoint
    write (state written, not yet renamed), so a test can SIGKILL the process there."""
    spec = os.environ.get("LDM_TEST_CKPT_PAUSE", "")
    if spec and int(spec.split(":")[0]) == step:
        time.sleep(float(spec.split(":")[1]))


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
        _test_pause(step)
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


def batches(accelerator, dataloader, position: int):
    """Endless batches starting after the first `position` batches (per process) of the data order,
    which is fixed by the seed and the epoch: a resumed run sees what the interrupted one would have."""
    epoch, skip = divmod(position, len(dataloader))
    while True:
        dataloader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        epoch, skip = epoch + 1, 0


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


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Autoencoder export (train_vae.py -> train_ldm.py --vae)


def save_autoencoder(sd: dict, cfg: AutoencoderConfig, path: str | Path) -> None:
    """One .safetensors: the weights as `first_stage_model.*`, the AutoencoderConfig in its metadata."""
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: the autoencoder is exported as .safetensors")
    write_safetensors({VAE + k: v for k, v in sd.items()}, path,
                      {"format": "pt", "autoencoder_config": json.dumps(asdict(cfg))})


def load_autoencoder(path: str | Path, allow_pickle: bool = False) -> tuple[AutoencoderConfig, dict]:
    """(config, weights without prefix) from a save_autoencoder file, or the autoencoder of any
    model checkpoint.load reads (ours, an original SD file, a diffusers folder)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        tensors, meta = read_safetensors(path)
        if "autoencoder_config" in meta:
            cfg = from_dict(AutoencoderConfig, json.loads(meta["autoencoder_config"]))
            return cfg, split(tensors, VAE)
    cfg, sd = checkpoint.load(path, allow_pickle=allow_pickle)
    return cfg.autoencoder, split(sd, VAE)


# ---------------------------------------------------------------------------------------------
# Test hook: weight hashes


def state_hash(sd: dict) -> str:
    """sha256 over sorted keys and float32 values: equal hashes mean equal weights."""
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def latent_cache_path(folder: str | Path, items, load_res: int, random_flip: bool, autoencoder) -> Path:
    """folder/latents/<hash>.npy: a new autoencoder, resolution, flip setting or image file gets a
    new cache."""
    fingerprint = [load_res, random_flip, state_hash(autoencoder.state_dict())]
    fingerprint += [(str(i.path), i.path.stat().st_mtime_ns) for i in items]
    return Path(folder) / "latents" / f"{hashlib.sha256(repr(fingerprint).encode()).hexdigest()[:16]}.npy"


def write_test_hash(tag: str, sd: dict, process_index: int) -> None:
    """With LDM_TEST_HASH_DIR set, every process writes `{tag}-rank{i}.txt` holding state_hash(sd)."""
    folder = os.environ.get("LDM_TEST_HASH_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{tag}-rank{process_index}.txt").write_text(state_hash(sd))
