"""Interrupted work never breaks the next run (issue 26): the real tools,
killed (SIGKILL, as an out-of-memory killer; SIGINT, as Ctrl-C) halfway
through a named write, then run again; a full disk and a read-only
folder. Each rerun completes or resumes with nothing lost, or says why in
one line, leaving nothing half-written under a final name."""
import fcntl
import glob
import json
import os
import os.path as osp
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch

from conftest import REPO, run_tool
from faults import (installed_kernels, killed_at_write, repo_copy, run_until,
                    tmpfs)
from gc_mm.atomic import atomic_write, remove_stale_temporaries

DEMO = osp.join(REPO, 'configs/demo/mask_rcnn_r18_fpn_gc_shapes.py')
TRAIN = osp.join(REPO, 'tools/train.py')
PUBLISH = osp.join(REPO, 'tools/publish_model.py')
INFER = osp.join(REPO, 'tools/infer.py')
NAME = 'mask_rcnn_r18_fpn_gc_shapes'
# One iteration per epoch (4 images, batch 4), no validation, a checkpoint
# every epoch.
TINY = [
    'train_cfg.val_interval=10', 'train_dataloader.dataset.indices=4',
    'val_dataloader.dataset.indices=4',
    'train_dataloader.dataset.pipeline.3.prob=0.0', 'randomness.seed=0',
    'default_hooks.logger.interval=1', 'default_hooks.checkpoint.interval=1',
    'custom_hooks=[]'
]
MB = 2**20


def train(cwd, work_dir, epochs, *options, resume=True, env=None,
          check=True):
    return run_tool([TRAIN, DEMO, '--work-dir', str(work_dir)] +
                    (['--resume'] if resume else []) + [
                        '--cfg-options', f'train_cfg.max_epochs={epochs}',
                        *TINY, *options], cwd=cwd, env=env, check=check)


def one_line_error(proc, *parts):
    """The tool failed with one line on stderr (no traceback) that says
    each of ``parts``."""
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith('error: '), proc.stderr[-3000:]
    for part in parts:
        assert part in line, line
    return line


def leftovers(folder):
    return sorted(name for name in os.listdir(folder)
                  if name.startswith('.tmp-'))


def complete(path):
    return osp.isfile(path) and zipfile.is_zipfile(path)


@pytest.fixture(scope='module')
def cwd(tmp_path_factory):
    """Where the demo's data is generated once for every run here."""
    return tmp_path_factory.mktemp('faults')


@pytest.fixture(scope='module')
def trained(cwd):
    """A one-epoch run (epoch_1.pth, its config dump)."""
    work_dir = cwd / 'trained'
    train(cwd, work_dir, 1, resume=False)
    return work_dir


def copy_work_dir(source, dest):
    """A copy of a work_dir whose last_checkpoint names the copy's
    checkpoint."""
    shutil.copytree(source, dest)
    with open(osp.join(dest, 'last_checkpoint')) as f:
        named = osp.basename(f.read().strip())
    with open(osp.join(dest, 'last_checkpoint'), 'w') as f:
        f.write(osp.join(str(dest), named))
    return dest


# Item 2: an empty last_checkpoint.
def test_resume_with_an_empty_last_checkpoint(cwd, trained):
    """Killed while MMEngine wrote last_checkpoint, the file was empty and
    every --resume ended in FileNotFoundError; now the run resumes from the
    newest complete checkpoint, says so, and the file names it again."""
    work_dir = copy_work_dir(trained, cwd / 'empty_marker')
    open(work_dir / 'last_checkpoint', 'w').close()
    proc = train(cwd, work_dir, 1)
    checkpoint = str(work_dir / 'epoch_1.pth')
    assert (f'Note: {work_dir}/last_checkpoint is empty (an interrupted '
            'run?); resuming from the newest complete checkpoint, '
            f'{checkpoint}.') in proc.stdout
    assert f'Checkpoint: {checkpoint}' in proc.stdout
    assert (work_dir / 'last_checkpoint').read_text() == checkpoint


# Items 8 and 2: killed while saving a checkpoint with max_keep_ckpts=1,
# then while writing last_checkpoint.
def test_kills_at_checkpoint_writes_then_resume(cwd):
    """kill -9 halfway through epoch_2.pth with max_keep_ckpts=1 (MMEngine
    had already removed epoch_1.pth: nothing was left), then halfway through
    last_checkpoint (MMEngine's was left cut short): each --resume goes on
    from a complete checkpoint and the run ends with epoch_2.pth alone."""
    work_dir = cwd / 'killed'
    keep_one = 'default_hooks.checkpoint.max_keep_ckpts=1'
    marker = work_dir / 'last_checkpoint'
    # The second large write is epoch_2.pth (one write of its bytes).
    proc = train(cwd, work_dir, 2, keep_one, resume=False, check=False,
                 env=killed_at_write(work_dir, min_bytes=MB, nth=2))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert complete(work_dir / 'epoch_1.pth'), os.listdir(work_dir)
    assert not (work_dir / 'epoch_2.pth').exists()
    assert marker.read_text() == str(work_dir / 'epoch_1.pth')
    assert leftovers(work_dir)  # the killed write's temporary

    proc = train(cwd, work_dir, 2, keep_one, check=False,
                 env=killed_at_write(work_dir, '*last_checkpoint'))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert complete(work_dir / 'epoch_2.pth')
    # Removed only once last_checkpoint names the new one.
    assert complete(work_dir / 'epoch_1.pth')
    assert marker.read_text() == str(work_dir / 'epoch_1.pth')

    proc = train(cwd, work_dir, 2, keep_one)
    assert f'Checkpoint: {work_dir}/epoch_2.pth' in proc.stdout
    assert complete(work_dir / 'epoch_2.pth')
    assert not (work_dir / 'epoch_1.pth').exists()  # max_keep_ckpts=1
    assert leftovers(work_dir) == []  # removed by the next writes there
    meta = torch.load(work_dir / 'epoch_2.pth', map_location='cpu',
                      weights_only=True)['meta']
    assert meta['epoch'] == 2


# Item 7: a full disk during training.
def test_full_disk_during_a_checkpoint_save(cwd, trained, tmp_path):
    """The second checkpoint does not fit: one line naming the folder and
    the reason; epoch_1.pth and last_checkpoint are untouched and resume
    elsewhere."""
    size = osp.getsize(trained / 'epoch_1.pth')
    with tmpfs(tmp_path / 'disk', f'{(size + size // 2) // 1024}k') as disk:
        work_dir = copy_work_dir(trained, osp.join(disk, 'work'))
        proc = train(cwd, work_dir, 2, check=False)
        one_line_error(proc, f'cannot write to {work_dir}',
                       'No space left on device')
        assert leftovers(work_dir) == []
        checkpoint = osp.join(work_dir, 'epoch_1.pth')
        assert complete(checkpoint)
        torch.load(checkpoint, map_location='cpu', weights_only=True)
        with open(osp.join(work_dir, 'last_checkpoint')) as f:
            assert f.read() == checkpoint
        assert not osp.exists(osp.join(work_dir, 'epoch_2.pth'))


@pytest.fixture(scope='module')
def images(cwd, trained):
    return sorted(glob.glob(str(cwd / 'data/shapes/val/*.png')))[:3]


# Item 6 (and 9: the killed write's temporary goes on the next run).
def test_infer_killed_while_writing_a_prediction(cwd, trained, images,
                                                 tmp_path):
    """kill -9 halfway through preds/00001.json: no prediction file is
    incomplete; the rerun writes all three and removes the temporary."""
    out = tmp_path / 'out'
    args = [INFER, str(trained / f'{NAME}.py'),
            str(trained / 'epoch_1.pth'), *images, '--out-dir', str(out),
            '--score-thr', '0']
    proc = run_tool(args, cwd=cwd, check=False,
                    env=killed_at_write(out, '*00001.json'))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    for path in glob.glob(str(out / 'preds' / '*.json')):
        with open(path) as f:
            json.load(f)  # complete
    assert not (out / 'preds' / '00001.json').exists()
    assert len(leftovers(out / 'preds')) == 1
    run_tool(args, cwd=cwd)
    for index in range(3):
        with open(out / 'preds' / f'0000{index}.json') as f:
            assert json.load(f)['img_path'] == images[index]
    assert leftovers(out / 'preds') == []


# Item 7: full disk and read-only folders in publish_model and infer.
def test_publish_to_a_full_disk(cwd, trained, tmp_path):
    with tmpfs(tmp_path / 'disk', '1m') as disk:
        out = osp.join(disk, 'zoo')
        proc = run_tool([PUBLISH, str(trained / f'{NAME}.py'),
                         str(trained / 'epoch_1.pth'), out], cwd=cwd,
                        check=False)
        one_line_error(proc, f'cannot write to {out}',
                       'No space left on device')
        assert os.listdir(disk) == []


def test_infer_into_a_read_only_folder(cwd, trained, images, tmp_path):
    with tmpfs(tmp_path / 'ro', '1m', read_only=True) as folder:
        proc = run_tool([INFER, str(trained / f'{NAME}.py'),
                         str(trained / 'epoch_1.pth'), *images,
                         '--out-dir', osp.join(folder, 'out')], cwd=cwd,
                        check=False)
        one_line_error(proc, f'cannot write to {folder}',
                       'Read-only file system')


# Item 9: leftovers of killed writers, and a readable data/shapes.
def test_atomic_write_removes_only_temporaries_of_dead_processes(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    host = os.uname().nodename.split('.')[0]
    stale = tmp_path / f'.tmp-{dead.pid}@{host}.abc123.epoch_3.pth'
    live = tmp_path / f'.tmp-{os.getpid()}@{host}.abc123.epoch_3.pth'
    elsewhere = tmp_path / f'.tmp-{dead.pid}@{host}-other.abc.epoch_3.pth'
    for path in (stale, live, elsewhere):
        path.write_bytes(b'x' * 100)
    atomic_write(str(tmp_path / 'last_checkpoint'), lambda f: f.write('a'),
                 binary=False)
    assert leftovers(tmp_path) == sorted([live.name, elsewhere.name])
    assert (tmp_path / 'last_checkpoint').read_text() == 'a'
    assert remove_stale_temporaries(str(tmp_path)) == []


def test_demo_data_killed_while_generated(tmp_path):
    """The shapes data killed while being written leaves a .shapes-*
    folder; the next generation removes it, and data/shapes is readable
    by others, as os.makedirs would make it."""
    script = ('from gc_mm.datasets.shapes import make_shapes_dataset\n'
              'make_shapes_dataset("data/shapes", num_train=3, num_val=2)\n')
    data = tmp_path / 'data'
    proc = subprocess.run(
        [sys.executable, '-c', script], cwd=tmp_path, capture_output=True,
        text=True, env=dict(os.environ, **killed_at_write(
            data, 'annotation_coco.json')))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [n for n in os.listdir(data) if n.startswith('.shapes-')]
    subprocess.run([sys.executable, '-c', script], cwd=tmp_path, check=True,
                   env=dict(os.environ, **killed_at_write(data, 'no file')))
    assert os.listdir(data) == ['shapes']
    mode = stat.S_IMODE(os.stat(data / 'shapes').st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask
    with open(data / 'shapes' / 'val' / 'annotation_coco.json') as f:
        assert len(json.load(f)['images']) == 2


# Item 1: a kernel build's stale lock.
def kernel_build(extensions, **env):
    """Build the sgd kernel on first use in TORCH_EXTENSIONS_DIR=
    ``extensions`` with a compiler that does not exist: the build fails in
    seconds instead of compiling for minutes, after the lock handling this
    tests."""
    script = 'import gc_mm.kernels as k\nk.build("sgd")\n'
    return subprocess.run(
        [sys.executable, '-c', script], capture_output=True, text=True,
        timeout=300, env=dict(os.environ, PYTHONUNBUFFERED='1',
                              TORCH_EXTENSIONS_DIR=str(extensions),
                              CXX=str(extensions / 'no-such-compiler'),
                              **env))


def build_folder(extensions):
    """The folder torch builds the sgd kernel in under ``extensions``."""
    from torch.utils.cpp_extension import _get_build_directory

    from gc_mm.kernels import module_name
    os.environ['TORCH_EXTENSIONS_DIR'] = str(extensions)
    try:
        return _get_build_directory(f'gc_mm_{module_name("sgd")}',
                                    verbose=False)
    finally:
        del os.environ['TORCH_EXTENSIONS_DIR']


def test_kernel_build_removes_a_stale_lock(tmp_path):
    """An interrupted build left torch's lock file in the build folder:
    every later build waited on it forever, silently. Now no live build
    holds it, so it is removed (saying so) and the build goes on."""
    lock = osp.join(build_folder(tmp_path), 'lock')
    open(lock, 'w').close()
    proc = kernel_build(tmp_path)
    assert f'removed {lock}, left by an interrupted build' in (
        proc.stdout + proc.stderr)
    assert not osp.exists(lock)
    # The build itself ran (and failed: no compiler).
    assert proc.returncode != 0
    assert 'RuntimeError: fused=True needs gc_mm/kernels/sgd.cpp compiled' \
        in proc.stderr


def test_kernel_build_waits_a_bounded_time_for_a_live_build(tmp_path):
    """While another process builds (holds the build lock), a build waits
    for it at most GC_MM_BUILD_WAIT_S, then says which file to remove."""
    folder = build_folder(tmp_path)
    with open(osp.join(folder, 'gc_mm.lock'), 'a+') as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write('pid 12345')
        held.flush()
        proc = kernel_build(tmp_path, GC_MM_BUILD_WAIT_S='1')
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f'has been building in pid 12345 for over 1 s; if no build is '
        f'running, remove {folder}/gc_mm.lock (GC_MM_BUILD_WAIT_S sets '
        'this wait)')


# Item 3: a half-copied kernel.
def test_truncated_kernel_is_a_warning_not_a_crash(tmp_path):
    """A kernel file cut short crashed Python (bus error) on import; now it
    is detected before loading: a warning, and the plain path."""
    from gc_mm.kernels import library_complete
    [path] = [p for p in installed_kernels()
              if osp.basename(p).startswith('_sgd')]
    copy = repo_copy(tmp_path / 'repo')
    target = osp.join(copy, 'gc_mm', 'kernels', osp.basename(path))
    with open(target, 'r+b') as f:
        f.truncate(osp.getsize(path) // 2)
    assert not library_complete(target) and library_complete(path)
    proc = subprocess.run(
        [sys.executable, '-c', 'import gc_mm.kernels as k; '
         'print("kernel:", k.installed("sgd"))'], cwd=copy,
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert 'kernel: None' in proc.stdout
    assert f'{target} is incomplete' in proc.stdout + proc.stderr


# setup.py's build_ext after its build: the copy of the built kernels into
# gc_mm/kernels (what `pip install -e .` runs), without recompiling them.
COPY_KERNELS = """
import os
import setuptools
from setuptools.dist import Distribution
args = {}
setuptools.setup = lambda **kwargs: args.update(kwargs)
exec(open('setup.py').read(), {'__file__': os.path.abspath('setup.py')})
dist = Distribution({key: args[key] for key in (
    'name', 'packages', 'ext_modules', 'cmdclass')})
command = dist.get_command_obj('build_ext')
command.inplace = True
command.ensure_finalized()
command.copy_extensions_to_source()
"""


def test_kernel_copy_killed_by_setup_leaves_the_old_kernel(tmp_path):
    """setup.py's build_ext killed while it copies a built kernel into
    gc_mm/kernels: the kernel there is the old, complete one (it was cut
    short under its final name); the rerun puts the new one in place."""
    from gc_mm.kernels import library_complete
    kernels = installed_kernels()
    copy = repo_copy(tmp_path / 'repo')
    build_lib = osp.join(copy, 'build', f'lib.{sysconfig.get_platform()}-'
                         f'{sys.implementation.cache_tag}', 'gc_mm',
                         'kernels')
    os.makedirs(build_lib)
    for path in kernels:
        shutil.copy(path, build_lib)
    command = [sys.executable, '-c', COPY_KERNELS]
    proc = subprocess.run(command, cwd=copy, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **killed_at_write(
                              osp.join(copy, 'gc_mm'), '*_sgd_*')))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    installed = osp.join(copy, 'gc_mm', 'kernels')
    for path in glob.glob(osp.join(installed, '_*.so')):
        assert library_complete(path), path
    subprocess.run(command, cwd=copy, capture_output=True, check=True,
                   timeout=300)
    assert leftovers(installed) == []
    proc = subprocess.run(
        [sys.executable, '-c', 'import gc_mm.kernels as k; '
         'print(all(map(k.installed, k.KERNELS)))'], cwd=copy,
        capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip().splitlines()[-1] == 'True'


# Items 4 and 5: tools/install.sh interrupted.
def linked_venv(copy, skip=()):
    """A .venv in ``copy`` whose packages are this environment's (linked
    through a .pth file to a folder of links), except those named in
    ``skip``: an install interrupted before pip installed them."""
    base = getattr(sys, '_base_executable', sys.executable)
    subprocess.run([base, '-m', 'venv', '--without-pip',
                    osp.join(copy, '.venv')], check=True)
    [site] = glob.glob(osp.join(copy, '.venv', 'lib', 'python*',
                                'site-packages'))
    ours = sysconfig.get_paths()['purelib']
    shadow = osp.join(copy, 'packages')
    os.makedirs(shadow)
    for name in os.listdir(ours):
        if not name.lower().startswith(skip) and not name.endswith('.pth'):
            os.symlink(osp.join(ours, name), osp.join(shadow, name))
    with open(osp.join(site, 'packages.pth'), 'w') as f:
        f.write(shadow + '\n')


INSTALL = ['bash', 'tools/install.sh']


def test_install_after_an_interrupted_venv_creation(tmp_path):
    """Ctrl-C during `python -m venv` left .venv/bin/python without pip;
    every rerun stopped at once with `No module named pip`. Now the rerun
    makes the venv again and goes on to install (stopped there)."""
    copy = repo_copy(tmp_path / 'repo')
    base = getattr(sys, '_base_executable', sys.executable)
    subprocess.run([base, '-m', 'venv', '--without-pip',
                    osp.join(copy, '.venv')], check=True)
    output, _, killed = run_until(INSTALL, copy, 'Installing torch',
                                  env=dict(PYTHON=base), timeout=300)
    assert killed, output[-3000:]
    subprocess.run([osp.join(copy, '.venv', 'bin', 'python'), '-m', 'pip',
                    '--version'], check=True, capture_output=True)


def test_install_after_an_interrupt_between_kernels_and_gc_mm(tmp_path):
    """Interrupted after the kernels were copied into gc_mm/kernels but
    before pip installed mmdet, pycocotools and gc_mm: the rerun skipped
    gc_mm's install (the kernels were its marker) and failed on `import
    mmdet`. Now it checks gc_mm and its dependencies and installs them
    (stopped there)."""
    kernels = installed_kernels()
    copy = repo_copy(tmp_path / 'repo')
    for path in kernels:  # newer than every source, as after a build
        os.utime(osp.join(copy, 'gc_mm', 'kernels', osp.basename(path)))
    linked_venv(copy, skip=('mmdet', 'pycocotools', 'gc_mm', '__editable__',
                            'pytest', '_pytest'))
    output, _, killed = run_until(INSTALL, copy, 'Installing gc_mm',
                                  timeout=300)
    assert killed, output[-3000:]
