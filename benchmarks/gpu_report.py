"""The prepared GPU report (issue 8): everything a GPU can tell us, in one call of at most 8 minutes.

    bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS]   # on a CUDA machine
    bash benchmarks/gpu_check.sh --dry-run [--out DIR]            # the same steps on the CPU, tiny sizes

A GPU is lent to this project rarely, for minutes, with no network: this
script builds the extension for the visible GPU only (unless a stamp says it
already is), runs the self-check, every CUDA and Triton test (compiled, not
interpreted), the quantizer, epilogue and block benchmarks against torch's
fake-quant ops and cuDNN convolutions, each elementwise quantizer kernel's
bandwidth against the device's peak, and one training-throughput run, and
writes ``gpu_report.md`` and ``gpu_report.json`` into ``--out`` (default
``$OUT``, else ``./gpu_report``).  Each step runs in its own process group
with its own timeout, so a hung step is killed without eating the others'
time; a failed step does not stop the rest; the report is rewritten after
every step, so a run cut short still leaves one.  ``--dry-run`` runs the same
steps on the CPU backends with tiny sizes (CI runs it), so that the first
GPU call does not fail on a typo.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import types
import xml.etree.ElementTree as ET
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = os.path.join(ROOT, "expcuda", "_C.build-stamp.json")
TARGET_BANDWIDTH, TARGET_BLOCK, TARGET_TRAIN = 0.70, 1.2, 0.7


@dataclass
class Step:
    name: str
    title: str
    limit_s: int  # this step's own timeout
    floor_s: int  # the least time worth starting it with (reserved for it while earlier steps run)


STEPS = (
    Step("environment", "Environment", 60, 10),
    Step("build", "Build for the visible GPU", 300, 20),
    Step("selftest", "Self-check (python -m expcuda.info --selftest)", 120, 20),
    Step("tests", "CUDA and Triton tests", 200, 30),
    Step("bandwidth", "Elementwise quantizer kernels: memory bandwidth", 60, 15),
    Step("quant_bench", "Quantizers against torch's fake-quant ops", 90, 15),
    Step("block_bench", "Epilogue and expanded block against cuDNN convolutions", 90, 15),
    Step("train", "Training throughput: full precision, LP baseline, EXP-Net", 120, 20),
)


def sizes(dry: bool) -> dict:
    """What each step runs on: the GPU's sizes, or tiny ones for the dry run."""
    if dry:
        return dict(numel=1 << 16, reps=3, bench_time="0.01", block_shapes=("svhn-0.25x",), block_layouts=("nchw",),
                    batch=8, rounds=2, train_steps=3, train_warmup=1, tests_paths=["tests/test_quant.py"],
                    tests_k="test_sign_activation or test_packed_mask")
    return dict(numel=64 << 20, reps=20, bench_time="0.1", block_shapes=("svhn-0.25x", "svhn-1x"),
                block_layouts=("nchw", "channels_last"), batch=128, rounds=20, train_steps=60, train_warmup=10,
                tests_paths=[], tests_k=None)


# --------------------------------------------------------------------------- helpers (no torch needed)

def peak_from_props(props) -> tuple[float | None, str]:
    """Theoretical memory bandwidth in bytes/s from the device's own properties, and where it came from.

    Double data rate: 2 x memory clock (kHz in CUDA's properties) x bus width (bits) / 8.
    """
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8, ("torch.cuda.get_device_properties: 2 x memory_clock_rate "
                                                      f"({clock_khz} kHz) x memory_bus_width ({bus_bits} bits) / 8")
    return None, "torch.cuda.get_device_properties has no memory_clock_rate / memory_bus_width here"


def peak_bandwidth(index: int) -> tuple[float | None, str]:
    """peak_from_props on torch's properties, else the same fields from Triton's CUDA driver."""
    import torch
    peak, source = peak_from_props(torch.cuda.get_device_properties(index))
    if peak is not None:
        return peak, source
    try:
        import triton
        p = triton.runtime.driver.active.utils.get_device_properties(index)
        if p.get("mem_clock_rate") and p.get("mem_bus_width"):
            return (2.0 * p["mem_clock_rate"] * 1e3 * p["mem_bus_width"] / 8,
                    f"Triton's driver properties: 2 x mem_clock_rate ({p['mem_clock_rate']} kHz) x mem_bus_width "
                    f"({p['mem_bus_width']} bits) / 8 ({source})")
    except Exception as exc:  # noqa: BLE001 - a missing field is reported, not fatal
        source += f"; Triton's driver properties failed too ({type(exc).__name__}: {exc})"
    return None, source + ": peak unknown, fractions are of the measured device-to-device copy only"


def sources_digest() -> str:
    """sha256 over setup.py and csrc/: a changed source means a rebuild."""
    h = hashlib.sha256()
    for path in sorted([os.path.join(ROOT, "setup.py")] + glob.glob(os.path.join(ROOT, "csrc", "**", "*"),
                                                                     recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def built_library() -> str | None:
    """This interpreter's expcuda/_C*.so, if built in place."""
    path = os.path.join(ROOT, "expcuda", "_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    return path if os.path.exists(path) else None


def wanted_stamp(arch: str, torch_version: str, cuda_version: str | None, python: str, digest: str) -> dict:
    return {"arch": arch, "torch": torch_version, "cuda": cuda_version, "python": python, "sources": digest}


def stamp_of_library(so: str, wanted: dict) -> dict:
    """What the stamp records: the build's inputs and the library's size and mtime (a rebuild elsewhere changes them)."""
    st = os.stat(so)
    return {**wanted, "library": os.path.basename(so), "size": st.st_size, "mtime": int(st.st_mtime)}


def build_needed(stamp_path: str, so: str | None, wanted: dict) -> str | None:
    """None when the library at ``so`` was built for exactly ``wanted`` (arch, torch, sources), else why not."""
    if so is None:
        return "expcuda._C is not built"
    try:
        with open(stamp_path) as fh:
            have = json.load(fh)
    except (OSError, ValueError):
        return f"no build stamp ({os.path.basename(stamp_path)}) beside {os.path.basename(so)}"
    expected = stamp_of_library(so, wanted)
    changed = [k for k in expected if have.get(k) != expected[k]]
    if changed:
        return "the stamp differs in " + ", ".join(f"{k} ({have.get(k)!r} -> {expected[k]!r})" if k != "sources"
                                                   else "sources" for k in changed)
    return None


def junit_counts(path: str) -> dict:
    """Tests, failures, errors, skipped, seconds and the failing test ids from a JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failed = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                msg = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
                failed.append(f"{case.get('classname')}::{case.get('name')} ({kind}): {msg}")
    counts["failed"] = failed
    return counts


def run(cmd: list[str], log, env=None, cwd=ROOT) -> int:
    """Run cmd, its output into log (the step's own timeout kills the whole process group)."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode


def capture(cmd: list[str], env=None) -> tuple[int, str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    except OSError as exc:
        return 127, str(exc)
    return done.returncode, done.stdout + done.stderr


def result(status: str, summary: str, md: str = "", **data) -> dict:
    return {"status": status, "summary": summary, "md": md, "data": data}


# --------------------------------------------------------------------------- steps (each in its own process)

def step_environment(ctx, log) -> dict:
    import torch
    from expcuda import info
    lines = info.lines()
    nvcc_rc, nvcc = capture(["nvcc", "--version"])
    nvcc_line = nvcc.strip().splitlines()[-1] if nvcc_rc == 0 and nvcc.strip() else f"not found ({nvcc.strip()[:80]})"
    data = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda, nvcc=nvcc_line,
                cpus=os.cpu_count())
    try:
        import triton
        data["triton"] = triton.__version__
    except ImportError as exc:
        data["triton"] = f"not installed ({exc})"
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(i)
        peak, source = peak_bandwidth(i)
        data.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), peak_bandwidth_gbs=peak and round(peak / 1e9, 1),
                    peak_source=source)
        what = f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs)"
    else:
        data.update(gpu=None, peak_bandwidth_gbs=None, peak_source="no GPU (dry run)")
        what = "no GPU: dry run on the CPU"
    md = "\n".join(f"- {k}: {v}" for k, v in data.items()) + "\n\n```\n" + "\n".join(lines) + "\n```"
    summary = f"{what}; torch {torch.__version__}, triton {data['triton']}, {nvcc_line}"
    return result("ok", summary, md, backends=lines, **data)


def step_build(ctx, log) -> dict:
    import torch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}.{minor}"
    else:
        arch = "none (no GPU)"
    wanted = wanted_stamp(arch, torch.__version__, torch.version.cuda, sys.version.split()[0], sources_digest())
    so = built_library()
    why = build_needed(STAMP, so, wanted)
    if why is None:
        return result("ok", f"already built for {arch} ({os.path.basename(so)}, stamp matches): build skipped",
                      arch=arch, built=False)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count() or 1))
    if shutil.which("nvcc") is None and "CUDA_HOME" not in env:  # setup.py finds the toolkit from nvcc on PATH
        from torch.utils import cpp_extension
        if cpp_extension.CUDA_HOME:
            env["CUDA_HOME"] = cpp_extension.CUDA_HOME
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    if ctx["dry"]:
        return result("ok", f"dry run: would build ({why}) with TORCH_CUDA_ARCH_LIST=<the GPU's arch> "
                            f"python {shlex.join(cmd[1:])}; the extension here: {os.path.basename(so) if so else 'none'}",
                      arch=arch, built=False, reason=why)
    t0 = time.perf_counter()
    rc = run(cmd, log, env)
    if rc != 0 and time.perf_counter() - t0 < 30:  # a tooling failure, not a compile error: try pip's way
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
        rc = run(cmd, log, env)
    seconds = round(time.perf_counter() - t0, 1)
    so = built_library()
    if rc != 0 or so is None:
        return result("failed", f"build failed after {seconds} s (rc {rc}): see the log", arch=arch, built=False,
                      reason=why, seconds=seconds)
    with open(STAMP, "w") as fh:
        json.dump(stamp_of_library(so, wanted), fh, indent=1)
    return result("ok", f"built for {arch} in {seconds} s ({why})", arch=arch, built=True, reason=why,
                  seconds=seconds, command=" ".join(cmd))


SELFTEST_LINE = re.compile(r"selftest: (\d+) ok, (\d+) mismatch, (\d+) error, (\d+) refused in ([\d.]+) s")


def step_selftest(ctx, log) -> dict:
    rc, out = capture([sys.executable, "-m", "expcuda.info", "--selftest"])
    log.write(out)
    return parse_selftest(out, rc, on_gpu=not ctx["dry"])


def parse_selftest(out: str, rc: int, on_gpu: bool) -> dict:
    """The self-check's result; on a GPU machine a refused triton or cuda backend is a failure too."""
    m = SELFTEST_LINE.search(out)
    if m is None:
        return result("failed", f"no summary line (rc {rc})", "```\n" + out[-3000:] + "\n```")
    ok, mismatch, error, refused = (int(g) for g in m.groups()[:4])
    lines = [ln.strip() for ln in out.splitlines() if re.match(r"\s+\S+\s+(reference|cpu|triton|cuda)\s", ln)]
    bad = [ln for ln in lines if re.search(r"\s(mismatch|error):", ln)]
    gpu_refused = [ln for ln in lines if on_gpu and re.match(r"\S+\s+(triton|cuda)\s+refused", ln)]
    status = "ok" if rc == 0 and not gpu_refused else "failed"
    summary = f"{ok} ok, {mismatch} mismatch, {error} error, {refused} refused in {m.group(5)} s (rc {rc})"
    if gpu_refused:
        summary += f"; {len(gpu_refused)} GPU backend lines refused on a GPU machine"
    return result(status, summary, "```\n" + "\n".join(lines) + "\n```", ok=ok, mismatch=mismatch, error=error,
                  refused=refused, seconds=float(m.group(5)), failures=bad + gpu_refused)


def step_tests(ctx, log) -> dict:
    import importlib.util
    junit = os.path.join(ctx["raw"], "junit.xml")
    cmd = [sys.executable, "-m", "pytest", *ctx["sizes"]["tests_paths"], "-m", "cuda or triton", "-rfEs",
           f"--junitxml={junit}"]
    if ctx["sizes"]["tests_k"]:
        cmd += ["-k", ctx["sizes"]["tests_k"]]
    if not ctx["dry"] and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "120"]
    rc = run(cmd, log)
    if not os.path.exists(junit):
        return result("failed", f"pytest wrote no report (rc {rc})")
    c = junit_counts(junit)
    passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    summary = (f"{passed} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped of "
               f"{c['tests']} in {c['seconds']} s (rc {rc})")
    if ctx["dry"]:
        summary = f"dry run, the subset -k '{ctx['sizes']['tests_k']}': " + summary
    elif c["skipped"]:
        summary += "; skipped although a GPU is visible: their reasons are in the log (-rs)"
    md = f"`python {shlex.join(cmd[1:])}`\n\n" + "".join(f"- {f}\n" for f in c["failed"][:40])
    status = "ok" if rc == 0 and c["failures"] == 0 and c["errors"] == 0 and c["tests"] > 0 else "failed"
    return result(status, summary, md, passed=passed, **c)


def _timer(device):
    """A function that returns the mean seconds of fn over reps calls (CUDA events on a GPU)."""
    import torch

    def timed(fn, reps, warmup=3):
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    return timed


def step_bandwidth(ctx, log) -> dict:
    import torch
    from expcuda import backends
    dry, sz = ctx["dry"], ctx["sizes"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = sz["numel"]
    timed = _timer(device)
    x = torch.rand(n, device=device) * 2 - 0.5
    g = torch.randn(n, device=device)
    step = torch.tensor(0.1, device=device)
    dst = torch.empty_like(x)
    copy_bps = 8 * n / timed(lambda: dst.copy_(x), sz["reps"])
    peak, source = (peak_bandwidth(device.index or 0) if device.type == "cuda"
                    else (None, "no GPU (dry run): fractions are of the measured copy"))
    names = [b for b in (("cpu",) if dry else ("triton", "cuda"))]
    rows, refused = [], {}
    for name in names:
        reason = backends.why_not(name, device, torch.float32)
        if reason is not None:
            refused[name] = reason
            continue
        from expcuda import registry
        m = types.SimpleNamespace(**{op: registry.kernel(op, name).fn for op in
                                     ("dorefa_activation_fwd", "sign_activation_fwd", "mask_bwd", "lsq_fwd",
                                      "lsq_bwd")})
        _, mask = m.dorefa_activation_fwd(x, 2)
        kernels = {  # name: (call, bytes moved: reads + writes)
            "dorefa_activation_fwd": (lambda: m.dorefa_activation_fwd(x, 2), 8 * n + n / 8),
            "sign_activation_fwd": (lambda: m.sign_activation_fwd(x), 8 * n + n / 8),
            "mask_bwd": (lambda: m.mask_bwd(g, mask), 8 * n + n / 8),
            "lsq_fwd": (lambda: m.lsq_fwd(x, step, 4, False), 8 * n),
            "lsq_bwd": (lambda: m.lsq_bwd(g, x, step, 4, False), 12 * n),
        }
        for kernel, (fn, nbytes) in kernels.items():
            s = timed(fn, sz["reps"])
            bps = nbytes / s
            rows.append(dict(backend=name, kernel=kernel, us=round(s * 1e6, 2), gbs=round(bps / 1e9, 2),
                             of_peak=round(bps / peak, 4) if peak else None, of_copy=round(bps / copy_bps, 4)))
    md = [f"{n} float32 elements on {device.type}; peak {peak / 1e9:.0f} GB/s ({source}); "
          if peak else f"{n} float32 elements on {device.type}; peak unknown ({source}); ",
          f"device-to-device copy measured at {copy_bps / 1e9:.1f} GB/s.\n",
          "| backend | kernel | us | GB/s | of peak | of copy |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        frac = f"{100 * r['of_peak']:.1f}%" if r["of_peak"] is not None else "n/a"
        md.append(f"| {r['backend']} | {r['kernel']} | {r['us']} | {r['gbs']} | {frac} | {100 * r['of_copy']:.1f}% |")
    md += [f"\n{k}: refused ({v})" for k, v in refused.items()]
    status = "ok" if rows and (dry or not refused) else "failed"
    worst = min(rows, key=lambda r: r["of_peak"] if r["of_peak"] is not None else r["of_copy"]) if rows else None
    summary = (f"worst {worst['backend']} {worst['kernel']}: {worst['gbs']} GB/s"
               + (f", {100 * worst['of_peak']:.1f}% of peak" if worst["of_peak"] is not None else
                  f", {100 * worst['of_copy']:.1f}% of copy") if worst else "no kernel ran: " + str(refused))
    return result(status, summary, "\n".join(md), numel=n, peak_gbs=peak and peak / 1e9, peak_source=source,
                  copy_gbs=copy_bps / 1e9, rows=rows, refused=refused)


def step_quant_bench(ctx, log) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import ratios
    raw = os.path.join(ctx["raw"], "quant_bench.json")
    select = ("test_lsq and (cpu or torch_ or floor)" if ctx["dry"]
              else "not cpu and not backward_only")
    cmd = [sys.executable, "-m", "pytest", "benchmarks/benchmark_quant.py", "-k", select, f"--benchmark-json={raw}",
           "--benchmark-min-rounds=3", f"--benchmark-max-time={ctx['sizes']['bench_time']}", "-q"]
    rc = run(cmd, log)
    if not os.path.exists(raw):
        return result("failed", f"pytest-benchmark wrote no results (rc {rc})")
    with open(raw) as fh:
        results = json.load(fh)
    groups: dict = {}
    for b in results["benchmarks"]:
        groups.setdefault(b["group"], {})[ratios.param_of(b)] = b["stats"]["median"]
    vs_torch = []
    for group, rows in groups.items():
        torch_row = next((r for r in ("torch_fake_quant", "torch_learnable_fake_quant") if r in rows), None)
        for impl in ("cuda", "triton", "cpu"):
            if torch_row and impl in rows:
                vs_torch.append(dict(group=group, impl=impl, speedup=round(rows[torch_row] / rows[impl], 3),
                                     against=torch_row))
    md = f"`python {shlex.join(cmd[1:])}`\n" + ratios.table(results, ["composition", "reference"]) + "\n\n" + "".join(
        f"- {v['group']}: {v['impl']} {v['speedup']}x faster than {v['against']}\n" for v in vs_torch)
    status = "ok" if rc == 0 and groups else "failed"
    return result(status, f"{len(results['benchmarks'])} benchmarks in {len(groups)} groups (rc {rc})", md,
                  groups=groups, vs_torch=vs_torch)


def step_block_bench(ctx, log) -> dict:
    import torch
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import benchmark_block as bb
    from expcuda.nn import epilogue
    sz = ctx["sizes"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernels = [k for k in (("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch"))
               if epilogue.kernel_unavailable(k) is None]
    kinds = ["expanded-fused", "bare-two-convs", "bare-stacked-conv", "expanded-reference", "lp-block",
             "fp-conv-bn-relu"]
    rows, ratios_ = [], []
    for shape in sz["block_shapes"]:
        for layout in sz["block_layouts"]:
            steps = {k: bb.make_step(shape, k, layout, device=device, batch=sz["batch"])[0] for k in kinds}
            for kernel in kernels:  # the fused block with each epilogue kernel
                steps[f"expanded-fused[{kernel}]"] = (lambda fn, k: lambda: _with_kernel(epilogue, k, fn))(
                    steps["expanded-fused"], kernel)
            c, hw = bb.SHAPES[shape]
            z = torch.randn(sz["batch"], 2 * c, hw, hw, device=device).to(memory_format=bb.LAYOUTS[layout])
            for kernel in kernels:  # the epilogue alone, forward + backward
                steps[f"epilogue[{kernel}]"] = _epilogue_step(epilogue, kernel, z, c)
            best = _interleaved(steps, sz["rounds"], device)
            for kind, s in best.items():
                rows.append(dict(shape=shape, layout=layout, kind=kind, ms=round(s * 1e3, 4)))
            two = best["bare-two-convs"]
            ratios_.append(dict(shape=shape, layout=layout, fused_over_two_convs=round(best["expanded-fused"] / two, 3),
                                reference_over_fused=round(best["expanded-reference"] / best["expanded-fused"], 3),
                                epilogue_over_stacked_conv={k: round(best[f"epilogue[{k}]"] / best["bare-stacked-conv"], 3)
                                                            for k in kernels}))
    md = [f"batch {sz['batch']}, best of {sz['rounds']} interleaved rounds (ms), training step (forward + backward); "
          f"`expanded-fused` picks the default epilogue kernel; cuDNN defaults (TF32 as torch sets it).\n",
          "| shape | layout | step | ms |", "|---|---|---|---:|"]
    md += [f"| {r['shape']} | {r['layout']} | {r['kind']} | {r['ms']} |" for r in rows]
    md += ["", "| shape | layout | fused / two bare convs | reference / fused | epilogue / stacked conv |",
           "|---|---|---:|---:|---|"]
    md += [f"| {r['shape']} | {r['layout']} | {r['fused_over_two_convs']}x | {r['reference_over_fused']}x | "
           + ", ".join(f"{k} {v}x" for k, v in r["epilogue_over_stacked_conv"].items()) + " |" for r in ratios_]
    worst = max(ratios_, key=lambda r: r["fused_over_two_convs"])
    return result("ok", f"fused / two bare convs: worst {worst['fused_over_two_convs']}x ({worst['shape']} "
                        f"{worst['layout']}); epilogue kernels {', '.join(kernels)}", "\n".join(md),
                  rows=rows, ratios=ratios_, kernels=kernels)


def _with_kernel(epilogue, kernel, fn):
    with epilogue.use_kernel(kernel):
        fn()


def _epilogue_step(epilogue, kernel, z, c_lp):
    import torch
    zz = z.detach().clone().requires_grad_(True)
    w = torch.rand(z.shape[1], device=z.device) + 0.5
    b = torch.randn(z.shape[1], device=z.device) * 0.1
    f = torch.tensor(0.5, device=z.device)
    grad = torch.randn(z.shape[0], c_lp, *z.shape[2:], device=z.device).to(memory_format=epilogue.layout(z))

    def run_():
        with epilogue.use_kernel(kernel):
            out, _, _ = epilogue.block_epilogue(zz, w, b, f, None, c_lp, 1e-5, 2, "add", "dorefa", 2, "clip",
                                                "identity")
            out.backward(grad)
    return run_


def _interleaved(steps: dict, rounds: int, device) -> dict:
    """Best wall time of each step over interleaved rounds (each step synchronized on a GPU)."""
    import torch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in steps.values():  # warm-up: cuDNN's algorithm choice, Triton's compilation
        fn()
        fn()
    sync()
    best = {k: float("inf") for k in steps}
    for _ in range(rounds):
        for kind, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            sync()
            best[kind] = min(best[kind], time.perf_counter() - t0)
    return best


def step_train(ctx, log) -> dict:
    import torch
    from expcuda.data import idx
    sz = ctx["sizes"]
    raw = os.path.join(ctx["raw"], "train.json")
    synthetic = ctx["dry"] or not os.path.isdir(idx.DEBIAN_DIR)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cmd = [sys.executable, "benchmarks/benchmark_train.py", "--device", device, "--steps", str(sz["train_steps"]),
           "--warmup", str(sz["train_warmup"]), "--no-rss", "--json", raw] + (["--synthetic"] if synthetic else [])
    rc = run(cmd, log, dict(os.environ, PYTHONPATH=ROOT))
    if rc != 0 or not os.path.exists(raw):
        return result("failed", f"benchmark_train.py failed (rc {rc})")
    with open(raw) as fh:
        got = json.load(fh)
    r = got["results"]
    fp = r["fp"]["images_per_s"]
    rows = {mode: dict(images_per_s=round(v["images_per_s"], 1), vs_fp=round(v["images_per_s"] / fp, 3))
            for mode, v in r.items()}
    md = (f"`python {shlex.join(cmd[1:])}` ({got['data']}; {got['device']}; {r['fp']['steps']} timed steps of 128)\n\n"
          "| network | images/s | vs full precision |\n|---|---:|---:|\n"
          + "".join(f"| {name} | {rows[mode]['images_per_s']} | {rows[mode]['vs_fp']}x |\n"
                    for mode, name in (("fp", "full precision"), ("lp", "LP baseline"), ("exp", "EXP-Net"))))
    return result("ok", f"EXP-Net {rows['exp']['vs_fp']}x, LP baseline {rows['lp']['vs_fp']}x of full precision "
                        f"({rows['fp']['images_per_s']} images/s)", md, rows=rows, data=got["data"])


STEP_FUNCS = {"environment": step_environment, "build": step_build, "selftest": step_selftest, "tests": step_tests,
              "bandwidth": step_bandwidth, "quant_bench": step_quant_bench, "block_bench": step_block_bench,
              "train": step_train}


# --------------------------------------------------------------------------- targets and the report

def targets(steps: dict) -> list[dict]:
    """The issue's three targets read off the steps' data: measured value, met or missed (None: not measured)."""
    out = []
    bw = steps.get("bandwidth", {}).get("data", {}).get("rows") or []
    fracs = [r["of_peak"] for r in bw if r["of_peak"] is not None]
    worst = min((r for r in bw if r["of_peak"] is not None), key=lambda r: r["of_peak"], default=None)
    out.append(dict(target=f"quantizer kernels >= {TARGET_BANDWIDTH:.0%} of peak bandwidth",
                    value=worst and worst["of_peak"],
                    measured=(f"worst {worst['backend']} {worst['kernel']} {worst['of_peak']:.1%} "
                              f"(best {max(fracs):.1%})" if worst else "not measured (no peak or no kernel)"),
                    met=None if worst is None else worst["of_peak"] >= TARGET_BANDWIDTH))
    ratios_ = steps.get("block_bench", {}).get("data", {}).get("ratios") or []
    wr = max(ratios_, key=lambda r: r["fused_over_two_convs"], default=None)
    out.append(dict(target=f"fused expanded block <= {TARGET_BLOCK}x its two bare convolutions",
                    value=wr and wr["fused_over_two_convs"],
                    measured=(f"worst {wr['fused_over_two_convs']}x ({wr['shape']} {wr['layout']}); all: "
                              + ", ".join(f"{r['fused_over_two_convs']}x" for r in ratios_)) if wr else "not measured",
                    met=None if wr is None else wr["fused_over_two_convs"] <= TARGET_BLOCK))
    rows = steps.get("train", {}).get("data", {}).get("rows")
    out.append(dict(target=f"EXP-Net training >= {TARGET_TRAIN}x of full precision",
                    value=rows and rows["exp"]["vs_fp"],
                    measured=f"{rows['exp']['vs_fp']}x" if rows else "not measured",
                    met=None if not rows else rows["exp"]["vs_fp"] >= TARGET_TRAIN))
    return out


def render(report: dict) -> str:
    verdict = {True: "met", False: "missed", None: "not measured"}
    lines = ["# expcuda GPU report", "",
             f"{report['date']} UTC; {report['device']}; `{report['command']}`; budget {report['budget_s']} s, "
             f"used {report['used_s']} s.", ""]
    if report["dry_run"]:
        lines += ["**Dry run on the CPU**: the same steps with the CPU backends and tiny sizes; its numbers are not "
                  "GPU figures.", ""]
    lines += ["## Targets", "", "| target | measured | result |", "|---|---|---|"]
    if report["dry_run"]:
        verdict = {k: v + " (dry run)" for k, v in verdict.items()}
    lines += [f"| {t['target']} | {t['measured']} | {verdict[t['met']]} |" for t in report["targets"]]
    lines += ["", "## Steps", "", "| step | status | seconds | summary |", "|---|---|---:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['summary']} |" for s in report["steps"]]
    failed = [s["name"] for s in report["steps"] if s["status"] != "ok"]
    lines += ["", f"Failed or not run: {', '.join(failed)}." if failed else "Every step ran and passed.", ""]
    for s in report["steps"]:
        lines += [f"## {s['title']}", "", f"{s['status']} in {s['seconds']} s (timeout {s['timeout_s']} s): "
                  f"{s['summary']}", ""]
        if s.get("md"):
            lines += [s["md"], ""]
        if s["status"] != "ok" and s.get("tail"):
            lines += ["Last lines of its output:", "", "```", s["tail"], "```", ""]
    return "\n".join(lines)


def write_report(out_dir: str, report: dict) -> None:
    report["targets"] = targets({s["name"]: s for s in report["steps"]})
    for name, text in (("gpu_report.json", json.dumps(report, indent=1, default=str)),
                       ("gpu_report.md", render(report))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def run_step(step: Step, timeout: float, ctx: dict, scratch: str, log_path: str) -> dict:
    """One step in a child process of its own session: killed with its children at the timeout."""
    res_path = os.path.join(scratch, step.name + ".json")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if ctx["dry"] and step.name == "tests":
        env["TRITON_INTERPRET"] = "1"  # the dry run runs its Triton tests in the interpreter
    cmd = [sys.executable, os.path.abspath(__file__), "--child", step.name, "--ctx", json.dumps(ctx),
           "--result", res_path]
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n===== {step.name} (timeout {timeout:.0f} s) =====\n")
        log.flush()
        start = log.tell()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    seconds = round(time.perf_counter() - t0, 1)
    with open(log_path) as fh:
        fh.seek(start)
        tail = "\n".join(fh.read().splitlines()[-30:])
    if timed_out:
        res = result("timeout", f"killed after its {timeout:.0f} s timeout")
    elif os.path.exists(res_path):
        with open(res_path) as fh:
            res = json.load(fh)
    else:
        res = result("failed", f"the step crashed (rc {rc}) before writing its result")
    return {"name": step.name, "title": step.title, "seconds": seconds, "timeout_s": round(timeout), "tail": tail,
            **res}


def child(name: str, ctx: dict, res_path: str) -> int:
    """Run one step in this (child) process; its stdout is the step's log."""
    try:
        res = STEP_FUNCS[name](ctx, sys.stdout)
    except Exception as exc:  # noqa: BLE001 - the report says which step failed and why
        import traceback
        traceback.print_exc()
        res = result("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
    with open(res_path, "w") as fh:
        json.dump(res, fh, default=str)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes (CI)")
    p.add_argument("--out", help="folder for gpu_report.md/.json and the log (default: $OUT, else ./gpu_report)")
    p.add_argument("--budget", type=float, default=470, help="seconds for all steps together (default 470)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ctx", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, json.loads(args.ctx), args.result)
    if args.budget <= 0:
        p.error(f"--budget must be a positive number of seconds, got {args.budget}")
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch: nothing to measure (--dry-run rehearses the steps "
              "on the CPU)")
        return 0
    out_dir = os.path.abspath(args.out or os.environ.get("OUT") or "gpu_report")
    os.makedirs(os.path.join(out_dir, "raw"), exist_ok=True)
    log_path = os.path.join(out_dir, "gpu_check.log")
    open(log_path, "w").close()
    ctx = {"dry": args.dry_run, "sizes": sizes(args.dry_run), "raw": os.path.join(out_dir, "raw")}
    device = ("dry run on the CPU (no GPU)" if args.dry_run and not torch.cuda.is_available()
              else torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
    report = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "device": device,
              "command": "bash benchmarks/gpu_check.sh" + (" --dry-run" if args.dry_run else ""),
              "budget_s": args.budget, "used_s": 0, "steps": []}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for i, step in enumerate(STEPS):
            left = args.budget - (time.perf_counter() - t_start)
            timeout = min(step.limit_s, left - sum(s.floor_s for s in STEPS[i + 1:]))
            if timeout < step.floor_s:
                res = {"name": step.name, "title": step.title, "seconds": 0, "timeout_s": 0,
                       **result("skipped", f"not run: {left:.0f} s of the budget left")}
            else:
                print(f"gpu_check: {step.name} (timeout {timeout:.0f} s) ...", flush=True)
                res = run_step(step, timeout, ctx, scratch, log_path)
            print(f"gpu_check: {step.name}: {res['status']} in {res['seconds']} s: {res['summary']}", flush=True)
            report["steps"].append(res)
            report["used_s"] = round(time.perf_counter() - t_start, 1)
            write_report(out_dir, report)
    for t in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"gpu_check: target {t['target']}: {t['measured']} -> {verdict}"
              + (" (dry run: CPU numbers at tiny sizes, not the GPU's)" if args.dry_run else ""))
    failed = [s["name"] for s in report["steps"] if s["status"] != "ok"]
    print(f"gpu_check: report in {out_dir}/gpu_report.md and .json; "
          + (f"failed or not run: {', '.join(failed)}" if failed else "every step passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
