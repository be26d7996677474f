"""The asv suite loads and validates (``asv check``) in this environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_asv_check_finds_no_problems():
    pytest.importorskip("asv")
    out = subprocess.run([sys.executable, "-m", "asv", "check", "-E", f"existing:{sys.executable}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No problems found" in out.stdout


def test_asv_config_names_results_by_machine_and_spawns():
    import json

    conf = json.loads((ROOT / "asv.conf.json").read_text())
    assert conf["launch_method"] == "spawn" and conf["environment_type"] == "virtualenv"
    # a virtualenv per machine: torch for the machine (CUDA build with a GPU), then the commit's
    # wheel with the bench extra, reinstalled for each commit without touching its dependencies
    assert "tools/install_torch.py" in conf["install_command"][0]
    assert conf["install_command"][1].endswith("{wheel_file}[bench]")
    assert "--force-reinstall --no-deps {wheel_file}" in conf["install_command"][2]
    assert "--no-deps" in conf["build_command"][0]  # one wheel in the build cache, not its dependencies
    assert conf["results_dir"] == "reports/asv/results"
