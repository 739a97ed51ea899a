"""Write files and folders so that a crash never leaves something that looks finished.

Temporary names carry their owner's pid (``.<name>.tmp-<pid>-<random>``), so the next write to the same name
removes what a killed run left there. ``exclusive(path)`` keeps two runs from writing one output at once, and
``check_output_path`` refuses an output that cannot be written before any work starts. ``counting_writes()``
adds up the bytes every writer of the block reports through ``count_written`` (a prune report's bytes written).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tyr.errors import TyrError

log = logging.getLogger(__name__)
_held_locks: dict[Path, int] = {}  # lock file -> how many nested `exclusive` blocks of this process hold it


class WriteCounter:
    """Bytes written to disk while a ``counting_writes()`` block is open."""

    def __init__(self) -> None:
        self.bytes = 0


_counters: list[WriteCounter] = []


@contextlib.contextmanager
def counting_writes() -> Iterator[WriteCounter]:
    """Count, in the yielded counter, every byte the writers report with ``count_written`` during the block."""
    counter = WriteCounter()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def count_written(nbytes: int) -> None:
    """Called by the code that writes a file, with the file's size: every open ``counting_writes`` block adds it."""
    for counter in _counters:
        counter.bytes += nbytes


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist); what a folder takes on disk, links aside."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it to ``final`` only if the block succeeds."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; a finished folder is read by servers running as other users
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a folder finished elsewhere (in a work folder) to ``final``, replacing what is there; a crash leaves
    either the old folder or the new one under that name."""
    staging, final = Path(staging), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    try:
        os.replace(staging, final)
    except OSError:  # the work folder is on another filesystem
        shutil.move(str(staging), str(final))
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to fill; if the block succeeds it is fsynced, renamed to
    ``path`` and its size counted, else removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        count_written(path.stat().st_size)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with _replacing(path) as tmp:
        tmp.write_bytes(text.encode())
    return path


def atomic_save_tensors(tensors: dict, path: str | os.PathLike) -> int:
    """Write torch tensors as safetensors, atomically; their size on disk."""
    from safetensors.torch import save_file

    path = Path(path)
    with _replacing(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    return path.stat().st_size


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temps(final: str | os.PathLike) -> None:
    """Remove the temporary files and folders beside ``final`` whose owner (the pid in their name) is gone."""
    final = Path(final)
    stem = f".{final.name}.tmp-"
    for path in map(Path, glob.glob(glob.escape(str(final.parent / stem)) + "*")):
        pid = path.name[len(stem):].partition("-")[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        log.info("removing %s, left by an interrupted run (pid %s)", path, pid)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_output_path(path: str | os.PathLike, folder: bool = True) -> Path:
    """Refuse an output ``path`` (a folder, or a file if not ``folder``) that cannot be created or replaced.

    Call it before any heavy work. Creates nothing: it only tries a throwaway file where the output would go."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise TyrError(f"{path} exists and is not a {'folder' if folder else 'file'}")
    ancestor = path.absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TyrError(f"cannot write {path}: {ancestor} is a file, not a folder")
    _try_writing_in(ancestor, path)
    if folder and path.is_dir():
        _try_writing_in(path, path)
    return path


def _try_writing_in(directory: Path, target: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".tyr-write-check-", dir=directory)
    except OSError as err:
        raise TyrError(f"cannot write {target}: cannot create files in {directory} ({err.strerror})") from err
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def exclusive(target: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of ``target`` (the file ``.<name>.lock`` beside it) for the block; fail at once if another
    process holds it. Nested blocks of one process on one target share the lock; the file is removed at the end."""
    target = Path(target).expanduser().absolute()
    lock = target.with_name(f".{target.name}.lock")
    if lock in _held_locks:
        _held_locks[lock] += 1
        try:
            yield
        finally:
            _held_locks[lock] -= 1
        return
    created = _make_parents(lock.parent)
    try:
        fd = _acquire(lock, target)
    except BaseException:
        _remove_empty(created)
        raise
    _held_locks[lock] = 1
    try:
        yield
    finally:
        del _held_locks[lock]
        lock.unlink(missing_ok=True)
        os.close(fd)
        _remove_empty(created)


def _acquire(lock: Path, target: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TyrError(f"another tyr run (pid {owner}) holds {target}; wait for it to finish or stop it") from None
        try:
            same_file = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:  # else the previous holder removed the file between our open and flock: try again
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return the created ones, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for path in directories:  # deepest first; a folder that holds the output is not empty and stays
        with contextlib.suppress(OSError):
            path.rmdir()
