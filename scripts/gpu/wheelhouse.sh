#!/usr/bin/env bash
# Wheels for scripts/gpu/check.sh on a GPU machine without network: what the trainer and the tests import
# beyond torch, Triton and numpy (which the GPU machine's CUDA torch brings), for that machine's Python, at
# the versions this project's tests ran with.
#   bash scripts/gpu/wheelhouse.sh build/wheels [PYTHON_VERSION]      # default 3.11; ~40 MB
# torchtitan and what its models import (bench/peers.py, pinned there too) are the peer of bench/gpu_train.py.
# DeepSpeed and antlr4 (for omegaconf) are sdists: built here into pure-Python wheels (DeepSpeed compiles its
# ops on first use there).
set -euo pipefail
DIR=${1:-build/wheels}
PYV=${2:-3.11}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
"$PY" -m pip download -q -d "$DIR" --only-binary=:all: --python-version "$PYV" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --no-deps \
    hydra-core==1.3.8 omegaconf==2.3.1 PyYAML==6.0.4 tokenizers==0.23.3 safetensors==0.8.0 tqdm==4.70.1 \
    packaging==26.4 hjson==3.1.0 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    msgpack==1.2.4 nvidia-ml-py==13.615.71 einops==0.8.2 matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 \
    fonttools==4.69.1 kiwisolver==1.5.1 pyparsing==3.3.3 python-dateutil==4.0.0 six==1.17.0 pillow==13.0.0 \
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 \
    torchtitan==0.3.0 tyro==1.0.17 docstring-parser==0.18.0 spmd_types==0.2.3 torch_checkpointing==0.1.1 \
    torchdata==0.11.0
du -sh "$DIR"
