#!/usr/bin/env bash
# The README's commands in a fresh `python -m venv` (its own old pip and setuptools, no wheel, no
# torch): a clone of this checkout, set up by .ci/setup.sh alone, then a quick part of the tests.
# CUDA kernels are left out here (EXPCUDA_NO_CUDA=1) only to keep CI short: the machine's own Python
# compiles them in the main CI step.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git clone -q . "$tmp/src"
python -m venv "$tmp/venv"
export PATH="$tmp/venv/bin:$PATH"
cd "$tmp/src"
EXPCUDA_NO_CUDA=1 bash .ci/setup.sh
python -m pytest tests/test_quant.py tests/test_no_extension.py -x
expcuda --help >/dev/null
echo "fresh venv: setup and tests passed ($(python -m pip --version | cut -d' ' -f1-2))"
