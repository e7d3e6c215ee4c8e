"""Writing output files: atomically, with the permissions ComfyUI's own outputs get, errors in words.

A file is written to a temp file in the target folder and moved into place with `os.replace`, so a
reader never sees half a file and a failure leaves none. The temp file is created with mode 0666
filtered by the process umask, which is what `open(path, "wb")` gives and therefore what ComfyUI's
SaveImage (PIL `Image.save`) gives its PNGs: with the usual umask 022, 0644, readable by other
accounts (a service user, a shared box). That mode is set again after writing, since `tempfile.mkstemp`
and safetensors' own atomic save (0.8) give 0600.

A failure (read-only or immutable folder, full disk, quota) raises an OSError whose message names
the target path and the cause in words instead of the temp file's errno line.

A process killed while writing (`kill -9`, a power cut) cannot remove its temp file. Each write
therefore first removes, in its folder, the temp files of our own pattern (`.<name>.<8 hex>.tmp`)
last modified before this process started (`PROCESS_STARTED`): another process's write in progress
keeps touching its file, and this process's own are never that old. So a folder needs this sweep once
per process (a temp left later is this process's, or newer than it): it is not repeated per write.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

_WRITABLE = "make the folder writable for the account the server runs as, or choose another filename prefix"
_SPACE = "free some space, or choose a filename prefix on another disk"
_CAUSES = {  # errno → (the cause in words, the fix)
    errno.EACCES: ("permission denied: the folder is read-only for this account", _WRITABLE),
    errno.EPERM: ("operation not permitted: the folder or file system is read-only or immutable", _WRITABLE),
    errno.EROFS: ("the file system is mounted read-only", "choose a filename prefix on a writable disk"),
    errno.ENOSPC: ("the disk is full (no space left on device)", _SPACE),
    errno.EDQUOT: ("this account's disk quota is used up", _SPACE),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter filename prefix"),
}
_RUST_OS_ERROR = re.compile(r"os error (\d+)")  # safetensors reports I/O errors as "... (os error 28)"
_STEPS = re.compile(r"_(\d+)_steps_")
_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # write_atomically's temp file names


def _process_start() -> float:
    """When this process started (wall clock, seconds): from /proc where there is one, else now (this
    module is imported when the pack loads, before any write)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


PROCESS_STARTED = _process_start()
_SWEPT: set[str] = set()  # folders whose stale temps this process has removed


def steps_name(stem: str, steps: int | None, counter: int | str, suffix: str = ".safetensors") -> str:
    """The pack's file names, the one place they are spelled: `<stem>_<steps>_steps_<counter>_<suffix>`
    (Save LoRA, checkpoints, previews), `<stem>_<counter>_<suffix>` without steps. A number counter is
    5 digits (ComfyUI's SaveImage counter); `steps_in_name` reads the steps back."""
    count = f"{counter:05}" if isinstance(counter, int) else counter
    return f"{stem}_{steps}_steps_{count}_{suffix}" if steps is not None else f"{stem}_{count}_{suffix}"


def steps_names(stem: str, suffix: str = ".safetensors") -> re.Pattern:
    """The names `steps_name(stem, <any steps>, <any counter>, suffix)` gives, as a full-match regex."""
    return re.compile(re.escape(stem) + r"_\d+_steps_\d+_" + re.escape(suffix) + "$")


def steps_in_name(name: str) -> int | None:
    """N of a name `…_<N>_steps_…` (what `steps_name` writes, also core's SaveLoRA), else None."""
    match = _STEPS.search(os.path.basename(name))
    return int(match.group(1)) if match else None


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], what: str = "file",
                     overwrite: bool = False) -> Path:
    """Create `path` through `write(temp_path)`: the pack's one atomic write (outputs, states, the tiny
    base, benchmark results, headless downloads). Never overwrites unless `overwrite` (a result file
    that is meant to be replaced).

    Raises FileExistsError if `path` exists (without `overwrite`), and OSError / PermissionError
    naming `path` and the cause when the folder cannot be made or written. `what` names the file in
    messages ("LoRA"). Standard library only: the headless client uses it without torch.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; choose another filename prefix")
    if str(path.parent) not in _SWEPT:
        remove_stale_temps(path.parent)
        _SWEPT.add(str(path.parent))
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask, as open() gives
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
        write(str(tmp))
        os.chmod(tmp, mode)  # the writer may have replaced the file: safetensors writes its own 0600 temp file
        os.replace(tmp, path)
    except Exception as err:
        cause = write_error_cause(err)
        if cause is None:
            raise
        code, words, fix = cause
        kind = PermissionError if code in (errno.EACCES, errno.EPERM, errno.EROFS) else OSError
        raise kind(f"cannot write the {what} {path}: {words}; {fix}") from err
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_stale_temps(folder: Path, before: float | None = None) -> list[Path]:
    """Remove the temp files of `write_atomically`'s pattern in `folder` last modified before `before`
    (default: when this process started), left by a process killed while writing; returns them.
    Nothing else is touched, and a file that cannot be removed is left (with a debug line)."""
    cutoff = PROCESS_STARTED if before is None else before
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet, or not readable: the write itself says why
        return removed
    for entry in entries:
        if not _TEMP.match(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError as err:
            log.debug("could not remove the stale temp file %s: %s", entry.path, err)
    if removed:
        log.info("removed %d temp file(s) left in %s by an interrupted write: %s", len(removed), folder,
                 ", ".join(p.name for p in removed))
    return removed


def write_error_cause(err: BaseException) -> tuple[int, str, str] | None:
    """(errno, the cause in words, the fix) of an OSError or a library error carrying an OS error; else None."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        match = _RUST_OS_ERROR.search(str(err))
        code = int(match.group(1)) if match else None
    if code is None:
        return None
    words, fix = _CAUSES.get(code, (os.strerror(code), "check the folder, or choose another filename prefix"))
    return code, words, fix
