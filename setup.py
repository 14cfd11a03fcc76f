"""Builds the optional compiled extension ltengine._C; package metadata lives in pyproject.toml.

- CUDA extension (CPU + CUDA truncate_kv_ / paged_truncate_, CUDA paged_decode, skinny_linear) when torch sees a GPU or LTENGINE_CUDA=1, and
  nvcc is found; arch list from TORCH_CUDA_ARCH_LIST (default "9.0").
- Otherwise a C++ extension with the CPU truncate_kv_ / paged_truncate_ only.
- Without torch, a compiler, or when the build fails: a warning, and the pure-Python package installs
  anyway (every kernel has a PyTorch reference fallback). LTENGINE_NO_EXT=1 skips the build;
  LTENGINE_STRICT_BUILD=1 makes a failed build an error; LTENGINE_PTXAS_VERBOSE=1 prints register use.
"""

from __future__ import annotations

import os
import shutil
import warnings

from setuptools import setup


def _extension_setup() -> dict:
    if os.environ.get("LTENGINE_NO_EXT") == "1":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch absent (e.g. an isolated build env): pure Python
        warnings.warn(f"ltengine: torch not importable at build time ({exc}); skipping the _C extension")
        return {}

    class TolerantBuildExt(BuildExtension):
        """A failed compile leaves the pure-Python package installable."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if os.environ.get("LTENGINE_STRICT_BUILD") == "1":
                    raise
                warnings.warn(f"ltengine: building the _C extension failed ({exc}); using the Python kernels")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if os.environ.get("LTENGINE_STRICT_BUILD") == "1":
                    raise
                warnings.warn(f"ltengine: building {ext.name} failed ({exc}); using the Python kernels")

    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    want_cuda = torch.cuda.is_available() or os.environ.get("LTENGINE_CUDA") == "1"
    cxx = ["-O3"]  # BuildExtension picks the C++ standard that matches torch
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
    if os.environ.get("LTENGINE_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    if want_cuda and nvcc and torch.version.cuda is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = CUDAExtension(
            "ltengine._C",
            ["csrc/ops.cpp", "csrc/truncate_kv.cu", "csrc/paged_decode.cu", "csrc/paged_truncate.cu",
             "csrc/skinny_linear.cu"],
            define_macros=[("LTENGINE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags},
        )
    else:
        if want_cuda:
            warnings.warn("ltengine: CUDA requested but nvcc or a CUDA build of torch is missing; CPU extension only")
        ext = CppExtension("ltengine._C", ["csrc/ops.cpp"], extra_compile_args={"cxx": cxx})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": TolerantBuildExt}}


setup(**_extension_setup())
