#!/usr/bin/env bash
# Download, into .whl/, the wheels a GPU box without internet needs for tools/gpu_campaign.sh
# beyond what a CUDA PyTorch image usually holds (torch, torchdiffeq, pandas, rich, pytest-benchmark,
# nvidia-ml-py, scikit-learn): plotly for the dashboard, asv and its requirements for the history.
#
#   tools/fetch_gpu_wheels.sh [PYTHON_VERSION]          default 3.12
#
# Versions are those installed in this checkout's .venv (the ones the tests ran with), else the
# newest. On the GPU box, before the campaign:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -eu
pyver=${1:-3.12}
packages="asv asv_runner json5 virtualenv distlib platformdirs importlib_metadata Pympler plotly narwhals"
venv_pip=.venv/bin/pip
mkdir -p .whl
for name in $packages; do
    spec=$name
    if [ -x "$venv_pip" ]; then
        version=$("$venv_pip" show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        [ -n "$version" ] && spec="$name==$version"
    fi
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec"
    echo "fetched $spec"
done
ls -1 .whl
