"""How gc_mm's kernels are compiled, shared by setup.py (install-time
build) and :func:`gc_mm.kernels.load` (build on first use).

A kernel is built for the instruction set torch detects on this CPU and
named after it (``sgd_avx2``, ``adaptive_avx512``), so a build is only ever
loaded on a CPU that runs it (a home directory or an install shared by
different machines holds one build per instruction set), and the compiler
may use the vector units the CPU has (AVX2 and FMA, AVX-512;
docs/benchmark.md has what they and the threads below are worth).
"""
import torch

# torch.backends.cpu.get_cpu_capability() -> the compiler flags it allows.
_ISA_FLAGS = {
    'AVX2': ['-mavx2', '-mfma'],
    # GCC tunes generic AVX-512 code for 256-bit vectors; the steps are
    # loops over memory, 5-10% faster with the full 512 (docs/benchmark.md).
    'AVX512': ['-mavx2', '-mfma', '-mavx512f', '-mavx512bw', '-mavx512vl',
               '-mavx512dq', '-mprefer-vector-width=512'],
}


def module_name(kernel: str) -> str:
    """The name of ``kernel``'s module built for this CPU, e.g. sgd_avx2."""
    isa = torch.backends.cpu.get_cpu_capability()
    return f'{kernel}_{isa.lower() if isa in _ISA_FLAGS else "generic"}'


def cxx_flags() -> list:
    flags = ['-O3', *_ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(),
                                    [])]
    # Python's own compile flags, which setup.py's build starts from, have
    # -fwrapv; it keeps the compiler from vectorizing the row loops (the
    # step slowed down).
    flags.append('-fno-wrapv')
    # std::sqrt may set errno, which keeps the compiler from vectorizing
    # the adaptive steps' loops; the kernels never read errno.
    flags.append('-fno-math-errno')
    # at::parallel_for splits the rows among torch's threads only in code
    # compiled with OpenMP (torch's own runtime runs it); without the flag
    # the kernel runs on one thread.
    if torch.backends.openmp.is_available():
        flags.append('-fopenmp')
    return flags


# The kernels: gc_mm/kernels/<name>.cpp, each its own module.
KERNELS = ('sgd', 'adaptive')
