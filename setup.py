"""Build script; the metadata lives in pyproject.toml.

Builds the optional extension `torchdp_keras._C` (fused clip-and-noise ops,
`csrc/`) against the torch already installed:

* the CPU kernel whenever torch is importable at build time and a C++
  compiler works: install with `pip install --no-build-isolation ...` so that
  the build sees your torch (torch is deliberately not a build requirement);
* the CUDA kernel too when that torch has CUDA and nvcc is found.

Installation never fails because of the extension: if it cannot be built, or
`TORCHDP_KERAS_DISABLE_EXT=1`, the package is installed without it and uses
the pure-torch reference ops (`torchdp_keras.ops.extension_info()` says why).
"""

import os
import sys

from setuptools import setup


def _extension():
    if os.environ.get("TORCHDP_KERAS_DISABLE_EXT") == "1":
        print("torchdp_keras: TORCHDP_KERAS_DISABLE_EXT=1, not building csrc/", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "torchdp_keras: torch is not importable in the build environment "
            "(use pip install --no-build-isolation to build the fused kernels)",
            file=sys.stderr,
        )
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/clip_noise_cpu.cpp"]
    # No FMA contraction: CPU and CUDA round every operation alike (bit-identical
    # noise). No errno from sqrt: the noise loop vectorises; sqrt is correctly
    # rounded either way, so no result changes.
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-std=c++20"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    kwargs = {}
    if with_cuda:
        sources.append("csrc/clip_noise_cuda.cu")
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": ["-O3", "-fmad=false", "-std=c++20"],
        }
        factory = cpp_extension.CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        factory = cpp_extension.CppExtension
    extension = factory(
        "torchdp_keras._C",
        sources,
        include_dirs=[os.path.join(here, "csrc")],
        **kwargs,
    )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds the extension if it can; never fails the installation."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any build failure is optional
                print(f"torchdp_keras: fused kernels not built ({error})", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001
                print(f"torchdp_keras: fused kernels not built ({error})", file=sys.stderr)

    return [extension], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
