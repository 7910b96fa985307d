"""GPU and compiled-kernel tests skip with a reason; none vanish at collection; the run counts GPU skips."""

import re
import subprocess
import sys

import pytest
import torch

RUN = r"""
import sys
if sys.argv[1] == "no-ext":
    sys.modules["expcuda._C"] = None          # as if the extension were never built
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


def pytest_in_child(ext: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", RUN, ext, "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 5), done.stdout + done.stderr
    return done.stdout


def collected(out: str) -> int:
    counts = [int(n) for n in re.findall(r"^tests/test_block\.py: (\d+)$", out, re.M)]
    assert len(counts) == 1, out
    return counts[0]


def test_block_tests_do_not_vanish_without_the_extension():
    with_ext = collected(pytest_in_child("ext", "--collect-only", "-q", "tests/test_block.py"))
    without = collected(pytest_in_child("no-ext", "--collect-only", "-q", "tests/test_block.py"))
    assert with_ext == without > 0
    out = pytest_in_child("no-ext", "-rs", "tests/test_block.py", "-k", "test_fused_geometry and cpp")
    assert "cpp epilogue unavailable" in out and "passed" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the skips of a machine without a GPU")
def test_run_ends_with_the_gpu_skip_count():
    out = pytest_in_child("ext", "tests/test_block_cuda.py")
    match = re.search(r"(\d+) tests skipped for want of a GPU", out)
    assert match and int(match.group(1)) > 0, out
    assert f"{match.group(1)} skipped" in out
