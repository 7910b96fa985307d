#!/usr/bin/env bash
# Idempotent set-up on a fresh machine of this project's kind: Fashion-MNIST from Debian,
# torch 2.14.1 (the CUDA 13 build), the Python dependencies, and the compiled extension
# (C++ CPU kernels always; CUDA kernels when nvcc is found). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist as root)" >&2
    fi
fi

python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.14.1")' 2>/dev/null \
    || python -m pip install -q torch==2.14.1
python -m pip install -q numpy tqdm matplotlib safetensors scipy pytest pytest-benchmark pillow onnx onnxruntime

# the build requirements of pyproject.toml: a build without isolation uses what is installed
python -m pip install -q "setuptools>=64" wheel ninja
export MAX_JOBS="${MAX_JOBS:-2}"
python -m pip install -q --no-build-isolation -e .
python -m expcuda.info
