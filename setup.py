"""Build expcuda and its compiled extension ``expcuda._C``.

Build with torch already installed:  pip install -e . --no-build-isolation

Toggles (environment variables read at build time):
  EXPCUDA_NO_EXT=1        pure-Python install: no compiled code at all (reference and
                          Triton backends only).
  EXPCUDA_NO_CUDA=1       build the C++ CPU kernels only, even when torch has CUDA and
                          nvcc is found.
  TORCH_CUDA_ARCH_LIST    the GPU architectures to compile for, e.g. "9.0" or "8.0;9.0"
                          (default: the visible GPU's, else "9.0+PTX": sm_90 code plus PTX
                          that a newer GPU compiles at load -- one arch keeps the build short).
  EXPCUDA_DEBUG=1         a debug build: -O0 -g, device debug info, no line-level opt.
  CUDA_HOME               the CUDA toolkit folder; when unset it is found from the nvcc on
                          PATH, following a wrapper script to the real nvcc.
  MAX_JOBS                parallel compile jobs for ninja.

The CUDA sources are compiled whenever torch was built with CUDA and nvcc is found,
whether or not a GPU is present: a CUDA compile error fails the build.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def real_nvcc() -> str | None:
    """The real nvcc binary: follows a one-line ``exec /path/nvcc`` wrapper script."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        with open(nvcc, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return nvcc
    if head.startswith(b"#!"):
        match = re.search(rb"(/\S*/bin/nvcc)\b", head)
        if match and os.path.exists(match.group(1).decode()):
            return match.group(1).decode()
    return os.path.realpath(nvcc)


def find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = real_nvcc()
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def cuda_major(cuda_home: str) -> int:
    """The toolkit's CUDA major version, from its cuda.h (torch's own when that is unreadable)."""
    try:
        with open(os.path.join(cuda_home, "include", "cuda.h")) as fh:
            match = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", fh.read())
        if match:
            return int(match.group(1)) // 1000
    except OSError:
        pass
    import torch
    return int(torch.version.cuda.split(".")[0])


def pip_cuda_includes(major: int, paths: list[str] | None = None) -> list[str]:
    """Header folders of the nvidia-* wheels for CUDA ``major`` (cusparse.h and friends).

    A wheel's CUDA major is the ``-cuNN`` ending of its name (``nvidia-cusparse-cu12``), else the
    ``nvidia/cuNN`` folder it installs into (the CUDA 13 wheels); wheels of another major, or of
    none that can be told, are left out so that their headers never mix with the toolkit's.
    """
    found = set()
    for dist in importlib.metadata.distributions(path=paths if paths is not None else sys.path):
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if not name.startswith("nvidia-"):
            continue
        suffix = re.search(r"-cu(\d+)$", name)
        for file in dist.files or ():
            parts = file.parts
            if len(parts) < 3 or parts[0] != "nvidia" or "include" not in parts:
                continue
            wheel_major = suffix or re.fullmatch(r"cu(\d+)", parts[1])
            if wheel_major and int(wheel_major.group(1)) == major:
                found.add(str(dist.locate_file(os.path.join(*parts[:parts.index("include") + 1]))))
    return sorted(p for p in found if os.path.isdir(p))


def default_arch() -> str:
    """The visible GPU's architecture; without one, sm_90 code plus PTX that newer GPUs JIT."""
    import torch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0+PTX"


def write_codes_header() -> None:
    """csrc/common/codes.h from expcuda/codes.py, the one table of the kernels' integer codes."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("expcuda_codes", os.path.join(ROOT, "expcuda", "codes.py"))
    codes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codes)
    path = os.path.join(ROOT, "csrc", "common", "codes.h")
    text = codes.header()
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as fh:
            fh.write(text)


def extensions():
    if flag("EXPCUDA_NO_EXT"):
        return [], {}
    try:
        import torch
    except ImportError:
        sys.exit("expcuda compiles against the installed torch: install torch first, then build without "
                 "isolation: pip install --no-build-isolation -e .  (or set EXPCUDA_NO_EXT=1)")
    cuda_home = find_cuda_home()
    use_cuda = torch.version.cuda is not None and cuda_home is not None and not flag("EXPCUDA_NO_CUDA")
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch())
    from torch.utils import cpp_extension

    debug = flag("EXPCUDA_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-std=c++20", "-ffp-contract=off", "-fopenmp", "-DEXPCUDA_HAVE_CUDA=%d" % use_cuda]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(name="expcuda._C", sources=sources, include_dirs=include_dirs,
                  extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # the toolkit's headers first: nvcc would otherwise search the wheels' ones before them
        include_dirs += [os.path.join(cuda_home, "include")]
        include_dirs += pip_cuda_includes(cuda_major(cuda_home))
        nvcc = opt + ["-std=c++20", "--fmad=false", "-DEXPCUDA_HAVE_CUDA=1"]
        if debug:
            nvcc += ["-G"]
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        ext = cpp_extension.CppExtension(**kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


write_codes_header()
ext_modules, cmdclass = extensions()

setup(
    name="expcuda",
    version="0.1.0",
    description="Fast, accurate training of low-precision CNNs: EXP-Net with fused kernels",
    packages=find_packages(include=["expcuda", "expcuda.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11",  # the oldest torch tested (README, Building)
                       "numpy", "tqdm", "matplotlib", "safetensors", "scipy"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["expcuda=expcuda.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
