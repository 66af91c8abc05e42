"""Install megatron_nbdiff and build its C++ (and, where CUDA is available, CUDA) extensions.

Install with ``pip install --no-build-isolation -e .`` after ``torch==2.13.0`` is installed:
the extensions compile against the installed torch.
"""
import os

from setuptools import find_packages, setup


def _extensions():
    """The compiled masking-noise kernel: CPU always, CUDA when torch has CUDA and nvcc exists."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch not installed yet: pure-Python install, reference noise path
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    exts = []
    cpu_src = os.path.join("csrc", "noise_cpu.cpp")
    if os.path.exists(os.path.join(here, cpu_src)):
        exts.append(
            CppExtension(
                "megatron_nbdiff._noise_cpu",
                [cpu_src],
                extra_compile_args=["-O3", "-fopenmp"],
                extra_link_args=["-fopenmp"],
            )
        )
    cuda_srcs = [os.path.join("csrc", "noise_cuda_binding.cpp"), os.path.join("csrc", "noise_cuda.cu")]
    want_cuda = os.environ.get("NBDIFF_BUILD_CUDA", "auto")
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda != "0" and (have_cuda or want_cuda == "1") and all(
        os.path.exists(os.path.join(here, s)) for s in cuda_srcs
    ):
        exts.append(
            CUDAExtension(
                "megatron_nbdiff._noise_cuda",
                cuda_srcs,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
            )
        )
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="megatron_nbdiff",
    version="0.1.0",
    description="Block-diffusion adaptation of autoregressive LLMs on megatron-core",
    packages=find_packages(include=["megatron_nbdiff", "megatron_nbdiff.*"]),
    package_data={"megatron_nbdiff.evaluation": ["tasks/*.yaml", "tasks/*.jsonl", "tasks/*.py"]},
    python_requires=">=3.11",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
