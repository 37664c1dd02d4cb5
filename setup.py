"""gc_mm: Gradient Centralization for MMDetection / MMEngine.

Install the stack first (tools/install.sh does all of this): mmcv 2.1.0 has
only a source release and must be built with its ops and without build
isolation, with setuptools < 82 (mmcv's setup.py and mmengine's ``mmdet::``
config inheritance import pkg_resources, which setuptools 82 removed)::

    pip install torch "setuptools>=77,<82" wheel ninja
    MMCV_WITH_OPS=1 pip install --no-build-isolation mmcv==2.1.0
    pip install --no-build-isolation --use-pep517 -e .

With torch importable at build time (no build isolation), the C++ kernels
of gc_mm/kernels are compiled here, for this CPU, and used by default;
without it they are compiled on first use of ``fused=True``. (pip 23 needs
``--use-pep517`` for an editable install to build them.) The kernels are
optional: where they do not compile (no C++ compiler), gc_mm installs
without them, with a warning in the build log.
"""
import os.path as osp
import subprocess

from setuptools import find_packages, setup
from setuptools.errors import BaseError, CCompilerError

HERE = osp.dirname(osp.abspath(__file__))


def run_module(*path):
    """The namespace of a gc_mm module, run without importing gc_mm (whose
    dependencies may not be installed yet)."""
    namespace = {}
    with open(osp.join(HERE, 'gc_mm', *path)) as f:
        exec(f.read(), namespace)
    return namespace


def kernel_extensions():
    """(ext_modules, cmdclass) of the kernels, empty without torch."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """torch's extension build, which without a working compiler
        installs gc_mm without the kernels instead of failing (SGD_GC then
        takes its eager paths; ``fused=True`` builds the kernel on first
        use)."""

        def build_extensions(self):
            try:
                super().build_extensions()
            # The ways a compiler can be missing or fail, through torch's
            # ABI check, ninja or setuptools' own compile step.
            except (OSError, RuntimeError, subprocess.SubprocessError,
                    CCompilerError, BaseError) as error:
                self.warn(f'gc_mm: the C++ kernels did not compile ({error}); '
                          'installing gc_mm without them.')
                self.extensions = []  # nothing to copy or install

        def copy_file(self, infile, outfile, *args, **kwargs):
            """Copy a built kernel into gc_mm/kernels (``pip install -e``)
            through a temporary file renamed into place: a copy killed
            midway left a truncated library under the name Python imports,
            which crashes the interpreter (bus error) when loaded."""
            atomic_copy(infile, outfile)
            return outfile, 1

    flags = run_module('kernels', 'flags.py')
    atomic_copy = run_module('atomic.py')['atomic_copy']
    extensions = [
        CppExtension('gc_mm.kernels._' + flags['module_name'](name),
                     [f'gc_mm/kernels/{name}.cpp'],
                     depends=['gc_mm/kernels/rows.h'],
                     extra_compile_args=flags['cxx_flags']())
        for name in flags['KERNELS']
    ]
    return extensions, {'build_ext': OptionalBuildExtension}


ext_modules, cmdclass = kernel_extensions()


setup(
    name='gc_mm',
    version=run_module('version.py')['__version__'],
    description='Gradient Centralization optimizers, optim wrappers and '
    'detection configs for MMEngine / MMDetection',
    long_description=open(osp.join(HERE, 'README.md')).read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['gc_mm', 'gc_mm.*']),
    # Sources, for kernels compiled on first use.
    package_data={'gc_mm.kernels': ['*.cpp', '*.h']},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires='>=3.9',
    install_requires=[
        # Tested with 2.1 to 2.15 (README: Supported torch versions).
        'torch>=2.1',
        'mmengine',
        'mmcv==2.1.0',  # mmdet 3.3.0 needs mmcv >= 2.0.0rc4, < 2.2.0
        'mmdet',
        'pycocotools',
        'setuptools<82',  # pkg_resources, for mmengine's mmdet:: configs
        'torch-pruning',  # tools/prune.py's dependency analysis
    ],
    # deepspeed: tests/test_sharded.py runs ZeRO 0-2 on CPU with gloo (pure
    # Python here: its ops build on first use, and none is used).
    extras_require={'tests': ['pytest', 'tensorboard', 'deepspeed==0.19.8']},
)
