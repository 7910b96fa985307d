"""benchmarks/gpu_check.sh: its dry run end to end, and the pieces a GPU call depends on (stamp, peak, budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_report  # noqa: E402

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
CHILD_ENV = {**os.environ, "PYTHON": sys.executable}  # the script runs this interpreter, not PATH's python3


def number(v) -> float:
    assert isinstance(v, (int, float)) and not isinstance(v, bool), v
    return float(v)


def test_dry_run_writes_the_whole_report(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=CHILD_ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_report.json").read_text())
    md = (out / "gpu_report.md").read_text()
    assert report["dry_run"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == [s.name for s in gpu_report.STEPS]
    for step in gpu_report.STEPS:
        got = steps[step.name]
        assert got["status"] == "ok", (step.name, got["summary"], got.get("tail"))
        assert f"## {step.title}" in md and f"| {step.name} | ok |" in md
        number(got["seconds"])
    data = {name: s["data"] for name, s in steps.items()}
    assert data["environment"]["torch"] == torch.__version__
    assert number(data["selftest"]["ok"]) > 0 and data["selftest"]["mismatch"] == 0
    assert number(data["tests"]["passed"]) > 0 and data["tests"]["failures"] == 0
    rows = data["bandwidth"]["rows"]
    assert {r["kernel"] for r in rows} == {"dorefa_activation_fwd", "sign_activation_fwd", "mask_bwd", "lsq_fwd",
                                           "lsq_bwd"}
    assert all(number(r["gbs"]) > 0 and number(r["of_copy"]) > 0 for r in rows)
    assert number(data["bandwidth"]["copy_gbs"]) > 0
    medians = [m for rows_ in data["quant_bench"]["groups"].values() for m in rows_.values()]
    assert medians and all(number(m) > 0 for m in medians)
    assert data["quant_bench"]["vs_torch"], "no comparison with torch's fake-quant op"
    assert all(number(r["ms"]) > 0 for r in data["block_bench"]["rows"])
    assert all(number(r["fused_over_two_convs"]) > 0 for r in data["block_bench"]["ratios"])
    assert all(number(data["train"]["rows"][m]["images_per_s"]) > 0 for m in ("fp", "lp", "exp"))
    targets = report["targets"]
    assert len(targets) == 3 and "## Targets" in md
    assert targets[0]["met"] is None  # no GPU: no peak bandwidth to hold the kernels to
    for t in targets[1:]:
        number(t["value"])
        assert t["met"] in (True, False)
    assert (out / "gpu_check.log").stat().st_size > 0
    assert "every step passed" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    done = subprocess.run(["bash", SCRIPT, "--out", str(tmp_path / "r")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=CHILD_ENV)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "no CUDA GPU is visible" in done.stdout
    assert not (tmp_path / "r").exists()


def test_bad_budget_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_report.main(["--dry-run", "--budget", "0"])
    assert exc.value.code == 2 and "--budget must be a positive" in capsys.readouterr().err


def test_out_of_budget_steps_are_skipped_and_reported(tmp_path):
    """A budget too small for any step: none is started, the report says so, the exit status is 1."""
    assert gpu_report.main(["--dry-run", "--out", str(tmp_path), "--budget", "5"]) == 1
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["skipped"] * len(gpu_report.STEPS)
    assert "Failed or not run: environment, build" in (tmp_path / "gpu_report.md").read_text()


def test_a_step_past_its_timeout_is_killed(tmp_path):
    step = gpu_report.Step("environment", "Environment", 60, 1)
    ctx = {"dry": True, "sizes": gpu_report.sizes(True), "raw": str(tmp_path)}
    t0 = time.perf_counter()
    res = gpu_report.run_step(step, 0.3, ctx, str(tmp_path), str(tmp_path / "log"))  # importing torch takes longer
    assert time.perf_counter() - t0 < 30
    assert res["status"] == "timeout" and "0 s timeout" in res["summary"]


def test_build_stamp(tmp_path):
    so = tmp_path / "_C.so"
    stamp = tmp_path / "_C.build-stamp.json"
    wanted = gpu_report.wanted_stamp("9.0", "2.11.0", "13.0", "3.12.3", "abc")
    assert gpu_report.build_needed(str(stamp), None, wanted) == "expcuda._C is not built"
    so.write_bytes(b"library")
    assert "no build stamp" in gpu_report.build_needed(str(stamp), str(so), wanted)
    stamp.write_text(json.dumps(gpu_report.stamp_of_library(str(so), wanted)))
    assert gpu_report.build_needed(str(stamp), str(so), wanted) is None
    assert "arch ('9.0' -> '8.0')" in gpu_report.build_needed(str(stamp), str(so), {**wanted, "arch": "8.0"})
    assert "sources" in gpu_report.build_needed(str(stamp), str(so), {**wanted, "sources": "def"})
    so.write_bytes(b"rebuilt elsewhere, for another arch")
    assert "size" in gpu_report.build_needed(str(stamp), str(so), wanted)


def test_sources_digest_follows_the_sources(tmp_path, monkeypatch):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("setup()")
    kernel = tmp_path / "csrc" / "cuda" / "k.cu"
    kernel.write_text("__global__ void k() {}")
    monkeypatch.setattr(gpu_report, "ROOT", str(tmp_path))
    before = gpu_report.sources_digest()
    assert gpu_report.sources_digest() == before
    kernel.write_text("__global__ void k() { }")
    assert gpu_report.sources_digest() != before


def test_peak_bandwidth_from_device_properties():
    h200_like = SimpleNamespace(memory_clock_rate=3_201_000, memory_bus_width=6144)  # kHz, bits
    peak, source = gpu_report.peak_from_props(h200_like)
    assert peak == pytest.approx(2 * 3.201e9 * 6144 / 8)
    assert "memory_clock_rate" in source
    peak, source = gpu_report.peak_from_props(SimpleNamespace(name="an older torch"))
    assert peak is None and "has no memory_clock_rate" in source


def test_junit_counts(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="1.5">'
                    '<testcase classname="tests.test_x" name="test_a"><failure message="boom&#10;more"/></testcase>'
                    '<testcase classname="tests.test_x" name="test_b"/><testcase classname="tests.test_x" '
                    'name="test_c"><skipped/></testcase></testsuite></testsuites>')
    c = gpu_report.junit_counts(str(path))
    assert (c["tests"], c["failures"], c["errors"], c["skipped"], c["seconds"]) == (3, 1, 0, 1, 1.5)
    assert c["failed"] == ["tests.test_x::test_a (failure): boom"]


SELFTEST_ON_A_GPU = """backends:
  cuda      unavailable: expcuda._C was built without CUDA kernels
selftest (small inputs, forward and gradients, against the reference on the same device):
  lsq                triton    ok: bit for bit with the reference: 36 outputs and gradients on cuda
  lsq                cuda      refused: expcuda._C was built without CUDA kernels
  block_epilogue     triton    mismatch: beyond the kernel tests' tolerance at out
  selftest: 1 ok, 1 mismatch, 0 error, 1 refused in 2.5 s -> FAILED
"""


def test_selftest_result_on_a_gpu_machine():
    """A refused cuda backend on a GPU (a CPU-only build) fails the step even without a mismatch."""
    res = gpu_report.parse_selftest(SELFTEST_ON_A_GPU.replace("mismatch:", "ok:").replace("1 mismatch", "0 mismatch"),
                                    0, on_gpu=True)
    assert res["status"] == "failed" and "refused on a GPU machine" in res["summary"]
    assert gpu_report.parse_selftest(SELFTEST_ON_A_GPU.replace("mismatch:", "ok:"), 0, on_gpu=False)["status"] == "ok"
    res = gpu_report.parse_selftest(SELFTEST_ON_A_GPU, 1, on_gpu=False)
    assert res["status"] == "failed" and res["data"]["mismatch"] == 1
    assert res["data"]["failures"] == ["block_epilogue     triton    mismatch: beyond the kernel tests' tolerance at out"]
    assert gpu_report.parse_selftest("Traceback ...", 1, on_gpu=True)["status"] == "failed"


def test_targets_read_off_gpu_figures():
    steps = {
        "bandwidth": {"data": {"rows": [
            dict(backend="cuda", kernel="lsq_bwd", of_peak=0.81, of_copy=0.9),
            dict(backend="triton", kernel="mask_bwd", of_peak=0.64, of_copy=0.7)]}},
        "block_bench": {"data": {"ratios": [dict(shape="svhn-1x", layout="nchw", fused_over_two_convs=1.12),
                                            dict(shape="svhn-0.25x", layout="nchw", fused_over_two_convs=1.31)]}},
        "train": {"data": {"rows": {"exp": {"vs_fp": 0.74}}}},
    }
    bandwidth, block, train = gpu_report.targets(steps)
    assert bandwidth["met"] is False and "triton mask_bwd 64.0%" in bandwidth["measured"]
    assert block["met"] is False and block["value"] == 1.31 and "svhn-0.25x" in block["measured"]
    assert train["met"] is True and train["value"] == 0.74
    assert [t["met"] for t in gpu_report.targets({})] == [None, None, None]
