"""tools/slurm_train.sh and tools/slurm_test.sh on a real single-node Slurm
(slurmctld, slurmd and munged started here, on localhost, from a config in a
temporary folder): two CPU tasks train the demo with gloo and evaluate the
checkpoint, and on a node with (fake) GPUs the scripts ask for them."""
import getpass
import glob
import json
import os
import os.path as osp
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import gc_mm  # noqa: F401  (allow-lists the types of mmengine checkpoints)
from conftest import REPO, run_tool

DEMO = osp.join(REPO, 'configs/demo/mask_rcnn_r18_fpn_gc_shapes.py')
SLURM_TRAIN = osp.join(REPO, 'tools/slurm_train.sh')
SLURM_TEST = osp.join(REPO, 'tools/slurm_test.sh')
PARTITION = 'gcmm'
DAEMONS = ('munged', 'slurmctld', 'slurmd', 'srun', 'sinfo', 'scontrol',
           'scancel')
# As in tests/test_tools.py: 8 images, one epoch, no random flip.
DEMO_SMALL = [
    'train_cfg.max_epochs=1', 'train_cfg.val_interval=10',
    'train_dataloader.dataset.indices=8', 'val_dataloader.dataset.indices=4',
    'train_dataloader.dataset.pipeline.3.prob=0.0',
    'randomness.seed=0', 'default_hooks.logger.interval=1'
]

SLURM_CONF = """\
ClusterName=gcmmtest
SlurmctldHost=localhost
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
# Two fake GPUs: files stand in for /dev/nvidia*, so Slurm can grant
# --gres=gpu (without CUDA the tasks still run on CPU).
GRES_CONF = 'NodeName=localhost Name=gpu File={root}/fake_gpu[0-1]\n'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _tail(path, lines=20) -> str:
    if not osp.isfile(path):
        return f'({path} missing)'
    with open(path, errors='replace') as f:
        return ''.join(f.readlines()[-lines:])


@pytest.fixture(scope='session')
def slurm(tmp_path_factory):
    """A single-node Slurm cluster on localhost; yields the environment its
    clients (srun, sinfo) need. Skips where Slurm is missing or cannot
    start; stops every daemon it started, whatever the tests did."""
    with pytest.MonkeyPatch.context() as patch:
        # Inside a job of another cluster srun would join that job.
        for name in list(os.environ):
            if name.startswith('SLURM_'):
                patch.delenv(name)
        yield from _single_node_slurm(tmp_path_factory)


def _single_node_slurm(tmp_path_factory):
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f'Slurm is not installed (missing: {", ".join(missing)}'
                    '; Debian: apt-get install slurm-wlm munge)')
    root = tmp_path_factory.mktemp('slurm')
    root.chmod(0o700)  # munged refuses a socket or key others can reach
    for folder in ('munge', 'state', 'spool'):
        (root / folder).mkdir(mode=0o700)
    key = root / 'munge' / 'munge.key'
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    for index in range(2):
        (root / f'fake_gpu{index}').touch()
    (root / 'plugstack.conf').write_text('')
    (root / 'gres.conf').write_text(GRES_CONF.format(root=root))
    conf = root / 'slurm.conf'
    conf.write_text(SLURM_CONF.format(
        user=getpass.getuser(), root=root, ctld_port=_free_port(),
        d_port=_free_port(), partition=PARTITION))
    env = dict(os.environ, SLURM_CONF=str(conf))
    logs = {name: root / f'{name}.out' for name in ('munged', 'slurmctld',
                                                     'slurmd')}
    commands = {
        'munged': ['munged', '--foreground', '--force',
                   f'--socket={root}/munge/munge.socket',
                   f'--key-file={key}', f'--pid-file={root}/munge/pid',
                   f'--log-file={root}/munge/log',
                   f'--seed-file={root}/munge/seed'],
        'slurmctld': ['slurmctld', '-D', '-f', str(conf)],
        'slurmd': ['slurmd', '-D', '-N', 'localhost', '-f', str(conf)],
    }
    daemons = []
    try:
        for name, command in commands.items():
            with open(logs[name], 'w') as log:
                daemons.append(subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True))
            if name == 'munged':
                _wait_for(lambda: (root / 'munge' / 'munge.socket').exists(),
                          10)
        state = ''

        def node_idle():
            nonlocal state
            state = subprocess.run(
                ['sinfo', '-h', '-N', '-o', '%t'], env=env,
                capture_output=True, text=True).stdout.strip()
            return state == 'idle'

        if not _wait_for(node_idle, 60):
            pytest.skip(
                f'Slurm did not start (node state {state!r} after 60 s):\n' +
                '\n'.join(f'--- {name}:\n{_tail(path)}'
                          for name, path in logs.items()))
        yield dict(SLURM_CONF=str(conf))
    finally:
        # Jobs first (a test that timed out may leave one), then daemons.
        subprocess.run(['scancel', '--partition', PARTITION], env=env,
                       capture_output=True)
        for process in reversed(daemons):
            # Each daemon leads its own process group (start_new_session).
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()


def _signal_group(process, signum) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass  # the group is gone already


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_slurm_scripts_train_and_evaluate_with_two_cpu_tasks(
        slurm, tmp_path):
    """Two tasks (GPUS=2, no GPUs asked: GPUS_PER_NODE=0) train the demo
    with gloo, both ranks end with the same weights; slurm_test.sh then
    evaluates the checkpoint with two tasks."""
    config = tmp_path / 'demo_dumping_state.py'
    config.write_text(
        f"_base_ = '{DEMO}'\n"
        "custom_imports = dict(imports=['gc_mm', 'gc_mm.datasets', "
        "'state_dump_hook'], allow_failed_imports=False)\n"
        f"custom_hooks = [dict(type='StateDumpHook', out_dir='{tmp_path}')]\n")
    env = dict(slurm, GPUS='2', GPUS_PER_NODE='0', CPUS_PER_TASK='1',
               PYTHONPATH=osp.join(REPO, 'tests'))
    work_dir = tmp_path / 'work'
    train = run_tool([SLURM_TRAIN, PARTITION, 'gc_mm_train', str(config),
                      str(work_dir), '--cfg-options', *DEMO_SMALL],
                     cwd=tmp_path, env=env)
    assert '--gres' not in train.stderr  # set -x shows the srun line
    # mmengine logs the world size as "GPU number", also without GPUs.
    assert 'Distributed launcher: slurm' in train.stdout
    assert 'GPU number: 2' in train.stdout
    assert 'distributed training uses the gloo backend' in train.stdout
    ranks = [torch.load(tmp_path / f'after_train_rank{r}.pth',
                        weights_only=True) for r in (0, 1)]
    assert ranks[0]['iter'] == ranks[1]['iter'] == 1  # 8 images / (2 x 4)
    for key, value in ranks[0]['params'].items():
        torch.testing.assert_close(ranks[1]['params'][key], value, rtol=0,
                                   atol=0, msg=key)
    checkpoint = work_dir / 'epoch_1.pth'
    assert torch.load(checkpoint, map_location='cpu',
                      weights_only=True)['meta']['iter'] == 1

    test = run_tool([SLURM_TEST, PARTITION, 'gc_mm_test', DEMO,
                     str(checkpoint), '--work-dir', str(tmp_path / 'test'),
                     '--cfg-options', 'test_dataloader.dataset.indices=4'],
                    cwd=tmp_path, env=env)
    assert 'Distributed launcher: slurm' in test.stdout
    assert 'GPU number: 2' in test.stdout
    assert 'coco/bbox_mAP:' in test.stdout
    [metrics] = glob.glob(str(tmp_path / 'test' / '*' / '*.json'))
    with open(metrics) as f:
        assert 'coco/bbox_mAP' in json.load(f)


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: prints what the task got from srun, one [] per arg.
printf 'task %s of %s gpus=%s per_node=%s cpus=%s args:' "$SLURM_PROCID" \
    "$SLURM_NTASKS" "${SLURM_GPUS_ON_NODE:-0}" "$SLURM_NTASKS_PER_NODE" \
    "$SLURM_CPUS_PER_TASK"
printf ' [%s]' "$@"
echo
"""


@pytest.mark.parametrize('script', [SLURM_TRAIN, SLURM_TEST])
def test_slurm_scripts_ask_for_gpus_per_node(slurm, tmp_path, script):
    """With GPUS_PER_NODE>0 the scripts ask for that many GPUs per node
    (here two fake ones) and one task per GPU, and pass the options on
    unchanged (PYTHON is replaced by a script that prints them)."""
    fake = tmp_path / 'fake_python'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = dict(slurm, GPUS='2', GPUS_PER_NODE='2', CPUS_PER_TASK='1',
               PYTHON=str(fake))
    proc = run_tool([script, PARTITION, 'gc_mm_gpu', 'a config.py',
                     'b.pth', '--cfg-options', 'x=1 2'], cwd=tmp_path,
                    env=env)
    lines = sorted(line for line in proc.stdout.splitlines()
                   if line.startswith('task '))
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert line.startswith(
            f'task {rank} of 2 gpus=2 per_node=2 cpus=1 args: [-u] ')
        assert '[a config.py]' in line and '[--launcher=slurm]' in line
        assert line.endswith('[--cfg-options] [x=1 2]')


FAKE_TRAIN = """#!/usr/bin/env bash
# Stands in for python tools/train.py: 30 steps of 0.2 s; at SIGUSR1 it
# saves its step and exits 75 (as PreemptionHook does); with --resume it
# goes on from the saved step.
step=0
if [[ " $* " == *" --resume "* ]]; then
    step=$(cat "$FAKE_WORK/saved")
    echo "resumed at $step" >> "$FAKE_WORK/log"
else
    echo "started" >> "$FAKE_WORK/log"
fi
stopped=0
trap 'stopped=1' USR1
while [ "$step" -lt 30 ]; do
    sleep 0.2
    step=$((step + 1))
    if [ "$stopped" = 1 ]; then
        echo "$step" > "$FAKE_WORK/saved"
        echo "stopped at $step" >> "$FAKE_WORK/log"
        exit 75
    fi
done
echo "done at $step" >> "$FAKE_WORK/log"
"""


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_slurm_train_passes_the_signal_on_requeues_and_resumes(
        slurm, tmp_path):
    """Submitted with sbatch --requeue, slurm_train.sh takes the batch
    shell's SIGUSR1 (what --signal=B:USR1@120 sends; here scancel sends it
    mid-run), passes it to the task, which saves and exits 75, requeues the
    job, and the requeued job's task resumes (--resume) and finishes."""
    fake = tmp_path / 'fake_python'
    fake.write_text(FAKE_TRAIN)
    fake.chmod(0o755)
    log = tmp_path / 'log'
    env = dict(os.environ, **slurm, GPUS='1', GPUS_PER_NODE='0',
               CPUS_PER_TASK='1', PYTHON=str(fake), FAKE_WORK=str(tmp_path))
    job = subprocess.run(
        ['sbatch', '--parsable', '--requeue', '-p', PARTITION, '-n', '1',
         '-c', '1', '--open-mode=append', f'--output={tmp_path}/job.out',
         SLURM_TRAIN, PARTITION, 'gc_mm_preempted', 'a config.py',
         str(tmp_path / 'work')],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
        timeout=60).stdout.strip().split(';')[0]
    assert _wait_for(lambda: _lines(log) == ['started'], 60), _tail(
        tmp_path / 'job.out')
    time.sleep(1)  # mid-run
    subprocess.run(['scancel', '--signal=USR1', '--batch', job], env=env,
                   check=True, timeout=30)
    assert _wait_for(lambda: _lines(log)[-1:] == ['done at 30'], 240), (
        _lines(log), _tail(tmp_path / 'job.out'))
    started, stopped, resumed, done = _lines(log)
    step = int(stopped.split()[-1])
    assert 0 < step < 30 and resumed == f'resumed at {step}'
    assert 'requeueing job' in (tmp_path / 'job.out').read_text()


def _demo_job(slurm, tmp_path, name, options, batch):
    """slurm_train.sh on the demo with two CPU tasks: through sbatch
    --requeue (``batch``) or srun alone; returns each rank's weights after
    training."""
    out = tmp_path / name
    out.mkdir()
    config = out / 'demo.py'
    config.write_text(
        f"_base_ = '{DEMO}'\n"
        "custom_imports = dict(imports=['gc_mm', 'gc_mm.datasets', "
        "'state_dump_hook', 'slurm_signal_hook'], "
        "allow_failed_imports=False)\n"
        f"custom_hooks = [dict(type='StateDumpHook', out_dir='{out}')" +
        (", dict(type='SlurmSignalHook', iteration=1)]\n" if batch else
         ']\n'))
    env = dict(slurm, GPUS='2', GPUS_PER_NODE='0', CPUS_PER_TASK='1',
               PYTHON=sys.executable, PYTHONPATH=osp.join(REPO, 'tests'))
    args = [SLURM_TRAIN, PARTITION, name, str(config), str(out / 'work'),
            '--cfg-options', *options]
    if not batch:
        run_tool(args, cwd=tmp_path, env=env)
    else:
        subprocess.run(
            ['sbatch', '--parsable', '--requeue', '-p', PARTITION, '-n',
             '2', '-c', '1', '--open-mode=append', f'--output={out}/job.out',
             *args], env=dict(os.environ, PYTHONUNBUFFERED='1', **env),
            cwd=tmp_path, capture_output=True, text=True,
            check=True, timeout=60)
        assert _wait_for(lambda: (out / 'after_train_rank1.pth').exists()
                         and (out / 'after_train_rank0.pth').exists(),
                         900), _tail(out / 'job.out', 60)
        time.sleep(2)  # the dumps are written by now
        log = (out / 'job.out').read_text()
        assert 'requeueing job' in log and 'PreemptionHook: stopped by ' \
            'SIGUSR1 after iteration 1' in log, log[-6000:]
    return [torch.load(out / f'after_train_rank{r}.pth', weights_only=True)
            for r in (0, 1)]


def test_a_preempted_demo_job_requeues_and_ends_as_an_uninterrupted_one(
        slurm, tmp_path):
    """Two CPU tasks train the demo, 2 iterations in one epoch; submitted
    with sbatch, the job's batch shell gets SIGUSR1 after iteration 1 (mid
    epoch): the tasks save iter_1.pth and stop, the job requeues itself and
    resumes, and both ranks end with the weights of the same training run
    without the signal (run with srun alone)."""
    pytest.importorskip('mmdet')
    options = [*DEMO_SMALL, 'train_dataloader.batch_size=2']
    straight = _demo_job(slurm, tmp_path, 'straight', options, batch=False)
    preempted = _demo_job(slurm, tmp_path, 'preempted', options, batch=True)
    for rank in (0, 1):
        assert straight[rank]['iter'] == preempted[rank]['iter'] == 2
        for key, value in straight[rank]['params'].items():
            torch.testing.assert_close(preempted[rank]['params'][key], value,
                                       rtol=0, atol=0, msg=key)
