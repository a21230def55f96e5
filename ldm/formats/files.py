"""Files: reading .safetensors (and, opted in, pickle) state dicts, atomic writes of files and
folders, JSON configs, and telling the three checkpoint formats apart."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors file; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {e}. "
                         f"Re-download or re-export it.") from e


def read_tagged(path: str | Path, key: str, what: str, how: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, the JSON under metadata[key]) of one of our side files (a classifier, a prior): a
    ValueError naming `what` it should be and `how` to make one when the file is missing or isn't one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such {what} file ({how})")
    tensors, meta = read_safetensors(path)
    if key not in meta:
        raise ValueError(f"{path}: not a {what} file (no {key} in its metadata)")
    return tensors, json.loads(meta[key])


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> tuple[dict, dict]:
    """(state_dict, metadata) of a .safetensors file, or of a pickle file when allowed."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(f"{path} is a pickle file, which can run arbitrary code when loaded. "
                             f"Convert it to .safetensors, or opt in with allow_pickle=True "
                             f"(--allow-pickle): it is then read with torch.load(weights_only=True).")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"could not read {path} with torch.load(weights_only=True): {e}") from e
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise ValueError(f"{path} holds no state dict")
        return sd, {}
    return read_safetensors(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`: a crash never
    leaves a half-written file, and an existing one stays intact until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the file system can't."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _clean_after_killed_save(path: Path) -> None:
    """Remove what a killed `atomic_write_dir(path)` left beside `path`: its temporary folder, or
    the previous folder it had moved aside, which it first puts back if `path` is missing (the
    kill fell between the two renames)."""
    stale = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-\w+")
    for p in sorted(path.parent.iterdir()):
        if m := stale.fullmatch(p.name):
            if m[1] == "old" and not path.exists():
                os.replace(p, path)
            else:
                shutil.rmtree(p, ignore_errors=True)


def atomic_write_dir(path: str | Path, write) -> None:
    """`write(tmp)` into a temporary folder beside `path` (`.NAME.tmp-XXXX`), then put it in place
    of `path`: a crash at any point leaves at `path` either the complete previous folder or the
    complete new one, never a mix. The next save of `path` cleans up after a killed one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_after_killed_save(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        if not path.exists():
            os.replace(tmp, path)
        elif not _exchange(tmp, path):  # the old folder is then at `tmp`, removed below
            # no atomic swap here: for an instant `path` is missing; a save after a kill then puts it back
            aside = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
            os.replace(path, aside)
            os.replace(tmp, path)
            shutil.rmtree(aside)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "diffusers"
        raise ValueError(f"{path} is a folder without model_index.json: not a diffusers model folder")
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.suffix == ".safetensors":
        _, meta = _metadata(path)
        return "ldm" if "ldm_config" in meta else "original"
    if path.suffix in PICKLE_SUFFIXES:
        return "original"
    raise ValueError(f"{path}: expected a .safetensors file, a diffusers folder, or (with "
                     f"allow_pickle) a .ckpt file")


def _metadata(path: Path) -> tuple[list[str], dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {e}") from e


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def sha256_of(*paths, after_header: bool = False) -> str:
    """sha256 hex of the files' bytes in order; after_header: of a .safetensors file's tensor bytes
    only (A1111's "addnet" hash of a LoRA, what its `Lora hashes` and Civitai match on)."""
    import hashlib
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            if after_header:
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
