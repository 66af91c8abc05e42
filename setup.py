"""Install megatron_nbdiff and build its C++ (and, where CUDA is available, CUDA) extensions.

Install with ``pip install --no-build-isolation -e .`` after ``torch==2.13.0`` is installed:
the extensions compile against the installed torch. The install provides the console commands
``nbdiff-train``, ``nbdiff-preprocess``, ``nbdiff-eval``, ``nbdiff-launch-slurm``,
``nbdiff-generate``, ``nbdiff-convert-hf-to-megatron``, ``nbdiff-convert-megatron-to-hf``,
``nbdiff-convert-megatron-lm`` and ``nbdiff-plan``
(the ``tools/*.py`` files run the same code).
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

# Runtime dependencies (requirements.txt pins what CI tests). torch is deliberately not listed:
# the Makefile installs torch==2.13.0 first (the CPU build on CI, a CUDA build on GPU machines),
# and a `torch` requirement here would let pip replace it with whatever build the index serves.
INSTALL_REQUIRES = [
    "megatron-core==0.16.1",
    "transformers==5.23.0",
    "numpy",
    "sentencepiece",
    "safetensors",
    "pyyaml",
    "tqdm",
    "matplotlib",
    "tensorboard",
]
EXTRAS_REQUIRE = {
    "eval": ["lm-eval==0.4.13"],  # task accuracy in nbdiff-eval (requirements-eval.txt)
    "test": ["pytest", "hypothesis", "scipy"],
    "bench": ["psutil"],
}
CONSOLE_SCRIPTS = [
    "nbdiff-train = megatron_nbdiff.training.cli:console_main",
    "nbdiff-preprocess = megatron_nbdiff.data.preprocess:console_main",
    "nbdiff-eval = megatron_nbdiff.evaluation.report:console_main",
    "nbdiff-launch-slurm = megatron_nbdiff.slurm.launch:console_main",
    "nbdiff-generate = megatron_nbdiff.inference.cli:console_main",
    "nbdiff-convert-hf-to-megatron = megatron_nbdiff.checkpoint.cli:hf_to_megatron_console",
    "nbdiff-convert-megatron-to-hf = megatron_nbdiff.checkpoint.cli:megatron_to_hf_console",
    "nbdiff-convert-megatron-lm = megatron_nbdiff.checkpoint.cli:megatron_lm_console",
    "nbdiff-plan = megatron_nbdiff.planning.cli:console_main",
]

setup(
    name="megatron_nbdiff",
    version="0.1.0",
    description="Block-diffusion adaptation of autoregressive LLMs on megatron-core",
    packages=find_packages(include=["megatron_nbdiff", "megatron_nbdiff.*"]),
    package_data={
        "megatron_nbdiff.evaluation": ["tasks/*.yaml", "tasks/*.jsonl", "tasks/*.py"],
        "megatron_nbdiff.slurm": ["train.sbatch.template"],
    },
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
