"""Every GPU measurement the benchmark issues need, prepared here and run there in one bounded call.

    python tools/gpu_campaign.py prepare                 # here (internet): .campaign/ with wheels and history
    python tools/gpu_campaign.py plan [--device cuda]    # the steps, their time limits and commands
    python tools/gpu_campaign.py run --pack FILE.tgz     # there: the steps, packed after each one

A GPU box without internet, with a CUDA PyTorch (and torchdiffeq, pandas, rich, scikit-learn,
pytest-benchmark, nvidia-ml-py) installed, gets this checkout and ``.campaign/``: ``prepare``
downloads the wheels of asv and of what it needs beyond such an image, and bundles the git history
(asv dates each commit from it; a copy of the tree may come without ``.git``). ``run`` installs the
wheels into ``.campaign/site`` (nothing else is changed), restores ``.git`` from the bundle where it
is missing, then runs the steps in order; a step that needs a module the box cannot import is
skipped. The budget (``--budget``) counts from the start, setup included; each step is limited to
its share of it and to what is left of it; a step over its limit gets SIGINT (sweeps, the ablation
and training keep what they finished, and a later run resumes the sweeps), then SIGKILL. After every
step, the files under ``reports/`` that the campaign made or changed, the steps' logs and
``campaign.json`` (the modules' versions, each step's limit, time and exit codes) are packed into
``--pack`` atomically, so that a call cut short still returns what was finished. Unpack at the
repository root: ``tar xzf FILE.tgz``.

The steps (``--steps`` picks some, in this order): ``perf`` the perf suite (the performance targets' cells);
``train-digits`` and ``train-cnf`` the training parity runs, the competitors of a task side by side
on the one GPU (one process each, so wall times include that sharing; the metrics do not depend on
it); ``pytest`` the CUDA-graph steps' tests, then pytest-benchmark at MLP width 256 for every
competitor and width 2048 for the main ones; ``asv`` asv history of the last three commits of
main, a few cells each; ``ablate`` and ``profile`` where the time goes; ``gemm`` a Linear's GEMMs
with an inner dimension of width and width + 1 (``rampde.bench.gemm_probe``: what the MLP field's
shape costs); ``quick`` the quick suite in the time left. On a CPU (``--device cpu``) the same
steps run at CPU sizes: a rehearsal of the pipeline, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # rampde.bench.results' atomic writers, imported where used (they bring torch)
STAGE_NAME = ".campaign"
# asv and what it needs that a CUDA PyTorch image lacks; IMAGE_PACKAGES are those such an image
# holds, UNUSED what asv asks for but an existing environment never imports (its virtualenv plugin)
WHEEL_PACKAGES = ("asv", "asv_runner", "json5", "importlib_metadata", "lazy_importer", "Pympler")
IMAGE_PACKAGES = ("build", "packaging", "pyyaml", "tabulate", "zipp")
UNUSED = ("virtualenv",)
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
DEFAULT_BUDGET_S = 540.0  # one 10-minute call, with room to start, pack and return
PACK_RESERVE_S = 10.0  # kept back from every step's limit for the stop and the pack
GRACE_S = 20.0  # after SIGINT, before SIGKILL
MIN_STEP_S = 15.0  # a step that would get less is skipped
# the competitors each comparison needs
TRAIN_COMPETITORS = ("torchdiffeq-fp32", "autocast-fp16", "autocast-bf16", "rampde-fp16", "rampde-bf16")
MAIN_COMPETITORS = ("torchdiffeq-fp32", "torchdiffeq-tf32", "autocast-fp16", "autocast-bf16", "rampde-fp16",
                    "rampde-bf16")
# asv spawns one process per benchmark and cell (a torch import and a CUDA context each, several
# seconds on a GPU box): three per commit, so that three commits fit the step's share. The
# baseline's time is the machine's control line; its memory does not change with our commits.
ASV_TIMED = ("torchdiffeq-fp32", "rampde-bf16")
ASV_PEAK = ("rampde-bf16",)
# (width, steps) of the cells pytest-benchmark and asv run, per device type
PYTEST_WIDTHS = {"cuda": (256, 2048), "cpu": (8, 8)}
ASV_CELL = {"cuda": (1024, 64), "cpu": (16, 4)}
CNF_EPOCHS = 10  # a fixed number of iterations: 10 x 64 Adam steps
# import name -> distribution: what the steps import, looked up on the box before they run
MODULES = {"torch": "torch", "torchdiffeq": "torchdiffeq", "pandas": "pandas", "rich": "rich",
           "sklearn": "scikit-learn", "pytest_benchmark": "pytest-benchmark", "asv": "asv",
           "pynvml": "nvidia-ml-py", "triton": "triton"}
BENCH_NEEDS = ("torch", "torchdiffeq", "pandas", "rich")  # every rampde.bench command


class Stage:
    """The files a campaign carries to the GPU box and makes there, under ``<root>/.campaign``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / STAGE_NAME
        self.wheels = self.dir / "wheels"
        self.site = self.dir / "site"
        self.bundle = self.dir / "repo.bundle"
        self.commit_file = self.dir / "commit"
        self.logs = self.dir / "logs"
        self.training = self.dir / "training"
        self.summary = self.dir / "campaign.json"


@dataclass(frozen=True)
class Context:
    """Where a campaign runs: the interpreter, the device type and the GPU model's folder name."""

    python: str
    device: str  # "cuda" or "cpu"
    gpu: str  # rampde.bench.measure.gpu_slug of the GPU model, "cpu" on the CPU
    root: Path = ROOT

    @property
    def reports(self) -> str:
        return f"reports/{self.gpu}"

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"


@dataclass(frozen=True)
class Step:
    """One measurement: its commands, side by side or one after the other (``sequential``), within
    ``share`` seconds (None: all that is left)."""

    name: str
    share: float | None
    commands: Callable[[Context], list[list[str]]]
    after: Callable[[Context], str] | None = None  # run once the commands end; returns a line for the log
    sequential: bool = False
    needs: tuple[str, ...] = BENCH_NEEDS  # modules (MODULES' keys) the commands import


@dataclass
class StepRecord:
    name: str
    limit_s: float
    elapsed_s: float = 0.0
    exit_codes: list[int | None] = field(default_factory=list)
    stopped: bool = False  # hit its limit
    skipped: str = ""
    after: str = ""


# ----------------------------------------------------------------------------- the steps


def _bench(ctx: Context, *args: str) -> list[str]:
    return [ctx.python, "-m", "rampde.bench", *args, "--device", ctx.device]


def _train_commands(task: str) -> Callable[[Context], list[list[str]]]:
    def commands(ctx: Context) -> list[list[str]]:
        if ctx.on_gpu:
            size = ["--epochs", str(CNF_EPOCHS)] if task == "cnf" else []
        else:
            size = ["--size", "tiny", "--epochs", "2"]
        stage = Stage(ctx.root)
        return [_bench(ctx, "train", "--task", task, "--competitors", name,
                       "--out", str((stage.training / f"{task}-{name}").relative_to(ctx.root)), *size)
                for name in TRAIN_COMPETITORS]
    return commands


def pytest_selection(device: str) -> str:
    """The ``-k`` expression: every competitor at the small width, the main ones at the large one.
    ``-k`` matches substrings, so each main one is named with its cell (``rampde-bf16-mlp-w2048-``),
    which ``rampde-bf16-fast-…`` and ``rampde-bf16-graph-…`` do not contain."""
    small, large = PYTEST_WIDTHS[device]
    if small == large:
        return f"mlp-w{small}-"
    return " or ".join([f"mlp-w{small}-", *(f"{name}-mlp-w{large}-" for name in MAIN_COMPETITORS)])


def asv_selection(device: str) -> list[str]:
    """asv ``--bench`` expressions: time of ``ASV_TIMED``, allocator peak of ``ASV_PEAK``, at one cell."""
    width, steps = ASV_CELL[device]

    def cells(method: str, names: Sequence[str]) -> str:
        return rf"MLPForwardBackward\.{method}\('({'|'.join(names)})', {width}, {steps}\)"

    return [cells("track_time_ms", ASV_TIMED), cells("track_peak_alloc_bytes", ASV_PEAK)]


def _pytest(ctx: Context) -> list[list[str]]:
    """The CUDA-graph steps checked against the plain ones on the device (a JUnit report kept),
    then the benchmarks."""
    pytest = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    graphs = pytest + ["tests/test_step_graphs.py", f"--junitxml={ctx.reports}/step-graphs-junit.xml"]
    cmd = pytest + ["tests/benchmarks", "-k", pytest_selection(ctx.device)]
    if ctx.on_gpu:
        return [graphs, cmd + ["--benchmark-only", f"--benchmark-json={ctx.reports}/pytest-benchmark.json"]]
    return [graphs, cmd + ["--benchmark-disable"]]  # the CPU sizes only check that the suite runs


def _asv(ctx: Context) -> list[list[str]]:
    cmd = [ctx.python, "tools/asv_history.py", "--count", "3", "--quick", "--machine", ctx.gpu]
    for expression in asv_selection(ctx.device):
        cmd += ["--bench", expression]
    return [cmd]


def merge_training(ctx: Context) -> str:
    """Join the side-by-side runs' ``training.csv`` files into ``reports/training/<gpu>/training.csv``
    (with the rows already there; a run's new rows replace its old ones)."""
    import pandas as pd

    from rampde.bench.results import write_csv_atomic

    parts = sorted(Stage(ctx.root).training.glob("*/training.csv"))
    if not parts:
        return "no training results to merge"
    target = ctx.root / "reports" / "training" / ctx.gpu / "training.csv"
    frames = ([pd.read_csv(target)] if target.exists() else []) + [pd.read_csv(p) for p in parts]
    merged = (pd.concat(frames, ignore_index=True)
              .drop_duplicates(["task", "competitor", "seed", "epoch"], keep="last")
              .sort_values(["task", "competitor", "seed", "epoch"]))
    write_csv_atomic(merged, target)
    return f"{len(merged)} training rows in {target.relative_to(ctx.root)}"


def _perf(ctx: Context) -> list[list[str]]:
    """The perf suite, its two headline cells first (the sweep orders cells small to large, and a
    step cut short must not lose those), then the rest, each command resuming past the cells done.
    The CUDA-graph competitors come last, in a process of their own: a capture that fails on the
    device can leave the process unable to allocate as before, which must spoil no other cell."""
    from rampde.bench.suites import PERF_COMPETITORS

    suite = ["run", "--suite", "perf", "--out", ctx.reports]
    if not ctx.on_gpu:
        return [_bench(ctx, *suite)]
    plain = ["--competitors", *[c for c in PERF_COMPETITORS if not c.endswith("-graph")]]
    graphs = ["--competitors", *[c for c in PERF_COMPETITORS if c.endswith("-graph")]]
    return [_bench(ctx, *suite, *plain, "--workloads", "mlp", "--widths", "2048", "--steps", "64"),
            _bench(ctx, *suite, *plain, "--workloads", "conv", "--widths", "128", "--steps", "64"),
            _bench(ctx, *suite, *plain),
            _bench(ctx, *suite, *graphs)]


STEPS: tuple[Step, ...] = (
    Step("perf", 150, _perf, sequential=True),
    Step("train-digits", 35, _train_commands("digits"), after=merge_training, needs=BENCH_NEEDS + ("sklearn",)),
    Step("train-cnf", 60, _train_commands("cnf"), after=merge_training),
    Step("pytest", 55, _pytest, sequential=True, needs=BENCH_NEEDS + ("pytest_benchmark",)),
    Step("asv", 90, _asv, needs=BENCH_NEEDS + ("asv",)),
    Step("ablate", 70, lambda c: [[c.python, "-m", "rampde.bench.profiling", "ablate", "--out", f"{c.reports}/perf",
                                   "--device", c.device]]),
    Step("profile", 30, lambda c: [[c.python, "-m", "rampde.bench.profiling", "profile", "--out",
                                    f"{c.reports}/perf", "--device", c.device]]),
    Step("gemm", 20, lambda c: [[c.python, "-m", "rampde.bench.profiling", "gemm", "--out", f"{c.reports}/perf",
                                 "--device", c.device]]),
    Step("quick", None, lambda c: [_bench(c, "run", "--suite", "quick", "--out", c.reports)]),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def select_steps(names: Sequence[str] | None) -> list[Step]:
    """The named steps in campaign order; ``ValueError`` naming an unknown one."""
    if not names:
        return list(STEPS)
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}; known: {', '.join(STEP_NAMES)}")
    return [s for s in STEPS if s.name in names]


def step_limit(share: float | None, left_s: float) -> float:
    """Seconds a step may run: its share, and never past the budget less the pack's reserve."""
    room = left_s - PACK_RESERVE_S
    return max(0.0, room if share is None else min(share, room))


# ----------------------------------------------------------------------------- running


def _say(message: str) -> None:
    print(f"== {time.strftime('%H:%M:%S')} {message}", flush=True)


def _session_members(sid: int) -> list[int]:
    """Processes of the session ``sid`` (Linux ``/proc``; none where there is no ``/proc``)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(entry.name)) == sid:
                members.append(int(entry.name))
        except (ProcessLookupError, PermissionError, ValueError):
            pass
    return members


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGINT to each running command's process group, then SIGKILL after the grace period, and
    last SIGKILL to whatever is left of each command's session: asv runs each benchmark in a
    process group of its own, which a group's signal does not reach."""
    for sig, wait_s in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 5.0)):
        running = [p for p in procs if p.poll() is None]
        for p in running:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        _wait(running, time.monotonic() + wait_s)
    for p in procs:  # each command started a session of its own, whose id is its pid
        for pid in _session_members(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait(procs: list[subprocess.Popen], end: float) -> None:
    """Wait for the processes until the monotonic time ``end`` (after it, each is only polled);
    those still running are left so."""
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def run_commands(commands: list[list[str]], limit_s: float, *, cwd: Path, env: dict[str, str],
                 logs: list[Path]) -> tuple[list[int | None], bool]:
    """Run ``commands`` side by side, each writing to its log, for at most ``limit_s`` seconds.

    Returns each exit code (None when it had to be killed) and whether the limit stopped any.
    """
    procs = []
    for cmd, log in zip(commands, logs):
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:
            handle.write(f"$ {' '.join(cmd)}\n")
            handle.flush()
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
    _wait(procs, time.monotonic() + limit_s)
    stopped = any(p.poll() is None for p in procs)
    if stopped:
        _stop(procs)
    return [p.returncode for p in procs], stopped


def snapshot(root: Path) -> dict[str, tuple[float, int]]:
    """(mtime, size) of every file under ``root/reports``."""
    stamps = {}
    for path in (root / "reports").rglob("*"):
        if path.is_file():
            stat = path.stat()
            stamps[str(path.relative_to(root))] = (stat.st_mtime, stat.st_size)
    return stamps


def changed_files(root: Path, before: dict[str, tuple[float, int]]) -> list[str]:
    """Files under ``reports/`` made or changed since ``before``, without training checkpoints or
    the temporary files of writes in flight (``.part``, ``atomic_write``'s ``.tmp``)."""
    now = snapshot(root)
    return sorted(path for path, stamp in now.items() if before.get(path) != stamp
                  and "/checkpoints/" not in path and not path.endswith((".part", ".tmp")))


def pack(root: Path, files: Sequence[str], extra: Sequence[Path], target: Path) -> int:
    """Write ``files`` (relative to ``root``) and ``extra`` (files, or folders taken whole) into
    the gzipped tar ``target``, atomically (``atomic_write``). Returns how many files."""
    from rampde.bench.results import atomic_write

    names = list(files)
    for path in extra:
        found = sorted(path.rglob("*")) if path.is_dir() else [path]
        names += [str(p.relative_to(root)) for p in found if p.is_file()]
    names = [n for n in dict.fromkeys(names) if (root / n).is_file()]

    def write(handle) -> None:
        with tarfile.open(fileobj=handle, mode="w:gz") as tar:
            for name in names:
                tar.add(root / name, arcname=name)

    atomic_write(target, write, binary=True)
    return len(names)


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def child_env(root: Path, commit: str) -> dict[str, str]:
    """The steps' environment: the campaign's wheels and this checkout on the path, unbuffered
    output, the commit when git cannot tell it."""
    stage = Stage(root)
    paths = [str(stage.site)] if stage.site.exists() else []
    paths += [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), PYTHONUNBUFFERED="1")
    if commit:
        env["RAMPDE_COMMIT"] = commit
    return env


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def restore_history(root: Path) -> str:
    """Give a copy of the tree its git history back from the bundle (asv needs it); returns the
    commit the tree is at, '' when neither git nor the bundle can tell, and ``<sha>+modified`` when
    tracked files differ from that commit (a bundle older than the tree: ``prepare`` was not rerun
    after the last commit), so that no row names a commit whose code it did not run."""
    stage = Stage(root)
    recorded = stage.commit_file.read_text().strip() if stage.commit_file.exists() else ""
    if shutil.which("git") is None:
        _say("git is not installed: the asv step cannot date commits and is skipped")
        return recorded
    if not (root / ".git").exists() and stage.bundle.exists():
        for args in (("init", "-q", "-b", "campaign-restore"), ("fetch", "-q", str(stage.bundle), "main:main"),
                     ("symbolic-ref", "HEAD", "refs/heads/main"), ("reset", "-q")):
            done = _git(root, *args)
            if done.returncode != 0:
                _say(f"restoring git history failed at 'git {' '.join(args)}': {done.stderr.strip()}")
                return recorded
        _say(f"git history restored from {stage.bundle.relative_to(root)}")
    head = _git(root, "rev-parse", "HEAD")
    if head.returncode != 0:
        return recorded
    commit = head.stdout.strip()
    # Contents only: a copy that lost the executable bits has not changed the code.
    if _git(root, "-c", "core.fileMode=false", "diff", "--quiet", "HEAD").returncode == 1:
        _say(f"WARNING: tracked files differ from commit {commit[:12]} (run 'gpu_campaign.py prepare' at the "
             f"commit to measure); results are labelled {commit[:12]}+modified, asv records older commits only")
        return f"{commit}+modified"
    return commit


def install_wheels(root: Path, python: str) -> None:
    """pip-install the carried wheels into ``.campaign/site`` (no index, no dependencies)."""
    stage = Stage(root)
    wheels = sorted(stage.wheels.glob("*.whl"))
    if not wheels or stage.site.exists():
        return
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(stage.site), *map(str, wheels)], capture_output=True, text=True)
    if done.returncode != 0:
        _say(f"installing the wheels failed: {done.stderr.strip()[-500:]}")
    else:
        _say(f"{len(wheels)} wheels installed into {stage.site.relative_to(root)}")


def resolve_target(python: str, device: str, env: dict[str, str], root: Path) -> tuple[str, str, dict[str, str]]:
    """(device type, GPU model folder name as the sweep writes it, the version of each of
    ``MODULES`` that ``python`` imports with ``env``, '' where it cannot) for ``auto``, ``cuda`` or
    ``cpu``; ``RuntimeError`` when the device is not usable."""
    code = ("import json; from importlib import metadata, util\n"
            "from rampde.bench.measure import gpu_name, gpu_slug, resolve_device\n"
            f"d = resolve_device({device!r})\n"
            "def version(module, dist):\n"
            "    if util.find_spec(module) is None: return ''\n"
            "    try: return metadata.version(dist)\n"
            "    except metadata.PackageNotFoundError: return 'present'\n"
            f"modules = {{m: version(m, dist) for m, dist in {MODULES!r}.items()}}\n"
            "print(json.dumps({'device': d.type, 'gpu': gpu_slug(gpu_name(d)), 'modules': modules}))")
    done = subprocess.run([python, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"device {device!r} is not usable by {python}: {done.stderr.strip()[-400:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found["device"], found["gpu"], found["modules"]


def run_campaign(steps: Sequence[Step], ctx: Context, *, budget_s: float, pack_to: Path | None,
                 env: dict[str, str], clock: Callable[[], float] = time.monotonic, start: float | None = None,
                 modules: dict[str, str] | None = None) -> list[StepRecord]:
    """Run ``steps`` within ``budget_s`` seconds from ``start`` (a ``clock`` reading; default now),
    packing after each; a step that needs a module that ``modules`` (name -> version) lacks is
    skipped. Returns what each step did."""
    from rampde.bench.results import atomic_write

    stage = Stage(ctx.root)
    start = clock() if start is None else start
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    before = snapshot(ctx.root)
    records: list[StepRecord] = []

    def save() -> None:
        summary = {"gpu": ctx.gpu, "device": ctx.device, "budget_s": budget_s, "commit": env.get("RAMPDE_COMMIT", ""),
                   "started": started, "modules": modules or {}, "steps": [asdict(r) for r in records]}
        atomic_write(stage.summary, lambda handle: handle.write(json.dumps(summary, indent=2) + "\n"))
        if ctx.on_gpu:
            (ctx.root / ctx.reports).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(stage.summary, ctx.root / ctx.reports / "campaign.json")
        if pack_to is not None:
            count = pack(ctx.root, changed_files(ctx.root, before), [stage.logs, stage.summary], pack_to)
            _say(f"packed {count} files into {pack_to}")

    for step in steps:
        left = budget_s - (clock() - start)
        limit = step_limit(step.share, left)
        record = StepRecord(step.name, round(limit, 1))
        records.append(record)
        missing = [m for m in step.needs if modules is not None and not modules.get(m)]
        if missing:
            record.skipped = f"cannot import {', '.join(missing)}"
            _say(f"{step.name}: skipped ({record.skipped})")
            save()
            continue
        if limit < MIN_STEP_S:
            record.skipped = f"{left:.0f} s of the budget left"
            _say(f"{step.name}: skipped ({record.skipped})")
            save()
            continue
        commands = step.commands(ctx)
        logs = [stage.logs / (f"{step.name}.log" if len(commands) == 1 else f"{step.name}-{i}.log")
                for i in range(len(commands))]
        _say(f"{step.name}: {len(commands)} command(s), limit {limit:.0f} s")
        t0 = clock()
        if step.sequential:
            for command, log in zip(commands, logs):
                codes, record.stopped = run_commands([command], max(0.0, limit - (clock() - t0)), cwd=ctx.root,
                                                     env=env, logs=[log])
                record.exit_codes += codes
                if record.stopped:
                    break
        else:
            record.exit_codes, record.stopped = run_commands(commands, limit, cwd=ctx.root, env=env, logs=logs)
        record.elapsed_s = round(clock() - t0, 1)
        _say(f"{step.name}: exit {record.exit_codes}{' (stopped at its limit)' if record.stopped else ''} "
             f"after {record.elapsed_s:.0f} s")
        for code, log in zip(record.exit_codes, logs):
            if code not in (0, None) or record.stopped:
                print(_tail(log), flush=True)
        if step.after is not None:
            try:
                record.after = step.after(ctx)
            except Exception as exc:  # a failed merge must not lose the other steps
                record.after = f"failed: {type(exc).__name__}: {exc}"
            _say(f"{step.name}: {record.after}")
        save()
    return records


# ----------------------------------------------------------------------------- command line


def _installed_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def missing_requirements(wheels: Sequence[Path], python_version: str,
                         present: Sequence[str] = IMAGE_PACKAGES + UNUSED) -> list[str]:
    """Requirements of ``wheels`` (markers evaluated for Linux and ``python_version``, extras left
    out) that neither the wheels nor ``present`` provide, as ``'<wheel>: <requirement>'``."""
    import zipfile
    from email.parser import Parser

    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
           "platform_python_implementation": "CPython", "implementation_name": "cpython", "extra": ""}
    metas = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            metas[wheel] = Parser().parsestr(zf.read(name).decode())
    provided = {_canonical(m["Name"]) for m in metas.values()} | {_canonical(n) for n in present}
    missing = []
    for wheel, meta in metas.items():
        for text in meta.get_all("Requires-Dist") or []:
            req = Requirement(text)
            if (req.marker is None or req.marker.evaluate(env)) and _canonical(req.name) not in provided:
                missing.append(f"{meta['Name']}: {text}")
    return missing


def prepare(root: Path, python_version: str, allow_dirty: bool) -> int:
    """Fill ``.campaign/``: the wheels (the versions installed here, else the newest), the git
    bundle of main and the commit measured."""
    stage = Stage(root)
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if dirty and not allow_dirty:
        print("gpu_campaign: the tree has uncommitted changes, which the results would not name; commit them "
              "or pass --allow-dirty", file=sys.stderr)
        return 2
    for leftover in (stage.site, stage.logs, stage.training):
        shutil.rmtree(leftover, ignore_errors=True)
    stage.summary.unlink(missing_ok=True)
    stage.wheels.mkdir(parents=True, exist_ok=True)
    for name in WHEEL_PACKAGES:
        version = _installed_version(name)
        spec = f"{name}=={version}" if version else name
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "-d", str(stage.wheels), spec]
        for platform in WHEEL_PLATFORMS:
            cmd += ["--platform", platform]
        subprocess.run(cmd, check=True)
        print(f"wheel: {spec}")
    for stale in stage.wheels.glob("*.whl"):
        if not any(_canonical(stale.name.split("-")[0]) == _canonical(n) for n in WHEEL_PACKAGES):
            stale.unlink()
    missing = missing_requirements(sorted(stage.wheels.glob("*.whl")), python_version)
    if missing:
        print("gpu_campaign: the wheels need what is neither carried nor on the image:\n  " + "\n  ".join(missing),
              file=sys.stderr)
        return 2
    bundle = _git(root, "bundle", "create", str(stage.bundle), "main")
    if bundle.returncode != 0:
        print(f"gpu_campaign: git bundle failed: {bundle.stderr.strip()}", file=sys.stderr)
        return 2
    stage.commit_file.write_text(_git(root, "rev-parse", "HEAD").stdout.strip() + "\n")
    size = sum(p.stat().st_size for p in stage.dir.rglob("*") if p.is_file())
    print(f"{stage.dir.relative_to(root)}: {size / 2**20:.1f} MiB; carry it with the tree and run there:\n"
          f"  python3 tools/gpu_campaign.py run --pack <folder that comes back>/campaign.tgz")
    return 0


def plan(ctx: Context, steps: Sequence[Step], budget_s: float) -> str:
    """The steps with their limits (each assumed to use its whole share) and commands."""
    import shlex

    lines, left = [], budget_s
    for step in steps:
        limit = step_limit(step.share, left)
        left -= limit
        head = f"{step.name}: up to {limit:.0f} s" if limit >= MIN_STEP_S else f"{step.name}: no time left"
        lines.append(head)
        lines += [f"    {shlex.join(cmd)}" for cmd in step.commands(ctx)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="wheels and git history into .campaign/ (needs internet)")
    prep.add_argument("--python-version", default="3.12", help="the GPU box's Python (default 3.12)")
    prep.add_argument("--allow-dirty", action="store_true", help="prepare although tracked files are modified")
    for name, text in (("plan", "print the steps, their limits and commands"), ("run", "run the campaign")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                       help=f"seconds for the setup and all the steps (default {DEFAULT_BUDGET_S:.0f})")
        p.add_argument("--steps", nargs="+", metavar="STEP", help=f"some of: {' '.join(STEP_NAMES)}")
        p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cuda or cpu")
        p.add_argument("--python", default=sys.executable, help="the interpreter with torch (default this one)")
        if name == "run":
            p.add_argument("--pack", type=Path, help="gzipped tar of the results, rewritten after each step")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    start = time.monotonic()  # the budget counts the setup too
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        return prepare(ROOT, args.python_version, args.allow_dirty)
    if args.budget <= 0:
        print(f"gpu_campaign: --budget must be positive, got {args.budget}", file=sys.stderr)
        return 2
    try:
        steps = select_steps(args.steps)
    except ValueError as exc:
        print(f"gpu_campaign: {exc}", file=sys.stderr)
        return 2
    if args.command == "plan":
        device = args.device if args.device != "auto" else "cuda"
        ctx = Context(args.python, device, "<gpu-model>" if device == "cuda" else "cpu")
        print(plan(ctx, steps, args.budget))
        return 0
    install_wheels(ROOT, args.python)
    commit = restore_history(ROOT)
    env = child_env(ROOT, commit)
    try:
        device, gpu, modules = resolve_target(args.python, args.device, env, ROOT)
    except RuntimeError as exc:
        print(f"gpu_campaign: {exc}", file=sys.stderr)
        return 2
    ctx = Context(args.python, device, gpu)
    _say(f"campaign on {gpu} ({device}), commit {commit or 'unknown'}, budget {args.budget:.0f} s, "
         f"{time.monotonic() - start:.0f} s of it spent on the setup")
    _say("modules: " + ", ".join(f"{m} {v or 'MISSING'}" for m, v in modules.items()))
    if shutil.which("nvidia-smi") and ctx.on_gpu:
        subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,"
                        "memory.total", "--format=csv"], check=False)
    if ctx.on_gpu and shutil.which("git") is None:
        steps = [s for s in steps if s.name != "asv"]
    records = run_campaign(steps, ctx, budget_s=args.budget, pack_to=args.pack, env=env, start=start,
                           modules=modules)
    for r in records:
        state = r.skipped and f"skipped ({r.skipped})" or ("stopped at its limit" if r.stopped else "done")
        print(f"  {r.name:<13} {r.elapsed_s:6.0f} s of {r.limit_s:4.0f}  exit {r.exit_codes}  {state}")
    failed = [r.name for r in records if not r.stopped and any(c not in (0, None) for c in r.exit_codes)]
    if failed:
        print(f"gpu_campaign: failed steps: {', '.join(failed)} (logs in {STAGE_NAME}/logs)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
