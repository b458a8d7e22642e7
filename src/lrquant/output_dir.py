"""Output folders that nothing else can damage: written atomically, one run at a time, and
replaced only when lrquant wrote them.

A run writes into a temporary sibling folder (``.NAME.tmp-*``) that becomes ``NAME`` by a rename
once everything is in it, so ``NAME`` is never seen half-written. An exclusive lock beside it
(``.NAME.lock``, which also guards the run's resume folder ``.NAME.resume``) keeps a second run
off the same output. ``--overwrite`` replaces only a folder whose every file is listed in its
manifest (:data:`MANIFEST_FILE`, written last by every run), never one that holds the input
model, the data, or the current folder; the old folder is removed only after the new one is in
place. A full disk is reported with the space the write needs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from lrquant import __version__
from lrquant.console import log
from lrquant.errors import LrquantError

try:  # POSIX; where it is missing (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

MANIFEST_FILE = "lrquant_manifest.json"


class OutputLock:
    """An exclusive lock on one output path for the life of a run (``flock`` on ``.NAME.lock``).

    The kernel drops the lock when its process dies, however it dies, so a lock left by a
    crashed run is simply taken over. The file holds the holder's process id, for the message
    a second run gets.
    """

    def __init__(self, output: Path) -> None:
        self.path = output.parent / f".{output.name}.lock"
        self.fd: int | None = None
        if fcntl is None:  # pragma: no cover
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LrquantError(
                    f"output '{output}' is being written by another lrquant run ({holder}, lock "
                    f"'{self.path}'): wait for it to finish or stop it, or choose another --output"
                ) from None
            except OSError as err:  # a file system without locks (some network mounts)
                os.close(fd)
                log(f"cannot lock '{self.path}' ({err.strerror}): make sure no other run writes '{output}'")
                return
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file as we opened it: lock the new one
        previous = _read_holder(fd)
        if previous != "unknown process":
            log(f"taking over the lock of {previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file and unlock (removing first, so a waiting run locks a fresh file)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> str:
    try:
        pid, _, host = os.pread(fd, 200, 0).decode(errors="replace").strip().partition(" ")
    except OSError:
        return "unknown process"
    if not pid:
        return "unknown process"
    return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _contains(folder: Path, path: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def _files(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, as relative paths (hidden ones included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def replace_refusal(folder: Path) -> str | None:
    """Why ``--overwrite`` may not replace ``folder``, or ``None`` when lrquant wrote all of it."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return (
            f"it was not written by lrquant (it has no {MANIFEST_FILE}): --overwrite only replaces "
            "lrquant's own output folders; choose another --output, or delete it yourself"
        )
    try:
        listed = set(json.loads(manifest.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST_FILE} is damaged; choose another --output, or delete it yourself"
    foreign = [name for name in _files(folder) if name not in listed and name != MANIFEST_FILE]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return (
            f"it holds files lrquant did not write ({shown}); move them out, choose another "
            "--output, or delete it yourself"
        )
    return None


def gguf_replace_refusal(path: Path) -> str | None:
    """Why ``--overwrite`` may not replace the file ``path``, or ``None`` when it is a GGUF file
    that lrquant wrote (its ``general.quantized_by``)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field("general.quantized_by")
        by = field.contents() if field is not None else None
    except Exception:  # not a GGUF file at all, or a damaged one: not ours either way
        by = None
    if by != "lrquant":
        return "it is not a GGUF file lrquant wrote; choose another --output, or delete it yourself"
    return None


class _AtomicOutput:
    """A locked temporary sibling (``.NAME.tmp-*``) that becomes ``final`` only on :meth:`commit`.

    Created up front, so an unwritable or refused destination fails before any long work.
    ``protected`` paths (the input model, data files) may be neither ``final`` nor inside it.
    Anything not committed (an error, Ctrl-C) is removed, with the parent folders made for it.
    """

    what = "folder"

    def __init__(self, final: str | Path, overwrite: bool = False, protected: Iterable[Path] = ()) -> None:
        if not str(final).strip():
            raise LrquantError(
                f"the output path is empty: give a {self.what} to write, e.g. --output out/model"
            )
        self.final = Path(final).expanduser().absolute()
        self.overwrite = overwrite
        self._check_protected([*protected, Path.cwd(), Path.home()])
        # Parent folders this run creates are removed again if it fails.
        self.created = [p for p in reversed(self.final.parents) if not p.exists()]
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.lock = OutputLock(self.final)
        except OSError as err:
            self._remove_created()
            raise LrquantError(f"output '{final}' is not writable: {err.strerror or err}") from None
        try:
            self._check_existing()
            self.tmp = self._make_tmp(f".{self.final.name}.tmp-")
        except BaseException as err:
            self.lock.release()
            self._remove_created()
            if isinstance(err, OSError):
                raise LrquantError(f"output '{final}' is not writable: {err.strerror or err}") from None
            raise

    def _make_tmp(self, prefix: str) -> Path:
        raise NotImplementedError

    @classmethod
    def _refusal(cls, final: Path) -> str | None:
        """Why the existing ``final`` may not be replaced (it exists and is of this kind)."""
        raise NotImplementedError

    def _check_protected(self, protected: Iterable[Path]) -> None:
        final = self.final.resolve()
        for path in protected:
            path = Path(path).expanduser().resolve()
            if _contains(final, path):
                what = "is" if path == final else "contains"
                raise LrquantError(
                    f"output '{self.final}' {what} '{path}', which this run reads or runs in: "
                    "choose another --output"
                )

    def _check_existing(self) -> None:
        self.check_destination(self.final, self.overwrite)

    @classmethod
    def check_destination(cls, final: Path, overwrite: bool) -> None:
        """Refuse an existing output unless ``overwrite`` and it is lrquant's (or an empty folder);
        also usable before a run that will write ``final`` at its end, to fail before the work."""
        final = Path(final).expanduser().absolute()
        if final.is_symlink():
            raise LrquantError(
                f"output '{final}' is a symbolic link: give the {cls.what} itself, or another path"
            )
        if not final.exists():
            return
        if final.is_dir() != (cls.what == "folder"):
            kind = "folder" if final.is_dir() else "file"
            raise LrquantError(f"output '{final}' already exists as a {kind}: choose another path")
        if final.is_dir() and not any(final.iterdir()):
            return
        if not overwrite:
            raise LrquantError(
                f"output '{final}' already exists as a {cls.what}: pass --overwrite to replace it"
            )
        reason = cls._refusal(final)
        if reason is not None:
            raise LrquantError(f"--overwrite refuses to replace '{final}': {reason}")

    def _before_commit(self) -> None:
        """Last touches to the finished temporary output."""

    def commit(self) -> Path:
        """Put the finished temporary output in place of ``final`` (which is checked again: it may
        have appeared while the run worked) and remove stale temporaries of earlier runs."""
        try:
            self._check_existing()
        except LrquantError as err:
            raise LrquantError(f"{err} (it appeared while this run was working)") from None
        umask = os.umask(0)
        os.umask(umask)
        for path in [self.tmp, *(self.tmp.rglob("*") if self.tmp.is_dir() else [])]:
            if not path.is_symlink():  # mkstemp, mkdtemp and some writers make files private
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        self._before_commit()
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            _remove(old)
        self._remove_stale()
        return self.final

    def _remove_stale(self) -> None:
        """Temporaries and set-aside outputs of this name left by runs that were killed (the lock
        says no other run is writing them)."""
        prefixes = (f".{self.final.name}.tmp-", f".{self.final.name}.old-")
        for path in self.final.parent.iterdir():
            if path.name.startswith(prefixes) and not path.is_symlink():
                _remove(path)

    def discard(self) -> None:
        """Remove the temporary output (a no-op after :meth:`commit`)."""
        _remove(self.tmp)

    def _remove_created(self) -> None:
        if self.final.exists():
            return
        for parent in reversed(self.created):
            try:
                parent.rmdir()  # only if empty
            except OSError:
                break

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        """Discard what was not committed, unlock, and remove the parent folders made for it."""
        try:
            self.discard()
        finally:
            self.lock.release()
            self._remove_created()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


class AtomicOutputDir(_AtomicOutput):
    """An output folder (see :class:`_AtomicOutput`); ``tmp`` is the folder to write into, and
    :meth:`commit` lists what was written in its manifest."""

    what = "folder"

    def _make_tmp(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.final.parent))

    @classmethod
    def _refusal(cls, final: Path) -> str | None:
        return replace_refusal(final)

    def _before_commit(self) -> None:
        manifest = {"written_by": "lrquant", "lrquant_version": __version__, "files": _files(self.tmp)}
        write_json(self.tmp / MANIFEST_FILE, manifest)


class AtomicOutputFile(_AtomicOutput):
    """An output file (see :class:`_AtomicOutput`); ``tmp`` is the file to write. Only a GGUF file
    that lrquant wrote may be replaced."""

    what = "file"

    def _make_tmp(self, prefix: str) -> Path:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=self.final.parent)
        os.close(handle)
        return Path(name)

    @classmethod
    def _refusal(cls, final: Path) -> str | None:
        return gguf_replace_refusal(final)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a full disk or an exhausted quota; writers that wrap
    the OS error (safetensors) keep only its text."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


@contextlib.contextmanager
def disk_space_for(what: str, folder: Path, needed: int, after: str) -> Iterator[None]:
    """Turn a full disk while writing ``what`` (about ``needed`` bytes) into ``folder`` into one
    message with the space needed and free; ``after`` says what was kept and what to do."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        try:
            free = _mib(shutil.disk_usage(folder).free) + " free"
        except OSError:
            free = "free space unknown"
        raise LrquantError(
            f"the disk is full while writing {what} to '{folder}': it needs about {_mib(needed)} "
            f"({free}); {after}"
        ) from None
