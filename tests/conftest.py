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
