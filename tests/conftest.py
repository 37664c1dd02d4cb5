import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BALLOON = osp.join(osp.dirname(REPO), 'shared', 'data', 'balloon')

# Tests that run on a GPU are marked ``cuda`` (tools/analysis/device_check.sh
# runs ``pytest -m cuda`` there, with torch and mmengine only); a test
# parametrized over DEVICES also runs on CPU, so its code runs everywhere.
# Modules and tests that need mmdet or mmcv start with
# ``pytest.importorskip('mmdet')`` (mmdet imports mmcv), which skips them
# where they are not installed.
CUDA = pytest.param('cuda', marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')])
DEVICES = ['cpu', CUDA]

# What older torch lacks (gc_mm supports torch >= 2.1; tools/test_torch.sh
# runs these tests on another torch): the weights_only allow-list
# (add_safe_globals, torch 2.4) and AMP's loss scaler for the CPU
# (torch.amp.GradScaler, torch 2.3).
HAS_ALLOW_LIST = hasattr(torch.serialization, 'add_safe_globals')
needs_allow_list = pytest.mark.skipif(
    not HAS_ALLOW_LIST,
    reason='this torch has no weights_only allow-list (torch < 2.4)')
needs_cpu_amp = pytest.mark.skipif(
    not hasattr(torch.amp, 'GradScaler'),
    reason='this torch has no loss scaler for the CPU (torch < 2.3)')


def load_checkpoint(path) -> dict:
    """A checkpoint, loaded with weights_only=True where torch has an
    allow-list (it must load safely there); before (torch < 2.4) as mmengine
    loads it, with torch's default."""
    return torch.load(path, map_location='cpu', weights_only=HAS_ALLOW_LIST)


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'cuda: runs on a CUDA device (skipped without one)')


def run_tool(args, cwd, timeout=900, env=None, check=True):
    """Run a script of tools/ the way a user does; return the process."""
    command = ([sys.executable] + args if args[0].endswith('.py') else
               ['bash'] + args)
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    full_env.setdefault('PYTHON', sys.executable)
    proc = subprocess.run(command, cwd=cwd, env=full_env, timeout=timeout,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(args)} failed ({proc.returncode}):\n'
                             f'{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}')
    return proc


@pytest.fixture(scope='session')
def balloon():
    if not osp.isdir(BALLOON):
        pytest.fail(f'the balloon dataset is expected at {BALLOON}')
    return BALLOON
