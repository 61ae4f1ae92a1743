"""The run directory: chosen once (rank 0 decides), locked against a second run, removed again when
a run fails before it wrote anything, and the checkpoint to resume from."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from typing import Iterator

import torch

from t2t_vit.errors import T2TViTError
from t2t_vit.train import state as ckpt
from t2t_vit.train.checks import flag
from t2t_vit.train.config import FREE_ON_RESUME, TrainConfig
from t2t_vit.train.distributed import World, broadcast_flag

LOCK_NAME = ".lock"

try:  # POSIX advisory locks; where there are none (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# An flock belongs to the open file, which forked children (DataLoader workers) share: they would
# hold a SIGKILLed trainer's lock until they notice their parent is gone. Each child closes its copy
# right after the fork, so the lock lives exactly as long as the trainer.
_HELD_FDS: set[int] = set()


def _close_held_in_child() -> None:
    if not _HELD_FDS:
        return
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in _HELD_FDS:  # /dev/null in its place: the child's file object may still close it later
            os.dup2(null, fd)
        os.close(null)
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def shared_output(cfg: TrainConfig, world: World) -> str:
    """The output dir, decided once by rank 0 (timestamps could differ between ranks)."""
    if cfg.output:
        out = cfg.output
    elif cfg.resume == "auto":
        pattern = cfg.resolved_output().rsplit("-", 2)[0] + "-*"
        found = sorted(p for p in glob.glob(pattern) if os.path.isfile(os.path.join(p, "checkpoint-last.safetensors")))
        out = found[-1] if found else cfg.resolved_output()
    else:
        out = cfg.resolved_output()
    if world.distributed:
        box = [out]
        torch.distributed.broadcast_object_list(box, src=0)
        out = box[0]
    return out


@contextlib.contextmanager
def lock_output(out: str) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (created if missing) while the block runs.

    A second run on the same directory fails at once with one line and writes nothing; if this call
    created the directory and the block fails while the directory holds nothing but the lock, the
    directory is removed again (a data or model error leaves no empty run behind).
    """
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        handle = open(os.path.join(out, LOCK_NAME), "a+")
    except OSError as err:
        raise T2TViTError(f"cannot write to output directory {out}: {err.strerror or err}") from err
    fd = handle.fileno()
    try:
        _acquire(handle, out)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD_FDS.add(fd)
        yield
    except BaseException:
        _HELD_FDS.discard(fd)
        handle.close()
        if created:
            _remove_if_only_lock(out)
        raise
    _HELD_FDS.discard(fd)
    handle.close()


def _acquire(handle, out: str) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise T2TViTError(f"another training run (pid {holder}) is using {out}; wait for it to finish or choose "
                          "another --output") from err


def _remove_if_only_lock(out: str) -> None:
    try:
        if set(os.listdir(out)) <= {LOCK_NAME}:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out, LOCK_NAME))
            os.rmdir(out)
    except OSError:  # someone else put something there meanwhile: leave it as it is
        return


def identity(out: str) -> tuple[int, int] | None:
    """(device, inode) of the run directory's lock file; None once it is gone."""
    try:
        st = os.stat(os.path.join(out, LOCK_NAME))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_writable(out: str) -> None:
    try:
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise T2TViTError(f"cannot write to output directory {out}: {err.strerror or err}") from err


def resume_stem(cfg: TrainConfig, out: str) -> str | None:
    """The checkpoint stem to resume from, or None for a new run (refusing to overwrite one)."""
    last = os.path.join(out, "checkpoint-last")
    if cfg.resume == "auto":
        return last if os.path.isfile(last + ".safetensors") else None
    if cfg.resume:
        return ckpt.checkpoint_stem(cfg.resume)
    if os.path.isfile(last + ".safetensors"):
        raise T2TViTError(f"{out} already holds a run; pass --resume auto to continue it or choose another --output")
    return None


def saved_config(stem: str) -> dict | None:
    """The config.yaml of the run that wrote checkpoint ``stem`` (None when there is none)."""
    from t2t_vit.train.checks import read_yaml

    path = os.path.join(os.path.dirname(stem), "config.yaml")
    try:
        with open(path, "rb") as f:
            saved = read_yaml(f.read(), path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise T2TViTError(f"cannot read {path}: {err.strerror or err}") from err
    return saved if isinstance(saved, dict) else None


def resume_changes(cfg: TrainConfig, stem: str) -> list[str]:
    """The settings that differ from the run's own: a one-line refusal when any of them cannot change
    in the middle of a run, else ``--flag new (the run had old)`` for each one the resume applies."""
    saved = saved_config(stem)
    if saved is None:
        return []
    import yaml

    new = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # as config.yaml holds it: tuples → lists
    differ = [name for name in new if name in saved and saved[name] != new[name]]
    fixed = [name for name in differ if name not in FREE_ON_RESUME]
    if fixed:
        listed = ", ".join(f"{flag(n)} {_text(new[n])} differs from the run's {_text(saved[n])}" for n in fixed)
        raise T2TViTError(f"cannot resume {stem}: {listed}; resume takes the run's settings "
                          f"(its config.yaml), or start a new --output")
    return [f"{flag(n)} {_text(new[n])} (the run had {_text(saved[n])})" for n in differ
            if n not in ("output", "resume")]


def _text(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, str)) else str(value)


def remove_stale_temporaries(out: str) -> None:
    """Temporary files of writes cut short by a kill (``.checkpoint-last.state.pt.<random>.tmp``);
    the caller holds the lock, so no write of this run is under way."""
    for path in glob.glob(os.path.join(glob.escape(out), ".*.tmp")):
        with contextlib.suppress(OSError):
            os.remove(path)


def claim(cfg: TrainConfig, world: World, out: str, stack: contextlib.ExitStack) -> str | None:
    """Rank 0 locks ``out`` (until ``stack`` closes) and checks it; every rank returns the checkpoint
    stem to resume, or raises when rank 0 failed (so the others do not wait for it forever)."""
    error = None
    if world.is_main:
        try:
            stack.enter_context(lock_output(out))
            check_writable(out)
            stem = resume_stem(cfg, out)
            if stem:
                resume_changes(cfg, stem)
                remove_stale_temporaries(out)
        except T2TViTError as err:
            error = err
    if broadcast_flag(error is not None, world):
        raise error or T2TViTError("the main process could not prepare the output directory")
    return resume_stem(cfg, out)
