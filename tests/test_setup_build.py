"""setup.py's build configuration (issue 8, defect 10): the toolkit's headers come before any
wheel's, wheels of another CUDA major are left out, and without a GPU the default arch list
carries PTX (so that the extension also loads on GPUs newer than sm_90)."""

from __future__ import annotations

import os
import runpy

import pytest
import setuptools
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's namespace, run with setuptools.setup a no-op and its environment contained."""
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    for name in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
        monkeypatch.delenv(name)
    monkeypatch.chdir(ROOT)
    return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_under_test")


def _wheel(site, dist, version, headers):
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{h},,\n" for h in headers))
    for h in headers:
        (site / h).parent.mkdir(parents=True, exist_ok=True)
        (site / h).write_text("")


def test_wheel_headers_of_the_toolkits_cuda_major_only(setup_py, tmp_path):
    _wheel(tmp_path, "nvidia-cublas", "13.1", ["nvidia/cu13/include/cublas.h"])
    _wheel(tmp_path, "nvidia-cudnn-cu13", "9.2", ["nvidia/cudnn/include/cudnn.h"])
    _wheel(tmp_path, "nvidia-cusparse-cu12", "12.5", ["nvidia/cusparse/include/cusparse.h"])
    _wheel(tmp_path, "nvidia-nvtx", "1.0", ["nvidia/nvtx/include/nvtx3.h"])  # major unknown
    found = setup_py["pip_cuda_includes"](13, [str(tmp_path)])
    assert found == [str(tmp_path / "nvidia/cu13/include"), str(tmp_path / "nvidia/cudnn/include")]
    assert setup_py["pip_cuda_includes"](12, [str(tmp_path)]) == [
        str(tmp_path / "nvidia/cusparse/include")]


def test_default_arch_without_a_gpu_carries_ptx(setup_py, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup_py["default_arch"]() == "9.0+PTX"


def test_toolkit_headers_come_first(setup_py):
    exts = setup_py["ext_modules"]
    if not exts or not any(s.endswith(".cu") for s in exts[0].sources):
        pytest.skip("no CUDA sources in this build (no nvcc, or torch without CUDA)")
    dirs = exts[0].include_dirs
    toolkit = os.path.join(setup_py["find_cuda_home"](), "include")
    wheels = [i for i, d in enumerate(dirs) if os.sep + "nvidia" + os.sep in d]
    assert toolkit in dirs and all(dirs.index(toolkit) < i for i in wheels), dirs
