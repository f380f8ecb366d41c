"""The one way mixrank writes a file: atomically, as a normal file, never over a non-file.

Every artifact (factors file, ONNX model and its external data, engine, report,
manifest, cached model) goes through `atomic_write`: the writer fills a private
temporary folder next to the destination, the result gets the mode a normal file
gets (``0666 & ~umask``, not ``mkstemp``'s 0600), and it is renamed into place, so a
reader sees the old file or the whole new one, never half of one. A failure leaves
nothing behind. See docs/design.md, "Files".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from ._errors import MixrankError, WriteError


def file_mode() -> int:
    """``0666 & ~umask``: the mode ``open()`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_writable_path(path: str | os.PathLike, *, inputs: tuple = (), overwrite_input: bool = False) -> Path:
    """Refuse an output path that cannot or must not be written, before any work is done.

    Refused: an existing path that is not a regular file (a directory, a device, a
    FIFO, a socket), an output that is one of ``inputs`` (unless ``overwrite_input``),
    and a folder that cannot be created or written.

    Raises:
        MixrankError: names the path and what is wrong with it.
    """
    path = Path(path)
    if _exists(path):
        try:
            st = path.stat()
        except OSError as e:
            raise MixrankError(f"cannot write {path}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise MixrankError(f"{path} is a directory; give a file path")
        if not stat.S_ISREG(st.st_mode):
            raise MixrankError(f"{path} exists and is not a regular file (a device, pipe or socket); "
                               "mixrank only replaces regular files")
        for other in inputs:
            if other is not None and Path(other).exists() and os.path.samefile(path, other):
                if not overwrite_input:
                    raise MixrankError(f"the output {path} is the input {other}; write elsewhere or "
                                       "pass --overwrite")
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise MixrankError(f"cannot write {path}: {probe} is not a directory")
    try:  # a real write: permission bits say nothing to root, and a read-only mount says nothing to them
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".mixrank-probe-"):
            pass
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e} ({probe})") from None
    return path


def _exists(path: Path) -> bool:
    """Whether ``path`` exists (a dangling link counts), refusing a name longer than the
    file system allows, or a path the OS cannot look up, with one line."""
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > 255 and longest > (name_max := _name_max(path.parent)):  # pathconf only for a long name
        raise MixrankError(f"cannot write {str(path)[:60]}...: a name in it is {longest} bytes, and this file "
                           f"system allows {name_max}")
    try:
        return path.exists() or path.is_symlink()
    except OSError as e:  # a path too long as a whole, a component that is not a folder
        raise MixrankError(f"cannot write {str(path)[:60]}...: {e.strerror or e}") from None


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system under ``folder`` allows (255 on Linux)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


TMP_PREFIX = ".mixrank-"  # atomic_write's private folders: .mixrank-<pid>-<random>.tmp
TMP_SUFFIX = ".tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the private folders that `atomic_write` left in ``folder`` when its process
    was killed (``kill -9``, power loss): those of our own naming whose process is gone.
    A live writer's folder is left alone. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        name = p.name
        if not (name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)) or not p.is_dir() or p.is_symlink():
            continue
        pid = name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def output_dir(path: str | os.PathLike) -> tuple[Path, bool]:
    """Make ``path`` an output folder (created when missing); returns (path, created).

    Raises:
        MixrankError: it exists and is not a folder, or it cannot be created or written.
    """
    path = Path(path)
    if _exists(path) and not path.is_dir():
        raise MixrankError(f"the output folder {path} exists and is not a folder")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create the output folder {path}: {e.strerror or e}") from None
    try:
        check_writable_path(path / ".mixrank-write-test")
    except MixrankError:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return path, created


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, command: str = ""):
    """An output folder held for one writer: created when missing (`output_dir`), locked
    (`FolderLock`) while the block runs, and removed again if the block fails before
    writing anything into a folder it created.

    Args:
        path: the folder.
        command: what holds the lock, written into the lock file for another writer's
            error message (``""``: nothing said).

    Yields:
        The folder's `Path`.
    """
    out, created = output_dir(path)
    try:
        with FolderLock(out, command):
            yield out
    except BaseException:
        if created and all(p.name == FolderLock.NAME for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise


class FolderLock:
    """An exclusive lock on an output folder (``fcntl.flock`` on ``<folder>/.mixrank.lock``,
    which holds the owner's PID and command), so that two runs never write one folder.
    Released when the process ends, even by ``kill -9``."""

    NAME = ".mixrank.lock"

    def __init__(self, folder: str | os.PathLike, command: str = ""):
        self.path = Path(folder) / self.NAME
        self.command = command
        self.fh = None

    def __enter__(self) -> FolderLock:
        import fcntl

        try:
            self.fh = open(self.path, "a+")
        except OSError as e:
            raise WriteError(f"cannot lock the output folder {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            self.fh = None
            raise MixrankError(f"the output folder {self.path.parent} is in use by {holder}; wait for it or "
                               "choose another --out") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"process {os.getpid()} ({self.command})\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            self.fh.close()  # closing releases the lock; the file stays (removing it would race)
            self.fh = None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically through ``write(tmp)``.

    ``write`` receives a path inside a fresh private folder next to ``path`` and writes
    the file there (it may also write companion files into that folder, e.g. an ONNX
    model's ``<name>.data``). Every file it wrote gets the normal file mode and is
    renamed next to ``path`` (companions first, ``path`` last). On any failure nothing
    is left behind and the destination is untouched. A folder a killed writer left here
    is removed first (`clean_stale_temporaries`).

    Raises:
        MixrankError: the destination is not a regular file, or the disk/permissions
            refuse the write (the OS reason is named).
    """
    path = Path(path)
    check_writable_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path.parent)
        # a short name of its own: the file keeps its name inside, so a 255-byte name still fits
        tmpdir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=TMP_SUFFIX, dir=path.parent))
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        tmp = tmpdir / path.name
        try:
            write(tmp)
        except WriteError:
            raise
        except OSError as e:
            raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
        if not tmp.is_file():
            raise RuntimeError(f"the writer of {path} produced no file")
        mode = file_mode()
        names = sorted(p.name for p in tmpdir.iterdir() if p.name != path.name) + [path.name]
        for name in names:
            os.chmod(tmpdir / name, mode)
        for name in names:
            dest = path.parent / name
            if dest.exists() and not dest.is_file():
                raise MixrankError(f"{dest} exists and is not a regular file; mixrank only replaces "
                                   "regular files")
            os.replace(tmpdir / name, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (`atomic_write`); returns the path."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (`atomic_write`); returns the path."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_text(obj, indent: int | None = 1) -> str:
    """``obj`` as strict JSON: a float that is not finite (NaN, ±inf: what an unmeasurable
    figure can come to) is written as ``null``, since bare ``NaN`` is not JSON and other
    readers refuse the file."""
    import json
    import math

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of the file at ``path`` (hex), read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
