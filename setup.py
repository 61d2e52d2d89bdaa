"""Builds fused_xent._C: the CPU kernel always, the CUDA kernel when a CUDA toolchain is usable.

Environment:
  FUSED_XENT_CUDA=1   build the CUDA kernel even without a GPU (CI compiles it this way); 0 never builds it.
                      Unset: build it when torch is a CUDA build and nvcc is found.
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default here: "8.0;9.0+PTX").
  MAX_JOBS            parallel compile jobs for ninja.
  FUSED_XENT_REQUIRE_EXTENSION=1  fail when the extension does not build (the Makefile and CI set it). Otherwise a
                      machine without a working C++ toolchain still installs the package, with the Triton and PyTorch
                      backends only.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _kernel_files(sources):
    """Every header and kernel source under csrc/ that the build does not compile itself (headers; the CUDA sources
    of a build without CUDA): the extension's `depends`, which setuptools (68.1 and newer) puts in the sdist, so that
    a wheel built from it compiles the same kernels."""
    return [path for path in _sources("csrc/**/*.*") if path not in sources]


def _want_cuda(torch, cuda_home):
    forced = os.environ.get("FUSED_XENT_CUDA")
    if forced is not None and forced not in ("0", "1"):
        sys.exit(f"FUSED_XENT_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, "disabled by FUSED_XENT_CUDA=0"
    if torch.version.cuda is None:
        if forced == "1":
            sys.exit("FUSED_XENT_CUDA=1 but the installed torch is a CPU-only build: install a CUDA build of torch")
        return False, "torch is a CPU-only build"
    if cuda_home is None:
        if forced == "1":
            sys.exit("FUSED_XENT_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)")
        return False, "no CUDA toolkit (nvcc) found"
    return True, "forced by FUSED_XENT_CUDA=1" if forced == "1" else f"torch CUDA {torch.version.cuda} + nvcc"


def _cuda_code(cpp_extension):
    """The code nvcc is asked for, e.g. ["sm_80", "compute_90", "sm_90"] (a cubin per sm_, PTX per compute_), as
    torch derives it from TORCH_CUDA_ARCH_LIST: recorded in the extension, so that the front end can tell a GPU
    that none of it runs on (fused_xent._backends.cuda_code_runs_on)."""
    return [flag.rpartition("code=")[2] for flag in cpp_extension._get_cuda_arch_flags()]


def _extensions():
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("CUDA_HOME") is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch otherwise guesses from `which nvcc` and may settle on a prefix without cudart.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        cpp_extension.CUDA_HOME = "/usr/local/cuda"
    with_cuda, why = _want_cuda(torch, cpp_extension.CUDA_HOME)

    sources = _sources("csrc/*.cpp") + _sources("csrc/common/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for only runs in parallel in code compiled with OpenMP; the runtime is the libgomp that
        # torch already loaded, so torch.set_num_threads applies.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    extra = {"cxx": cxx_flags}
    define_macros = []
    extension_class = cpp_extension.CppExtension
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += _sources("csrc/cuda/*.cu")
        extra["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        define_macros.append(("FUSED_XENT_CUDA_CODE", "-".join(_cuda_code(cpp_extension))))
        extension_class = cpp_extension.CUDAExtension

    print("fused_xent build configuration:")
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    print(f"  CPU kernel: yes ({len(_sources('csrc/cpu/*.cpp'))} sources; SIMD level chosen at run time)")
    print(f"  CUDA kernel: {'yes' if with_cuda else 'no'} ({why})")
    if with_cuda:
        print(f"  CUDA_HOME={cpp_extension.CUDA_HOME} TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    print(f"  MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}")

    return [
        extension_class(
            name="fused_xent._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            depends=_kernel_files(sources),
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=link_flags,
        )
    ], _optional_build(cpp_extension.BuildExtension).with_options(use_ninja=True)


def _optional_build(build_extension_class):
    class OptionalBuildExtension(build_extension_class):
        def run(self):
            try:
                super().run()
            except Exception as error:
                if os.environ.get("FUSED_XENT_REQUIRE_EXTENSION") == "1":
                    raise
                print(f"WARNING: fused_xent's compiled kernels did not build ({error}); installing without them.")
                print("WARNING: only the 'triton' (CUDA) and 'torch' backends will be available.")

    return OptionalBuildExtension


ext_modules, build_ext = _extensions()

setup(
    name="fused_xent",
    version="0.1.0",
    description="Fused log-softmax + NLL cross entropy for PyTorch (CPU, CUDA, Triton)",
    packages=find_packages(include=["fused_xent", "fused_xent.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
