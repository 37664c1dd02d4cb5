"""Writes that an interruption cannot leave half-done under the final name.

Every file gc_mm or its tools write for a later run to read goes through
:func:`atomic_write`: the content goes to a temporary file beside the target,
named after its owner and its target
(``.tmp-<pid>@<host>.<random>.<target name>``), which is renamed into place
once complete. A run killed midway leaves only such a temporary; the next
process to write into the same folder removes those whose process is gone
(:func:`remove_stale_temporaries`). Generated folders (the demo data) are
built the same way (:func:`temporary_folder`).

A write that fails for lack of space or permission raises
:class:`WriteError`, whose message is one line naming the folder and the
reason; nothing is left behind.

Standard library only: setup.py uses it before gc_mm's dependencies are
installed.
"""
import errno
import os
import os.path as osp
import shutil
import socket
import tempfile

# The reasons a write fails that the user fixes outside the program: no
# space, a quota, a read-only file system, a file size limit; and no
# permission, which a read can meet too (so only for a known write).
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM)
TMP_PREFIX = '.tmp-'
_CLEANED = set()  # the folders whose stale temporaries this process removed


class WriteError(OSError):
    """A write that failed for a reason outside the program (full disk,
    read-only folder); ``str()`` is one line naming the folder."""

    def __str__(self) -> str:
        return f'cannot write to {self.filename}: {self.strerror}'


def _host() -> str:
    return socket.gethostname().split('.')[0] or 'localhost'


def _owner() -> str:
    return f'{os.getpid()}@{_host()}'


def _alive(owner: str) -> bool:
    """Whether the process ``<pid>@<host>`` may still run: True for another
    host's (it cannot be checked from here) and for a name not of this
    format."""
    pid, _, host = owner.partition('@')
    if host != _host() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str, prefix: str = TMP_PREFIX) -> list:
    """Remove the temporaries (files or folders named ``<prefix><pid>@<host>.``)
    in ``folder`` whose process is gone; return their paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        owner = name[len(prefix):].split('.', 1)[0]
        if '@' not in owner or _alive(owner):
            continue
        path = osp.join(folder, name)
        try:
            if osp.isdir(path) and not osp.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:  # another process removed it first
            continue
        except OSError:
            continue  # e.g. a read-only folder: the write itself will say
        removed.append(path)
    return removed


def write_error(error: BaseException, folder: str = None,
                writing: bool = False):
    """A :class:`WriteError` for ``error`` (or the OSError it was raised
    from) when it is a disk failure, or a permission failure of a write
    (``writing``, or a ``folder`` written to), else None."""
    errnos = DISK_ERRNOS + (PERMISSION_ERRNOS if writing or folder else ())
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, WriteError):
            return error
        if isinstance(error, OSError) and error.errno in errnos:
            where = folder or (osp.dirname(osp.abspath(error.filename))
                               if error.filename else 'a folder')
            return WriteError(error.errno, os.strerror(error.errno), where)
        error = error.__cause__ or error.__context__
    return None


def atomic_write(path: str, write, binary: bool = True,
                 encoding: str = 'utf-8', mode: int = 0o644) -> None:
    """Write ``path`` through ``write(file)`` on a temporary file beside it,
    renamed into place once complete. On any failure or interruption the
    temporary is removed (a kill leaves it, for the next process writing
    into the folder to remove); a full disk or read-only folder raises
    :class:`WriteError`."""
    path = str(path)
    folder = osp.dirname(osp.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        if folder not in _CLEANED:  # once per process and folder
            remove_stale_temporaries(folder)
            _CLEANED.add(folder)
        handle, tmp = tempfile.mkstemp(
            prefix=f'{TMP_PREFIX}{_owner()}.',
            suffix='.' + osp.basename(path), dir=folder)
    except OSError as error:
        raise write_error(error, folder) or error
    try:
        with os.fdopen(handle, 'wb' if binary else 'w',
                       **({} if binary else dict(encoding=encoding))) as f:
            write(f)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as error:
        os.unlink(tmp)
        failure = write_error(error, folder)
        if failure is not None:
            raise failure from error
        raise


def atomic_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` through a temporary file (mode bits kept)."""
    with open(src, 'rb') as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f),
                     mode=os.stat(src).st_mode & 0o7777)


def temporary_folder(final: str, prefix: str) -> str:
    """A new folder beside ``final`` to build it in (named
    ``<prefix><pid>@<host>.<random>``, readable like a folder made with
    os.makedirs), after removing the leftovers of killed builders."""
    parent = osp.dirname(osp.abspath(final))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f'{prefix}{_owner()}.', dir=parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp
