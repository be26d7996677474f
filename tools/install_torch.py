"""Install torch into the running environment the right way for this machine.

- A torch that is already importable is kept (a GPU box's preinstalled CUDA build, say).
- With an NVIDIA GPU, the plain ``torch`` requirement: pip's default build, CUDA-enabled.
- Without one, ``torch==2.13.0``, which resolves to the CPU build where one is provided locally.
``RAMPDE_TORCH_SPEC`` overrides the requirement (e.g. a CPU index through ``PIP_INDEX_URL``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

CPU_SPEC = "torch==2.13.0"
GPU_SPEC = "torch"


def has_nvidia_gpu() -> bool:
    if os.path.exists("/dev/nvidia0"):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    return subprocess.run([smi, "-L"], capture_output=True, check=False).returncode == 0


def main() -> int:
    try:
        import torch
    except ImportError:
        pass
    else:
        print(f"install_torch: keeping the installed torch {torch.__version__}")
        return 0
    spec = os.environ.get("RAMPDE_TORCH_SPEC") or (GPU_SPEC if has_nvidia_gpu() else CPU_SPEC)
    print(f"install_torch: installing {spec}")
    return subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", spec])


if __name__ == "__main__":
    sys.exit(main())
