"""gc_mm: Gradient Centralization for MMDetection / MMEngine.

Install the stack first (tools/install.sh does all of this): mmcv 2.1.0 has
only a source release and must be built with its ops and without build
isolation, with setuptools < 82 (mmcv's setup.py and mmengine's ``mmdet::``
config inheritance import pkg_resources, which setuptools 82 removed)::

    pip install torch "setuptools>=77,<82" wheel ninja
    MMCV_WITH_OPS=1 pip install --no-build-isolation mmcv==2.1.0
    pip install --no-build-isolation -e .
"""
import os.path as osp

from setuptools import find_packages, setup


def version():
    namespace = {}
    with open(osp.join(osp.dirname(__file__), 'gc_mm', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


setup(
    name='gc_mm',
    version=version(),
    description='Gradient Centralization optimizers, optim wrappers and '
    'detection configs for MMEngine / MMDetection',
    long_description=open(osp.join(osp.dirname(__file__), 'README.md')).read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['gc_mm', 'gc_mm.*']),
    # The opt-in fused kernels are compiled from source on first use.
    package_data={'gc_mm.kernels': ['*.cpp']},
    python_requires='>=3.9',
    install_requires=[
        'torch',
        'mmengine',
        'mmcv==2.1.0',  # mmdet 3.3.0 needs mmcv >= 2.0.0rc4, < 2.2.0
        'mmdet',
        'pycocotools',
        'setuptools<82',  # pkg_resources, for mmengine's mmdet:: configs
    ],
    extras_require={'tests': ['pytest']},
)
