"""Build of alter_kernels._C, the compiled extension (C++ CPU kernels, CUDA kernels when
torch has CUDA), and the package's dependencies: the core, and extras for evaluation,
plots, benchmarks and multi-process runs (``EXTRAS``). Install with
``pip install --no-build-isolation -e '.[all]'`` so it compiles against the torch already
installed. ``ALTER_NO_EXT=1`` skips the extension."""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("ALTER_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    # torch's build adds the C++ standard its headers need (C++20 for torch 2.13)
    # -fno-trapping-math lets the selects in the kernels' inner loops vectorize
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    kwargs = dict(
        name="alter_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = (
        cuda_sources
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("ALTER_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        kwargs["sources"] = sources + cuda_sources
        kwargs["extra_compile_args"] = {"cxx": cxx_flags + ["-DWITH_CUDA"], "nvcc": ["-O3", "-DWITH_CUDA"]}
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        ext = cpp_extension.CppExtension(**kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# Optional dependencies, by what needs them; `pip install alter-kernels[all]` installs every one.
EXTRAS = {
    "eval": ["rouge-score"],  # alter.evaluation's ROUGE, alter eval, alter demo, alter quality
    "plot": ["matplotlib"],  # the plots of alter demo, alter quality and the benchmark harness
    "bench": ["matplotlib", "pytest>=8", "pytest-benchmark>=4"],  # benchmarks/harness.py, alter bench
    # multi-process runs (alter.training.distributed); the FSDP2 plugin (fsdp_version=2) is from 1.6
    "distributed": ["accelerate>=1.6,<2"],
}
EXTRAS["all"] = sorted({requirement for extra in EXTRAS.values() for requirement in extra})

setup(
    name="alter-kernels",
    version="0.1.0",
    description="ALTER: asymmetric LoRA, token-entropy-guided unlearning of LLMs, with fused kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["alter_kernels", "alter_kernels.*", "alter", "alter.*"]),
    python_requires=">=3.10",
    # The core: the kernels, the adapters, unlearning (alter.unlearn reads datasets.Dataset,
    # alter.data imports datasets, the sub-domain k-means is scipy's) and alter unlearn.
    install_requires=[
        "torch>=2.4",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "transformers>=5.0",
        "safetensors",
        "tqdm",
        "datasets>=2.19",
        "scipy",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["alter=alter.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
