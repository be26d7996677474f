"""rampde.bench.environment on the CPU: the environment columns, the commit without git, the device
and the GPU slug."""

from __future__ import annotations

import socket

import pytest
import torch

from rampde.bench import environment

CPU = torch.device("cpu")
ENV_COLUMNS = ["gpu", "device", "compute_capability", "driver", "cuda", "torch", "torchdiffeq", "rampde", "tf32",
               "cudnn_tf32", "cudnn_benchmark", "commit"]


def test_environment_on_the_cpu():
    import rampde
    import torchdiffeq

    env = environment.environment(CPU)
    assert list(env) == ENV_COLUMNS
    assert env["gpu"] == "cpu" and env["device"] == "cpu"
    assert (env["compute_capability"], env["driver"]) == ("", "")
    assert env["torch"] == torch.__version__ and env["rampde"] == rampde.__version__
    assert env["torchdiffeq"] == torchdiffeq.__version__
    assert env["commit"] == "" or len(env["commit"]) == 40
    assert socket.gethostname() not in {str(v) for v in env.values()}, "no host name"


def test_commit_tolerates_no_git(tmp_path, monkeypatch):
    assert environment.git_commit(tmp_path) == "", "not a checkout"

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(environment.subprocess, "run", no_git)
    assert environment.git_commit() == ""
    monkeypatch.setenv("RAMPDE_COMMIT", "abc123")
    assert environment.environment(CPU)["commit"] == "abc123"


def test_resolve_device_and_gpu_slug():
    assert environment.resolve_device("cpu") == CPU
    assert environment.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="is not a torch device"):
        environment.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA was asked for"):
            environment.resolve_device("cuda")
    assert environment.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert environment.gpu_slug("cpu") == "cpu"
