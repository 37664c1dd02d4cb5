"""A hook for tests/test_slurm.py: in the first run of a Slurm batch job,
after iteration ``iteration`` rank 0 has Slurm signal the job's batch shell
(``scancel --signal=USR1 --batch``, what ``--signal=B:USR1@120`` does before
preemption) and every rank waits until slurm_train.sh has passed the signal
on to it, so the run stops after that iteration (imported through
custom_imports)."""
import os
import subprocess
import time

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from gc_mm.hooks import PreemptionHook


@HOOKS.register_module()
class SlurmSignalHook(Hook):

    priority = 'NORMAL'  # before PreemptionHook (VERY_LOW)

    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        if (runner.iter + 1 != self.iteration
                or os.environ.get('SLURM_RESTART_COUNT', '0') != '0'):
            return
        if runner.rank == 0:
            subprocess.run(['scancel', '--signal=USR1', '--batch',
                            os.environ['SLURM_JOB_ID']], check=True,
                           timeout=60)
        [hook] = [h for h in runner.hooks if isinstance(h, PreemptionHook)]
        deadline = time.monotonic() + 60
        while hook.received is None and time.monotonic() < deadline:
            time.sleep(0.1)
