"""Fault injection for the tests of interrupted runs (tests/test_faults.py).

- :func:`killed_at_write`: the environment that makes a tool (any Python
  process) kill itself halfway through a named write, with SIGKILL (an
  out-of-memory killer, ``kill -9``) or SIGINT (Ctrl-C); see
  tests/fault_shim/sitecustomize.py.
- :func:`run_until`: run a command and kill its process group once it
  prints a given line (a step of tools/install.sh).
- :func:`repo_copy`: a copy of this checkout (its tracked files and the
  installed kernels) to break and rerun things in.
- :func:`tmpfs`: a small tmpfs (a disk that fills up), read-only if asked;
  the test is skipped where mounting is not allowed.
"""
import contextlib
import glob
import os
import os.path as osp
import shutil
import signal
import subprocess

import pytest

from conftest import REPO

SHIM = osp.join(osp.dirname(osp.abspath(__file__)), 'fault_shim')


def killed_at_write(folder, name='*', nth=1, min_bytes=1,
                    signal_name='KILL') -> dict:
    """Environment variables that kill a Python process at the ``nth``
    write of at least ``min_bytes`` bytes to a file under ``folder`` whose
    name matches ``name`` (a temporary file's name ends with its
    target's). gc_mm is imported from this checkout."""
    path = os.environ.get('PYTHONPATH')
    return dict(PYTHONPATH=os.pathsep.join([SHIM, REPO] +
                                           ([path] if path else [])),
                GC_MM_FAULT_DIR=str(folder), GC_MM_FAULT_NAME=name,
                GC_MM_FAULT_NTH=str(nth), GC_MM_FAULT_MIN_BYTES=str(min_bytes),
                GC_MM_FAULT_SIGNAL=signal_name)


def run_until(command, cwd, line: str, env=None, timeout=600,
              signal_number=signal.SIGKILL):
    """Run ``command``; once a line of its output contains ``line``, send
    its process group ``signal_number``. Returns (output, returncode,
    killed)."""
    proc = subprocess.Popen(command, cwd=cwd, env=dict(os.environ,
                                                       **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    output, killed = [], False
    try:
        for text in proc.stdout:
            output.append(text)
            if line in text:
                os.killpg(proc.pid, signal_number)
                killed = True
                break
        rest, _ = proc.communicate(timeout=timeout)
        output.append(rest or '')
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return ''.join(output), proc.returncode, killed


def repo_copy(dest) -> str:
    """Copy this checkout's tracked files (as they are in the work tree)
    and its installed kernels into ``dest``, keeping modification times."""
    files = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split('\0')
    files += [osp.relpath(path, REPO) for path in
              glob.glob(osp.join(REPO, 'gc_mm', 'kernels', '_*.so'))]
    for name in filter(None, files):
        source = osp.join(REPO, name)
        if not osp.isfile(source):
            continue  # deleted in the work tree
        target = osp.join(dest, name)
        os.makedirs(osp.dirname(target), exist_ok=True)
        shutil.copy2(source, target)
    return str(dest)


def installed_kernels() -> list:
    """This checkout's installed kernel files (tools/install.sh builds
    them); tests that need one skip without."""
    paths = sorted(glob.glob(osp.join(REPO, 'gc_mm', 'kernels', '_*.so')))
    if not paths:
        pytest.skip('no installed kernel in gc_mm/kernels (tools/install.sh '
                    'builds them with a C++ compiler)')
    return paths


@contextlib.contextmanager
def tmpfs(folder, size: str, read_only: bool = False):
    """Mount a tmpfs of ``size`` (e.g. '1m') on ``folder`` for the block;
    skip the test where mounting is not allowed (not root, a container
    without CAP_SYS_ADMIN)."""
    os.makedirs(folder, exist_ok=True)
    if shutil.which('mount') is None:
        pytest.skip('no mount command here to make a small tmpfs')
    options = f'size={size}' + (',ro' if read_only else '')
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs',
                             str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()}')
    try:
        yield str(folder)
    finally:
        subprocess.run(['umount', '-l', str(folder)], check=False)
