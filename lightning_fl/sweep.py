"""`lightning-fl sweep FILE`: an experiment's variants × seeds, each a `fit` run in its own process
and folder, resumable as a whole, then its tables of the finished runs (`results.py`): each class's
test Dice as mean ± std over seeds, and paired differences between variants over the same cases
with intervals over seeds and over cases.

A run is its own process so that one crash costs one run, and so that runs can train side by side
(`--parallel`); a run's folder tells what is left to do (see `decide`). With `--launcher slurm` each
run is a SLURM job submitted by submitit instead (`submitit-local`: the same code path, the jobs on
this machine); the sweep waits for them, and reports, skips and resumes them as it does its own
processes. The sweep file and the runs it plans: `sweep_plan.py`; the folder it writes:
`run_folder.SweepFolder`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from lightning_fl.analysis import comparison_figure, frequency_figure, write_png
from lightning_fl.checkpoint import atomic_write_together
from lightning_fl.config import ConfigError, config_changes, file_holds
from lightning_fl.errors import RunStopped
from lightning_fl.results import (
    Results,
    format_table,
    frequency_points,
    per_run,
    results_csv,
    results_markdown,
    run_costs,
)
from lightning_fl.run_folder import COMPARISON_PLOT, FREQUENCY_PLOT, ResultsError
from lightning_fl.sweep_plan import PlannedRun, Sweep, plan_runs

POLL_S = 0.2
STOP_WAIT_S = 30.0  # how long stopped runs get to exit before SIGKILL
JOB_POLL_S = 10.0  # how often the jobs' states are asked of SLURM (submitit caches squeue between)


def uncompared(planned: DictConfig) -> tuple[str, ...]:
    """Keys not compared between a run's config.yaml and the config the sweep plans for it:
    output_dir (a sweep may be run from elsewhere), the W&B group, job type and name (the sweep
    file's and the variant's names: a renamed sweep file or variant, or a run folder copied from
    another sweep, trains nothing differently), fabric.devices (a site-parallel run computes the
    same on any number of processes, and `--parallel` sets 1) and a planned fabric.precision `auto`
    (fit writes what `auto` chose into config.yaml)."""
    labels = ("logger.wandb.group", "logger.wandb.job_type", "logger.wandb.name")
    auto = ("fabric.precision",) if planned.fabric.precision == "auto" else ()
    return ("output_dir", *labels, "fabric.devices", *auto)


def saved_changes(saved: DictConfig, planned: DictConfig) -> list[str]:
    """Keys whose values differ between a run's config.yaml and the config the sweep plans for it."""
    return config_changes(saved, planned, ignore=uncompared(planned))


def decide(runs: list[PlannedRun], rerun_changed: bool = False) -> None:
    """What each run's folder leaves to do: none → start; summary.json → finished, skip; state.ckpt
    without summary.json (or with a damaged one or a damaged test_cases.csv: said) → cut off, `fit
    --resume`; anything else → `fit --overwrite` (fit moves the
    old folder aside). A finished or cut-off run whose config.yaml differs from what the sweep now
    plans is refused (the sweep file was edited), or with `rerun_changed` started again."""
    for run in runs:
        tested, trained = run.folder.summary.is_file(), run.folder.has_state
        if tested or trained:  # config.yaml composed once (it checks the record too), unless plainly the planned one
            same = file_holds(run.folder.config, run.cfg, uncompared(run.cfg))
            run.saved = run.cfg if same else run.folder.read_config()
        damage = run.folder.damage(run.saved) if tested else None
        finished = tested and damage is None
        if damage:
            print(f"{run.name}: not finished: {damage}")
        if finished or trained:
            run.changed = saved_changes(run.saved, run.cfg)
            run.action = "skip" if finished else "resume"
        else:
            run.action = "overwrite" if run.folder.path.exists() else "start"
    changed = [run for run in runs if run.changed]
    if changed and not rerun_changed:
        listing = "; ".join(f"{run.name} ({', '.join(run.changed)})" for run in changed)
        raise ConfigError(
            f"the config of {len(changed)} run{'s' if len(changed) > 1 else ''} differs from what the sweep file "
            f"now gives (was it edited since they ran?): {listing}; pass --rerun-changed to train them again "
            "(each old folder is moved aside), or undo the change"
        )
    for run in changed:
        run.action = "overwrite"


def fit_command(sweep: Sweep, run: PlannedRun, parallel: int, launcher: str = "local") -> list[str]:
    """The `fit` command line of a run's next start. Runs side by side get one process each; a SLURM
    job with GPUs trains with one process per GPU of its nodes, as srun starts them."""
    fit = [sys.executable, "-m", "lightning_fl", "fit"]
    if launcher != "local" and sweep.slurm.gpus_per_node and run.action != "resume":
        gpus = [f"fabric.devices={sweep.slurm.gpus_per_node}", f"fabric.num_nodes={sweep.slurm.nodes}"]
        overwrite = ["--overwrite"] if run.action == "overwrite" else []
        return fit + ["--config", str(sweep.base), *overwrite, *run.overrides, *gpus]
    if run.action == "resume":  # (a job's requeue resumes a run it started: no saved config then)
        one_process = parallel > 1 and run.saved is not None and run.folder.read_config().fabric.devices != 1
        return (
            fit
            + ["--resume", str(run.folder.path)]
            + (["--allow-config-change", "fabric.devices=1"] if one_process else [])
        )
    overwrite = ["--overwrite"] if run.action == "overwrite" else []
    one_process = ["fabric.devices=1"] if parallel > 1 else []
    return fit + ["--config", str(sweep.base), *overwrite, *run.overrides, *one_process]


@dataclass(frozen=True)
class Outcome:
    """How a run ended in this sweep: its line of the summary table."""

    status: str
    seconds: float | None = None
    failed: bool = False


class LoggedFit:
    """A `fit` process in its own process group (so stopping it reaches the processes it starts),
    its stdout and stderr appended to a run's log after a line naming the command; the last line of
    stderr is kept for the summary. The sweep runs one per run here; a submitit job, on its node."""

    def __init__(
        self, command: list[str], log: Path, env: dict[str, str], cwd: str | None = None, header: bool = True
    ) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log.open("ab", buffering=0)
        if header:
            self.log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
        self.last_error = ""
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.write(line)
            if line.strip():
                self.last_error = line.decode(errors="replace").strip()

    def finished(self) -> bool:
        return self.process.poll() is not None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:  # already gone
            pass

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after STOP_WAIT_S; nothing if it has ended."""
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait()

    def close(self) -> str | None:
        """After the process ended: None where it succeeded, else why it failed (stderr's last line,
        or how it ended); the log is closed."""
        self.reader.join(timeout=5)
        self.log.close()
        code = self.process.returncode
        if code == 0:
            return None
        return self.last_error or (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")


class _Child:
    """A run trained by a process of this machine (`--launcher local`)."""

    def __init__(self, run: PlannedRun, command: list[str], env: dict[str, str]) -> None:
        self.run, self.start = run, time.monotonic()
        self.fit = LoggedFit(command, run.log, env)

    def finished(self) -> bool:
        return self.fit.finished()

    def outcome(self) -> Outcome:
        """After the process ended: done, resumed or failed (with stderr's last line)."""
        seconds, failure = time.monotonic() - self.start, self.fit.close()
        if failure is None:
            return Outcome("resumed" if self.run.action == "resume" else "done", seconds)
        return Outcome(f"failed: {failure}", seconds, failed=True)


class FitFailed(RuntimeError):
    """A run's `fit` ended with an error inside its job; the message is its stderr's last line."""


class FitJob:
    """What a run's submitit job executes (pickled to the node): its `fit` command, as a `LoggedFit`
    appending to the run's log (the first task's header alone); a failed fit raises FitFailed. When
    the job's time is nearly up (or it is preempted) submitit calls `checkpoint`: the fit is stopped
    and the job requeued with `resume`, so a run longer than one job's limit goes on by itself (up to
    submitit's 3 timeouts). Cancelled (SIGINT from submitit-local; SLURM signals every process
    itself), it stops the fit first."""

    def __init__(self, command: list[str], resume: list[str], log: Path, cwd: str) -> None:
        self.command, self.resume, self.log, self.cwd = command, resume, log, cwd
        self._fit: LoggedFit | None = None

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_fit": None}

    def __call__(self) -> None:
        first_task = int(os.environ.get("SLURM_PROCID", "0")) == 0
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        self._fit = fit = LoggedFit(self.command, self.log, env, self.cwd, header=first_task)
        try:
            fit.process.wait()
        except BaseException:  # cancelled, or requeued by `checkpoint`
            fit.stop()
            raise
        finally:
            failure = fit.close()
        if failure is not None:
            raise FitFailed(failure)

    def checkpoint(self) -> Any:
        """submitit's hook before a timeout or preemption, called in a signal handler while `__call__`
        waits for the fit: SIGTERM to the fit, whose exit `__call__` then waits for as submitit's
        requeue unwinds it (waiting here could deadlock on the waiting Popen's lock); the requeued
        job resumes the run."""
        from submitit.helpers import DelayedSubmission

        if self._fit is not None:
            self._fit.signal(signal.SIGTERM)
        return DelayedSubmission(FitJob(self.resume, self.resume, self.log, self.cwd))


class _Job:
    """A run's submitit job: submitted, polled until done, cancelled when the sweep is stopped."""

    def __init__(self, run: PlannedRun, executor: Any, command: list[str], resume: list[str]) -> None:
        self.run, self.start = run, time.monotonic()
        run.log.parent.mkdir(parents=True, exist_ok=True)
        # submitit-local cancels a job with SIGINT; a sweep started in the background (`nohup ... &`)
        # ignores SIGINT and its children would inherit that, so the job is submitted with SIGINT's
        # default handler (on exec a handler becomes the default action: the job can be cancelled)
        inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self.job = executor.submit(FitJob(command, resume, run.log.absolute(), os.getcwd()))
        finally:
            signal.signal(signal.SIGINT, inherited)

    def finished(self) -> bool:
        return self.job.done()

    def stop(self) -> None:
        self.job.cancel(check=False)

    def outcome(self) -> Outcome:
        """Done, resumed or failed: the fit's last line of stderr, or the job's state (timed out,
        cancelled, out of memory: the scheduler's words)."""
        seconds = time.monotonic() - self.start
        try:
            error = self.job.exception()
        except Exception as err:  # noqa: BLE001 - submitit's UncompletedJobError: killed, timed out, cancelled
            error = err
        if error is None:
            return Outcome("resumed" if self.run.action == "resume" else "done", seconds)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        fit_error = [line.split("FitFailed: ", 1)[1] for line in lines if "FitFailed: " in line]
        if fit_error:
            reason = fit_error[-1]
        elif any("timed-out" in line or "TIMEOUT" in line for line in lines):
            reason = f"job {self.job.job_id} timed out (slurm.timeout_min) too often; it resumes at the next call"
        else:
            reason = f"job {self.job.job_id}: {lines[-1] if lines else self.job.state.lower()}"
        return Outcome(f"failed: {reason}", seconds, failed=True)


def _executor(sweep: Sweep, launcher: str) -> Any:
    """submitit's executor for the runs' jobs, with the sweep file's `slurm` resources (on this
    machine, those its local executor takes: it runs one node and has no queue or partition)."""
    import submitit

    resources = sweep.slurm
    shared = {
        "nodes": resources.nodes,
        "tasks_per_node": max(1, resources.gpus_per_node),
        "gpus_per_node": resources.gpus_per_node,
        "timeout_min": resources.timeout_min,
    }
    if launcher == "submitit-local":  # (AutoExecutor does not hand it signal_delay_s)
        if resources.nodes > 1:
            raise ConfigError(
                f"--launcher submitit-local runs one node; the sweep file asks for slurm.nodes={resources.nodes}"
            )
        executor = submitit.LocalExecutor(folder=sweep.folder.jobs)
        executor.update_parameters(**shared, signal_delay_s=resources.signal_delay_s)
        return executor
    try:
        executor = submitit.AutoExecutor(folder=sweep.folder.jobs, cluster="slurm")
    except (RuntimeError, ValueError) as err:  # no sbatch on this machine
        raise ConfigError(f"--launcher {launcher}: submitit cannot submit here: {err}") from err
    executor.update_parameters(
        **shared,
        name=sweep.name,
        cpus_per_task=resources.cpus_per_task,
        mem_gb=resources.mem_gb,
        slurm_signal_delay_s=resources.signal_delay_s,
        slurm_partition=resources.partition,
        slurm_additional_parameters=dict(resources.additional),
    )
    return executor


class _Interrupts:
    """Ctrl-C and SIGTERM as KeyboardInterrupt, held back while a run starts: one arriving between
    a process's start and its place among the running would leave that process training unseen."""

    def __init__(self) -> None:
        self.holding, self.arrived = False, False

    def __call__(self, signum: int, frame: Any) -> None:
        if not self.holding:
            raise KeyboardInterrupt
        self.arrived = True

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.arrived:
            raise KeyboardInterrupt


def execute(sweep: Sweep, runs: list[PlannedRun], parallel: int, launcher: str = "local") -> dict[str, Outcome]:
    """Run what `decide` left to do, `parallel` at a time (processes, or jobs in the queue); a failed
    run does not stop the others. Ctrl-C or SIGTERM stops the running ones (jobs: cancelled; they
    resume at the next start) and raises RunStopped."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}  # the logs fill as the runs go
    if parallel > 1 and launcher == "local":
        threads = str(max(1, len(os.sched_getaffinity(0)) // parallel))
        env |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if launcher == "local":
        start: Any = lambda run: _Child(run, fit_command(sweep, run, parallel), env)  # noqa: E731
        poll_s = POLL_S
    else:
        executor = _executor(sweep, launcher)
        start = lambda run: _Job(  # noqa: E731
            run,
            executor,
            fit_command(sweep, run, 1, launcher),
            fit_command(sweep, replace(run, action="resume"), 1, launcher),  # after a requeue
        )
        poll_s = POLL_S if launcher == "submitit-local" else JOB_POLL_S
    outcomes = {run.name: Outcome("skipped: finished before") for run in runs if run.action == "skip"}
    pending = [run for run in runs if run.action != "skip"]
    active: list[Any] = []
    bar = tqdm(total=len(runs), initial=len(outcomes), desc="sweep", unit="run", disable=None)
    shown = ""
    interrupts = _Interrupts()
    ctrl_c = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not where ignored (`nohup ... &`)
    handlers = (
        signal.signal(signal.SIGINT, interrupts) if ctrl_c else signal.getsignal(signal.SIGINT),
        signal.signal(signal.SIGTERM, interrupts),
    )
    try:
        while pending or active:
            while pending and len(active) < parallel:
                with interrupts.held():
                    active.append(start(pending.pop(0)))
            running = ", ".join(child.run.name for child in active)
            if running != shown:
                bar.set_postfix_str(running)
                shown = running
            time.sleep(poll_s)
            for child in [c for c in active if c.finished()]:
                active.remove(child)
                outcome = outcomes[child.run.name] = child.outcome()
                bar.update(1)
                tqdm.write(f"{child.run.name}: {outcome.status} ({_duration(outcome.seconds)}; log: {child.run.log})")
    except KeyboardInterrupt:
        _stop(active)
        names = ", ".join(child.run.name for child in active) or "no run was running"
        raise RunStopped(f"interrupted; stopped {names}; run the same command again to resume") from None
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        bar.close()
    return outcomes


def _stop(children: list[Any]) -> None:
    """SIGTERM to every running run's process group, SIGKILL to what has not ended after STOP_WAIT_S
    (jobs: cancelled, then waited for as long); further Ctrl-C's are ignored meanwhile, so no run is
    left behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    jobs = [child for child in children if isinstance(child, _Job)]
    children = [child for child in children if not isinstance(child, _Job)]
    for job in jobs:
        job.stop()
    deadline = time.monotonic() + STOP_WAIT_S
    while any(not job.finished() for job in jobs) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for child in children:
        child.fit.signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    for child in children:
        try:
            child.fit.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.fit.signal(signal.SIGKILL)
            child.fit.process.wait()
        child.outcome()  # closes its log


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)  # whole seconds first: 479.6 s is 8 min 00 s, not 7 min 60 s
    return f"{minutes} min {rest:02d} s"


def status_table(runs: list[PlannedRun], outcomes: dict[str, Outcome]) -> str:
    """variant, seed, wall time and status of every run; the statuses left-aligned (they are words)."""
    width = max(len("status"), *(len(outcomes[run.name].status) for run in runs))
    rows = [
        [run.variant, str(run.seed), _duration(outcomes[run.name].seconds), outcomes[run.name].status.ljust(width)]
        for run in runs
    ]
    table = format_table(rows, ["variant", "seed", "wall time", "status".ljust(width)])
    return "\n".join(line.rstrip() for line in table.splitlines())


def run_sweep(
    sweep: Sweep,
    parallel: int | None = None,
    rerun_changed: bool = False,
    tables_only: bool = False,
    command: str = "",
    launcher: str = "local",
) -> None:
    """Plan and check every run, train what is left (unless `tables_only`), then write the tables
    of the finished runs. `parallel`: runs at once; by default one, and every run at once under
    SLURM (the scheduler queues them). Raises RunStopped (exit status 1) after the tables when any
    run failed."""
    runs = plan_runs(sweep)
    parallel = parallel or (len(runs) if launcher == "slurm" else 1)
    decide(runs, rerun_changed)
    outcomes: dict[str, Outcome] = {}
    if not tables_only:
        prepare_data(runs)
        outcomes = execute(sweep, runs, parallel, launcher)
        print("\n" + status_table(runs, outcomes))
    results, missing = collect_results(runs)
    written = write_tables(sweep, runs, results, missing, command)
    print(f"tables of {len(results)} of {len(runs)} runs: " + ", ".join(str(path) for path in written))
    failed = [run for run in runs if run.name in outcomes and outcomes[run.name].failed]
    if failed:
        raise RunStopped(
            f"{len(failed)} of {len(runs)} runs failed: " + "; ".join(f"{run.name} (log: {run.log})" for run in failed)
        )


def prepare_data(runs: list[PlannedRun]) -> None:
    """Generate each synthetic federation that the runs left to train use, once, before the first
    wave: runs started side by side then find it there instead of waiting for one another."""
    from lightning_fl.data.datasets import prepare_data_root
    from lightning_fl.labels import LabelSpace

    roots: dict[Path, PlannedRun] = {}
    for run in runs:
        if run.action != "skip" and run.cfg.data.synthetic is not None:
            roots.setdefault(Path(run.cfg.data.root).expanduser(), run)
    for run in roots.values():
        prepare_data_root(run.cfg, LabelSpace.of(run.cfg.labels))


def collect_results(runs: list[PlannedRun]) -> tuple[Results, list[str]]:
    """Each finished run's test cases, and for every other run why it is not in the tables."""
    results, missing = {}, []
    for run in runs:
        try:  # each run's record read once: a missing or damaged one leaves the run out
            if run.folder.summary.is_file():  # a skipped run's config.yaml was read by `decide`
                saved = run.saved if run.action == "skip" else None
                results[(run.variant, run.seed)] = run.folder.read_record(saved)
                continue
        except ResultsError:
            pass
        missing.append(f"{run.name} (not finished)")
    return results, missing


def write_tables(
    sweep: Sweep, runs: list[PlannedRun], results: Results, missing: list[str], command: str
) -> list[Path]:
    """`results.md` and `results.csv` in the sweep's folder, with `comparison.png` (the test table as
    bars, mean ± std over seeds) and `aggregation_frequency.png` where the finished variants differ
    in fl.local_steps; the paths written."""
    folder = sweep.folder
    configs = {run.variant: run.cfg for run in runs}
    costs = run_costs({(run.variant, run.seed): run.folder for run in runs}, configs)
    tables = {
        folder.results_md: results_markdown(sweep, results, missing, command, costs),
        folder.results_csv: results_csv(results),
    }
    atomic_write_together({path: lambda f, text=text: f.write(text.encode()) for path, text in tables.items()})
    written = [folder.results_md, folder.results_csv]
    if results:
        by_run = per_run(results)
        variants = [v for v in sweep.variants if any(key[0] == v for key in by_run)]
        figures = {COMPARISON_PLOT: comparison_figure(variants, by_run)}
        points = frequency_points(configs, by_run)
        if len({s for by_steps in points.values() for s in by_steps}) > 1:
            figures[FREQUENCY_PLOT] = frequency_figure(points)
        written += [write_png(folder.plot(name), fig) for name, fig in figures.items()]
    return written
