"""Record asv history for several commits on a machine with no internet and a preinstalled torch.

asv cannot build a virtualenv per commit there, so for each commit this script checks it out in a
git worktree and runs ``asv run -E existing --set-commit-hash <sha>`` in the running Python with
that worktree first on the benchmarks' path (asv's ``ASV_PYTHONPATH``): the environment is left as
it was, nothing is installed. The benchmark suite is the current checkout's ``benchmarks/``; the
library measured is each commit's. Results land in ``reports/asv/results/<gpu-model>/``, one
folder per GPU model, so histories never mix.

    python tools/asv_history.py                 # the last 3 commits of main
    python tools/asv_history.py SHA1 SHA2 ...   # these commits
    python tools/asv_history.py --bench MLPClaims --bench "track_time_ms\\('rampde-bf16'" --quick

A ``--bench`` expression matches ``Class.method(param, ...)`` as asv writes it, e.g.
``MLPForwardBackward.track_time_ms('rampde-bf16', 2048, 64)``, so it can pick single cells.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_name() -> str:
    """The GPU model as a slug (``nvidia-h100-80gb-hbm3``), or ``cpu``: the same slug as the sweep's folders."""
    sys.path.insert(0, str(ROOT))
    try:
        from rampde.bench.measure import gpu_name, gpu_slug, resolve_device
    finally:
        sys.path.pop(0)
    return gpu_slug(gpu_name(resolve_device("auto")))


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def benchmark_path(tree: Path) -> str:
    """``ASV_PYTHONPATH`` for one commit: its worktree, then what ``PYTHONPATH`` held (wheels put
    there, say) except this checkout, which would shadow the commit's library."""
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != ROOT]
    return os.pathsep.join([str(tree), *kept])


def stable_python() -> Path:
    """A wrapper of this interpreter at a fixed path: asv names an existing environment after its
    interpreter's path, so results recorded on any machine carry the same, neutral name
    (``existing-py_tmp_rampde-asv_python``) instead of where Python is installed there."""
    wrapper = Path(tempfile.gettempdir()) / "rampde-asv" / "python"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commits", nargs="*", help="commits to record (default: the last --count of main)")
    parser.add_argument("--count", type=int, default=3, help="how many commits of main when none are given")
    parser.add_argument("--bench", action="append", help="asv --bench regular expression (repeatable)")
    parser.add_argument("--quick", action="store_true", help="asv --quick: one run per benchmark")
    parser.add_argument("--machine", help="asv machine name (default: this GPU model's slug, or cpu; naming it "
                                          "spares a torch import and a CUDA context)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")

    commits = args.commits or subprocess.run(
        ["git", "rev-list", f"--max-count={args.count}", "main"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    machine = args.machine or machine_name()
    python = stable_python()
    run([sys.executable, "-m", "asv", "machine", "--yes", "--machine", machine], cwd=ROOT)
    with tempfile.TemporaryDirectory(prefix="rampde-asv-") as tmp:
        for sha in commits:
            tree = Path(tmp) / sha[:12]
            run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT)
            try:
                cmd = [sys.executable, "-m", "asv", "run", "-E", f"existing:{python}", "--set-commit-hash", sha,
                       "--machine", machine, "--launch-method", "spawn", "--show-stderr"]
                for expression in args.bench or []:
                    cmd += ["--bench", expression]
                if args.quick:
                    cmd.append("--quick")
                run(cmd, cwd=ROOT, env=dict(os.environ, ASV_PYTHONPATH=benchmark_path(tree)))
            finally:
                run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    print(f"results in {ROOT / 'reports/asv/results' / machine}; `asv publish` builds the site")
    return 0


if __name__ == "__main__":
    sys.exit(main())
