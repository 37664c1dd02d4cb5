"""Kills this Python process in the middle of a named write (see
tests/faults.py, which puts this folder first on PYTHONPATH).

With GC_MM_FAULT_DIR set, files opened for writing under that folder whose
name matches GC_MM_FAULT_NAME (fnmatch, default ``*``) are watched; the
GC_MM_FAULT_NTH-th ``write()`` to them of at least GC_MM_FAULT_MIN_BYTES
bytes writes half of its data, flushes it, and sends this process
GC_MM_FAULT_SIGNAL (KILL or INT): a kill -9, or a Ctrl-C, mid-write.
Files opened by path and by descriptor (``os.fdopen``, as temporary files
are) are both seen.
"""
import builtins
import fnmatch
import io
import os
import signal

_FOLDER = os.environ.get('GC_MM_FAULT_DIR')


class _Watched:
    """A file whose writes count towards the fault."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        global _count
        if len(data) >= _MIN_BYTES:
            _count += 1
            if _count == _NTH:
                self._file.write(data[:len(data) // 2])
                self._file.flush()
                os.kill(os.getpid(), _SIGNAL)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __iter__(self):
        return iter(self._file)

    def __enter__(self):
        self._file.__enter__()
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)


def _path(file) -> str:
    if isinstance(file, int):
        try:
            return os.readlink(f'/proc/self/fd/{file}')
        except OSError:
            return ''
    return os.path.realpath(os.fspath(file)) if isinstance(
        file, (str, bytes, os.PathLike)) else ''


def _watching_open(open_):

    def watching_open(file, mode='r', *args, **kwargs):
        handle = open_(file, mode, *args, **kwargs)
        if not any(c in mode for c in 'wax+'):
            return handle
        path = _path(file)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if (path.startswith(_ROOT + os.sep)
                and fnmatch.fnmatch(os.path.basename(path), _NAME)):
            return _Watched(handle)
        return handle

    return watching_open


if _FOLDER:
    _ROOT = os.path.realpath(_FOLDER)
    _NAME = os.environ.get('GC_MM_FAULT_NAME', '*')
    _NTH = int(os.environ.get('GC_MM_FAULT_NTH', '1'))
    _MIN_BYTES = int(os.environ.get('GC_MM_FAULT_MIN_BYTES', '1'))
    _SIGNAL = getattr(signal,
                      'SIG' + os.environ.get('GC_MM_FAULT_SIGNAL', 'KILL'))
    _count = 0
    # os.fdopen calls io.open; builtins.open is the same function.
    builtins.open = io.open = _watching_open(io.open)
