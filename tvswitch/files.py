"""The one way tvswitch writes a file: atomically, with the mode a plain write gives, never over an input.

Every file the project writes (bundles, rebuilt weights, run's outputs, ONNX graphs,
kernel caches and shipped kernel images) goes through ``atomic_write``:

* a temporary file beside the target (``.tvswitch-*.tmp``), written, fsync'ed, given the
  mode a plain ``open(path, "w")`` would give it (or the mode of the file it replaces),
  renamed over the target, then the folder fsync'ed: a crash, a kill or a full disk
  leaves the old file or the new one, never half of one;
* a symbolic link is written through to its target (the link stays a link);
* a device node, FIFO or socket is refused: tvswitch writes regular files only (as root,
  ``-o /dev/null`` would otherwise replace the system's);
* temporary files of this naming that a killed writer left in that folder, and older
  than any live writer's could be (``STALE_SECONDS``: a writer renames its file the
  moment it is written), are removed first.

``same_file`` tells a verb whether an output would overwrite one of its inputs; the CLI
refuses that before any work (``commands._inputs.check_output_path``).
"""
from __future__ import annotations

import os
import stat
import tempfile
import time
from typing import Callable, Iterable, Optional, Union

from tvswitch.errors import TvswitchError

TEMP_PREFIX = ".tvswitch-"
TEMP_SUFFIX = ".tmp"
#: A temporary file untouched this long belongs to no live writer: tvswitch writes one
#: in a single pass and renames it at once (an hour is a 36 GB write at 10 MB/s).
STALE_SECONDS = 3600.0


def resolve_output(path: str) -> str:
    """The file a write to ``path`` replaces: links followed; refused if it is no regular file."""
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise TvswitchError("%s: is a folder, give a file name" % path)
    if os.path.exists(target):
        mode = os.stat(target).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
            raise TvswitchError("%s: is %s; tvswitch writes regular files only" % (path, kind))
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise TvswitchError("%s: folder %s does not exist" % (path, folder))
    return target


def same_file(a: Optional[str], b: Optional[str]) -> bool:
    """Whether paths ``a`` and ``b`` name one existing file (links and hard links included)."""
    if not a or not b or not os.path.exists(a) or not os.path.exists(b):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def atomic_write(path: str, content: Union[bytes, Callable[[str], None]]) -> str:
    """Write ``content`` (bytes, or a function that writes the file at the path it is given)
    to ``path`` atomically; returns the file written (the link's target for a link).

    A full disk, a file-size limit or a writer library's own error (safetensors reports a
    full disk as a SafetensorError) becomes a ``TvswitchError`` naming ``path``, not the
    temporary file; an ``OSError`` about another file passes as it is.
    """
    target = resolve_output(path)
    folder = os.path.dirname(target)
    remove_stale_temps(folder)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    try:
        try:
            if isinstance(content, (bytes, bytearray, memoryview)):
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
            else:
                os.close(fd)
                content(tmp)
            os.chmod(tmp, _file_mode(target))
            _fsync(tmp, strict=True)
            os.replace(tmp, target)
        except OSError as exc:
            if exc.filename not in (None, tmp):
                raise
            raise TvswitchError("%s: cannot write it (%s)" % (path, exc.strerror or exc)) from None
        except (TvswitchError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a writer library's own error (safetensors' SafetensorError)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TvswitchError("%s: cannot write it (%s)" % (path, first)) from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync(folder, strict=False)  # some filesystems cannot fsync a folder; the rename stands
    return target


def remove_stale_temps(folder: str, now: Optional[float] = None) -> int:
    """Remove this writer's temporary files older than ``STALE_SECONDS`` from ``folder``; returns how many."""
    now = time.time() if now is None else now
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in _temp_names(names):
        full = os.path.join(folder, name)
        try:
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > STALE_SECONDS:
                os.unlink(full)
                removed += 1
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def _temp_names(names: Iterable[str]) -> Iterable[str]:
    return (n for n in names if n.startswith(TEMP_PREFIX) and n.endswith(TEMP_SUFFIX))


def _file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        pass
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def _fsync(path: str, strict: bool) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if strict:
            raise
