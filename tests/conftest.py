import os
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BALLOON = osp.join(osp.dirname(REPO), 'shared', 'data', 'balloon')


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
