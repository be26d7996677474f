"""Record asv history for several commits on a machine with no internet and a preinstalled torch.

asv cannot build a virtualenv per commit there, so for each commit this script checks it out in a
git worktree, installs it into the running Python without dependencies (``pip install --no-deps
-e``), and records it with ``asv run -E existing --set-commit-hash``. The benchmark suite is the
current checkout's ``benchmarks/``; the library measured is each commit's. Results land in
``reports/asv/results/<gpu-model>/``, one folder per GPU model, so histories never mix.

    python tools/asv_history.py                 # the last 3 commits of main
    python tools/asv_history.py SHA1 SHA2 ...   # these commits
    python tools/asv_history.py --bench MLPClaims --quick
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_name() -> str:
    """The GPU model as a slug (``nvidia-h100-80gb-hbm3``), or ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return "-".join("".join(ch if ch.isalnum() else " " for ch in name).split())


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commits", nargs="*", help="commits to record (default: the last --count of main)")
    parser.add_argument("--count", type=int, default=3, help="how many commits of main when none are given")
    parser.add_argument("--bench", help="asv --bench regular expression")
    parser.add_argument("--quick", action="store_true", help="asv --quick: one run per benchmark")
    args = parser.parse_args(argv)

    commits = args.commits or subprocess.run(
        ["git", "rev-list", f"--max-count={args.count}", "main"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    machine = machine_name()
    run([sys.executable, "-m", "asv", "machine", "--yes", "--machine", machine], cwd=ROOT)
    with tempfile.TemporaryDirectory(prefix="rampde-asv-") as tmp:
        for sha in commits:
            tree = Path(tmp) / sha[:12]
            run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT)
            try:
                run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e",
                     str(tree)])
                cmd = [sys.executable, "-m", "asv", "run", "-E", "existing", "--set-commit-hash", sha,
                       "--machine", machine, "--launch-method", "spawn", "--show-stderr"]
                if args.bench:
                    cmd += ["--bench", args.bench]
                if args.quick:
                    cmd.append("--quick")
                run(cmd, cwd=ROOT)
            finally:
                run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    # leave the current checkout installed again
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", str(ROOT)])
    print(f"results in {ROOT / 'reports/asv/results' / machine}; `asv publish` builds the site")
    return 0


if __name__ == "__main__":
    sys.exit(main())
