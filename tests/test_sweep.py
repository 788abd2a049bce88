"""`lightning-fl sweep`: what each run folder leaves to do, failed runs that do not stop the others,
SIGTERM, and end to end a sweep stopped mid-way and resumed to the same results as one left alone
(and the same config training the same numbers twice)."""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import signal
import sys
import threading
import time

import pytest
import torch

from lightning_fl import sweep as sweeps
from lightning_fl.cli import main
from lightning_fl.config import ConfigError, to_yaml
from lightning_fl.errors import RunStopped
from lightning_fl.sweep import decide
from lightning_fl.sweep_plan import load_sweep, plan_runs
from tests.helpers.runs import SMOKE, fill_disk_at
from tests.helpers.sweeps import CASES, federated_rows, finish, summary, write_sweep


def _status(out: str, variant: str, seed: int) -> str:
    """A run's status in the sweep's summary table (variant, seed, wall time, status)."""
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[:2] == [variant, str(seed)] and len(cells) == 4:
            return cells[3]
    raise AssertionError(f"no row for {variant} seed {seed} in:\n{out}")


def test_each_folder_state_decides_what_the_run_does_next(tmp_path, flat_smoke):
    sweep = load_sweep(write_sweep(tmp_path, flat_smoke, seeds=[0, 1, 2, 3]))
    start, finished, cut, other = runs = plan_runs(sweep)
    finish(finished, ("summary.json", "state.ckpt"))
    finish(cut, ("state.ckpt",))
    other.folder.path.mkdir(parents=True)
    (other.folder.path / "notes.txt").write_text("no run state\n")
    decide(runs)
    assert [r.action for r in runs] == ["start", "skip", "resume", "overwrite"]
    fit = [sys.executable, "-m", "lightning_fl", "fit"]
    assert sweeps.fit_command(sweep, cut, parallel=1) == fit + ["--resume", str(cut.folder.path)]
    assert sweeps.fit_command(sweep, other, parallel=1) == fit + [
        "--config",
        str(flat_smoke),
        "--overwrite",
        *other.overrides,
    ]
    assert sweeps.fit_command(sweep, start, parallel=1) == fit + ["--config", str(flat_smoke), *start.overrides]


def test_what_fit_resolves_in_config_yaml_is_no_change(tmp_path, flat_smoke):
    """fit writes the devices and precision that `auto` chose; --parallel gives each run one process."""
    sweep = load_sweep(
        write_sweep(tmp_path, flat_smoke, variants={"a": ["fabric.devices=auto", "fabric.precision=auto"]})
    )
    [run] = plan_runs(sweep)
    saved = copy.deepcopy(run.cfg)
    saved.fabric.devices, saved.fabric.precision = 2, "32-true"
    finish(run, ("state.ckpt",), saved)
    decide([run])
    assert (run.action, run.changed) == ("resume", [])
    assert sweeps.fit_command(sweep, run, parallel=2)[-3:] == [
        str(run.folder.path),
        "--allow-config-change",
        "fabric.devices=1",
    ]


def test_an_edited_sweep_is_refused_unless_changed_runs_are_rerun(tmp_path, flat_smoke):
    path = write_sweep(tmp_path, flat_smoke, seeds=[0, 1], overrides=["fl.rounds=3"])
    finished, cut = plan_runs(load_sweep(path))
    finish(finished, ("summary.json",))
    finish(cut, ("state.ckpt",))
    write_sweep(tmp_path, flat_smoke, seeds=[0, 1], overrides=["fl.rounds=4", "optim.lr=0.02"])  # edited since
    runs = plan_runs(load_sweep(path))
    with pytest.raises(
        ConfigError,
        match=r"the config of 2 runs differs from what the sweep file now gives .*: "
        r"fedavg/seed0 \(fl.rounds, optim.lr\); fedavg/seed1 \(fl.rounds, optim.lr\); "
        "pass --rerun-changed",
    ):
        decide(runs)
    decide(runs, rerun_changed=True)
    assert [r.action for r in runs] == ["overwrite", "overwrite"]


def test_a_renamed_sweep_file_finds_its_runs_finished(tmp_path, flat_smoke):
    """The W&B group is the sweep file's name; renaming the file changes no run's training."""
    path = write_sweep(tmp_path, flat_smoke)
    [run] = plan_runs(load_sweep(path))
    finish(run, ("summary.json", "state.ckpt"))
    [again] = plan_runs(load_sweep(path.rename(tmp_path / "renamed.yaml")))
    assert (run.cfg.logger.wandb.group, again.cfg.logger.wandb.group) == ("sweep", "renamed")
    decide([again])
    assert (again.action, again.changed) == ("skip", [])


def test_a_run_copied_from_another_sweep_under_another_variant_name_is_skipped(tmp_path, flat_smoke):
    """Another sweep's finished run of the same config, copied under this sweep's variant name:
    only its W&B labels differ, so it is skipped, not trained again."""
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    [run] = plan_runs(load_sweep(write_sweep(tmp_path / "one", flat_smoke, variants={"fedavg": ["method=fedavg"]})))
    finish(run, ("summary.json",))
    other = write_sweep(tmp_path / "two", flat_smoke, variants={"fedavg_10steps": ["method=fedavg"]})
    [adopted] = plan_runs(load_sweep(other))
    shutil.copytree(run.folder.path, adopted.folder.path)
    assert adopted.cfg.logger.wandb.name != run.cfg.logger.wandb.name
    decide([adopted])
    assert (adopted.action, adopted.changed) == ("skip", [])


# ---------------------------------------------------------------- running
def test_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch, capsys, flat_smoke, data_home):
    """Each run is a process (a stand-in for fit here): its output goes to its log, its failure to
    the summary table with its last line of stderr, and the sweep exits 1 after the tables."""
    path = write_sweep(tmp_path, flat_smoke, seeds=[0, 1])
    script = (
        "import os, pathlib, sys; print('threads', os.environ.get('OMP_NUM_THREADS'));"
        "sys.argv[1] == '1' and sys.exit('error: seed 1 went wrong');"
        "folder = pathlib.Path(sys.argv[2]); folder.mkdir(parents=True);"
        "(folder / 'summary.json').write_text(sys.argv[4]);"
        "(folder / 'test_cases.csv').write_text(sys.argv[5]);"
        "(folder / 'config.yaml').write_text(sys.argv[3])"
    )

    def stand_in(sweep, run, parallel):
        record = [json.dumps(summary()), CASES]
        return [sys.executable, "-c", script, str(run.seed), str(run.folder.path), to_yaml(run.cfg), *record]

    monkeypatch.setattr(sweeps, "fit_command", stand_in)
    assert main(["sweep", str(path), "--parallel", "2"]) == 1
    out, err = capsys.readouterr()
    assert [_status(out, "fedavg", s) for s in (0, 1)] == ["done", "failed: error: seed 1 went wrong"]
    assert (
        f"lightning-fl sweep: stopped: 1 of 2 runs failed: fedavg/seed1 (log: {tmp_path}/out/runs/fedavg/seed1.log)"
        in err
    )
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    log = (tmp_path / "out" / "runs" / "fedavg" / "seed1.log").read_text()
    assert log.startswith("\n=== ") and f"threads {threads}\n" in log and log.endswith("error: seed 1 went wrong\n")
    assert "fedavg/seed1 (not finished)" in (tmp_path / "out" / "results.md").read_text()  # the tables are written

    assert main(["sweep", str(path)]) == 1  # again: the finished ones are skipped, the failed one runs again
    out = capsys.readouterr().out
    assert [_status(out, "fedavg", s) for s in (0, 1)] == [
        "skipped: finished before",
        "failed: error: seed 1 went wrong",
    ]
    assert (tmp_path / "out" / "runs" / "fedavg" / "seed1.log").read_text().count("\n=== ") == 2  # appended


def test_sigterm_stops_the_running_runs_and_says_how_to_go_on(tmp_path, monkeypatch, flat_smoke, data_home):
    path = write_sweep(tmp_path, flat_smoke, seeds=[0, 1])
    pids = tmp_path / "pids"
    script = "import os, sys, time; open(sys.argv[1], 'a').write(f'{os.getpid()}\\n'); time.sleep(60)"
    monkeypatch.setattr(sweeps, "fit_command", lambda sweep, run, parallel: [sys.executable, "-c", script, str(pids)])

    def stop_once_started() -> None:
        while not (pids.exists() and pids.read_text().endswith("\n")):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=stop_once_started, daemon=True).start()
    with pytest.raises(RunStopped, match="^interrupted; stopped fedavg/seed0; run the same command again to resume$"):
        sweeps.run_sweep(load_sweep(path))
    with pytest.raises(ProcessLookupError):
        os.kill(int(pids.read_text()), 0)  # the run was stopped and waited for
    assert signal.getsignal(signal.SIGTERM) is handler


def test_a_stop_arriving_as_a_run_starts_stops_that_run_too(tmp_path, monkeypatch, flat_smoke):
    """SIGTERM once a run's process exists but before the sweep has it among the running ones: the
    run is stopped, waited for and named, not left training."""
    path = write_sweep(tmp_path, flat_smoke)
    pid = tmp_path / "pid"
    script = "import os, sys, time; open(sys.argv[1], 'a').write(f'{os.getpid()}\\n'); time.sleep(60)"
    monkeypatch.setattr(sweeps, "fit_command", lambda sweep, run, parallel: [sys.executable, "-c", script, str(pid)])
    start = sweeps._Child.__init__

    def start_then_stop(child, *args):
        start(child, *args)
        while not (pid.exists() and pid.read_text().endswith("\n")):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, inside the start

    monkeypatch.setattr(sweeps._Child, "__init__", start_then_stop)
    with pytest.raises(RunStopped, match="^interrupted; stopped fedavg/seed0; run the same command again"):
        sweeps.run_sweep(load_sweep(path))
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid.read_text()), 0)


def test_a_failed_job_is_named_and_a_timed_out_one_requeued_to_resume(
    tmp_path, monkeypatch, capsys, flat_smoke, data_home
):
    """Through submitit's local executor (the SLURM launcher's code path without a scheduler): a
    run whose fit fails is reported with its stderr's last line; one that outlives slurm.timeout_min
    (submitit warns it slurm.signal_delay_s before the limit: here 5 s after its start) is stopped and
    requeued with its resume command, and ends in the same call; a failed run starts again at the
    next call."""
    slurm = {"timeout_min": 1, "signal_delay_s": 55}
    path = write_sweep(tmp_path, flat_smoke, variants={"fails": [], "slow": []}, slurm=slurm)
    actions = tmp_path / "actions"

    def fake_fit(sweep, run, parallel, launcher="local"):  # records what the sweep asked of the run
        with actions.open("a") as f:
            f.write(f"{run.name} {run.action} {launcher}\n")
        if run.variant == "fails":
            code = "import sys; print('error: the fails variant went wrong', file=sys.stderr); sys.exit(3)"
        elif run.action == "resume":
            code = "pass"
        else:  # leaves a run's config and state, then runs past the job's time limit
            run.folder.path.mkdir(parents=True)
            run.folder.config.write_text(to_yaml(run.cfg))
            code = f"import pathlib, time; pathlib.Path({str(run.folder.state)!r}).touch(); time.sleep(120)"
        return [sys.executable, "-c", code]

    monkeypatch.setattr(sweeps, "fit_command", fake_fit)
    with pytest.raises(RunStopped, match=r"^1 of 2 runs failed: fails/seed0 \(log: "):
        sweeps.run_sweep(load_sweep(path), launcher="submitit-local", parallel=2)
    out = capsys.readouterr().out
    assert _status(out, "fails", 0) == "failed: error: the fails variant went wrong"
    assert _status(out, "slow", 0) == "done"
    assert "error: the fails variant went wrong" in (tmp_path / "out" / "runs" / "fails" / "seed0.log").read_text()
    slow_log = (tmp_path / "out" / "runs" / "slow" / "seed0.log").read_text()
    assert slow_log.count("\n=== ") == 2 and "pass" in slow_log.split("\n=== ")[-1]  # started, then the resume
    with pytest.raises(RunStopped, match="1 of 2 runs failed: fails/seed0"):  # slow: a state, no summary here
        sweeps.run_sweep(load_sweep(path), launcher="submitit-local")
    out = capsys.readouterr().out
    assert (_status(out, "fails", 0), _status(out, "slow", 0)) == (
        "failed: error: the fails variant went wrong",
        "resumed",
    )
    assert actions.read_text().splitlines().count("fails/seed0 start submitit-local") == 2  # once a call


def test_a_slurm_job_asks_for_the_sweep_files_resources_and_a_process_per_gpu(tmp_path, monkeypatch, flat_smoke):
    """The sbatch script submitit writes for a run (a stand-in `sbatch` keeps it; `srun` only has to
    exist): the `slurm` section's resources, one task per GPU, and the fit told the same."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "srun").write_text("#!/bin/sh\n")
    (tools / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path / "script.sh"}\necho "Submitted batch job 42"\n')
    for tool in tools.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    resources = {
        "nodes": 2,
        "gpus_per_node": 4,
        "cpus_per_task": 8,
        "mem_gb": 64,
        "timeout_min": 90,
        "signal_delay_s": 120,
        "partition": "gpu",
        "additional": {"account": "abc"},
    }
    sweep = load_sweep(write_sweep(tmp_path, flat_smoke, slurm=resources))
    [run] = plan_runs(sweep)
    command = sweeps.fit_command(sweep, run, 1, "slurm")
    assert command[-2:] == ["fabric.devices=4", "fabric.num_nodes=2"]
    job = sweeps._Job(run, sweeps._executor(sweep, "slurm"), command, ["resume"])
    assert job.job.job_id == "42"
    script = (tmp_path / "script.sh").read_text()
    for option in (
        "--nodes=2",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--cpus-per-task=8",
        "--mem=64GB",
        "--time=90",
        "--signal=USR2@120",
        "--partition=gpu",
        "--account=abc",
        "--job-name=sweep",
    ):
        assert f"#SBATCH {option}\n" in script, option
    with pytest.raises(
        ConfigError, match="^--launcher submitit-local runs one node; the sweep file asks for slurm.nodes=2$"
    ):
        sweeps._executor(sweep, "submitit-local")
    monkeypatch.setenv("PATH", "/nonexistent")  # no SLURM: one line, exit status 2
    with pytest.raises(ConfigError, match='--launcher slurm: submitit cannot submit here: Could not detect "srun"'):
        sweeps._executor(sweep, "slurm")


def test_the_synthetic_data_is_generated_once_before_the_first_wave(tmp_path, monkeypatch, flat_smoke):
    """Two runs started side by side on a fresh data root both find the federation there."""
    root = tmp_path / "fresh"
    path = write_sweep(tmp_path, flat_smoke, seeds=[0, 1], overrides=[f"data.root={root}"])
    seen = tmp_path / "seen"
    script = "import pathlib, sys; open(sys.argv[1], 'a').write(f'{pathlib.Path(sys.argv[2]).is_dir()}\\n')"
    monkeypatch.setattr(
        sweeps, "fit_command", lambda sweep, run, parallel: [sys.executable, "-c", script, str(seen), str(root)]
    )
    main(["sweep", str(path), "--parallel", "2"])
    assert seen.read_text() == "True\nTrue\n" and (root / "synthetic.yaml").is_file()


@pytest.mark.parametrize(("seconds", "shown"), [(59.9, "59.9 s"), (59.96, "1 min 00 s"), (479.6, "8 min 00 s")])
def test_run_times_are_shown_in_whole_minutes_and_seconds(seconds, shown):
    assert sweeps._duration(seconds) == shown


def test_tables_only_rebuilds_the_tables_from_the_finished_runs(tmp_path, capsys, flat_smoke):
    path = write_sweep(
        tmp_path, flat_smoke, variants={"a": [], "b": ["method.condist=false"]}, comparisons=[["a", "b"]]
    )
    for run in plan_runs(load_sweep(path)):
        finish(run, ("summary.json",))
        run.folder.write_cases(federated_rows(0.1 if run.variant == "b" else 0.0, run.seed))
    assert main(["sweep", str(path), "--tables-only"]) == 0
    assert "tables of 2 of 2 runs" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [(r["variant"], r["class"], r["dice"]) for r in rows][:2] == [
        ("a", "liver", "0.7"),
        ("a", "liver_tumor", "0.5"),
    ]
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"- command: `lightning-fl sweep {path} --tables-only`" in md and "runs in these tables: 2 of 2\n" in md
    # one seed: seeds 1, cases 2, n 2; no interval over seeds, so no verdict
    assert "| test | liver | 1 | 2 | 2 | +0.100 | n/a | [+0.100, +0.100] | not shown |" in md


def test_a_full_disk_leaves_the_previous_tables_whole(tmp_path, capsys, monkeypatch, flat_smoke):
    """results.csv cannot be written: one line naming it, exit 2, and results.md and results.csv
    are both the previous ones (not new Markdown beside an old CSV), no temporary file left."""
    path = write_sweep(tmp_path, flat_smoke, variants={"a": []})
    for run in plan_runs(load_sweep(path)):
        finish(run, ("summary.json",))
    assert main(["sweep", str(path), "--tables-only"]) == 0
    out = tmp_path / "out"
    before = {name: (out / name).read_bytes() for name in ("results.md", "results.csv")}
    fill_disk_at(monkeypatch, "results.csv")
    monkeypatch.setattr(time, "strftime", lambda *_: "2027-01-01 00:00")  # results.md would differ
    capsys.readouterr()
    assert main(["sweep", str(path), "--tables-only"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"cannot write {out / 'results.csv'}: No space left on device" in lines[0], lines
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob(".*.tmp"))


# ---------------------------------------------------------------- end to end
def _dice_tables(results_md: str) -> str:
    """A sweep's results.md without its header (file, date, command) and its time table."""
    sections = re.split(r"^(?=## )", results_md, flags=re.M)[1:]
    return "".join(s for s in sections if not s.startswith("## Time"))


@pytest.mark.slow
def test_a_stopped_sweep_resumes_to_the_results_of_a_run_left_alone(cli, smoke_run, tmp_path):
    """A sweep of two runs through submitit's local executor (the SLURM launcher's path: the stop
    cancels the job) stopped (SIGTERM) in its second and started again: the first is skipped, the
    second resumed, and it ends with the weights and test scores of the session's smoke run, whose
    config it has (but for where it writes and what it logs): a stopped and resumed run ends where one
    left alone does, and the same config gives the same numbers in another process; the same sweep
    left alone by the local launcher writes the same tables. The sweep starts
    with SIGINT ignored, as a shell's background job does, which its jobs must not inherit
    (submitit-local cancels a job with SIGINT). The local launcher's stop and resume, step by step:
    the tests above."""
    variants = {"lr_low": ["optim.lr=0.003"], "smoke": []}  # apart from the first round on
    sweep = write_sweep(tmp_path, SMOKE, variants=variants, overrides=["logger.wandb.mode=disabled"])
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)  # started as `nohup ... &` starts it: SIGINT ignored
    try:
        process = cli.start("sweep", str(sweep), "--launcher=submitit-local")
    finally:
        signal.signal(signal.SIGINT, inherited)
    first, second = (tmp_path / "out" / "runs" / v / "seed0" for v in variants)
    deadline = time.monotonic() + 300
    try:
        while not (second / "state.ckpt").exists():
            assert process.poll() is None and time.monotonic() < deadline, (
                "the sweep ended or hung before its 2nd run saved"
            )
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # `kill PID`: the sweep stops its run (or cancels its job)
        out, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "lightning-fl sweep: stopped: interrupted; stopped smoke/seed0" in err, err[
        -3000:
    ]
    assert (first / "summary.json").is_file() and not (second / "summary.json").exists()
    finished_at = (first / "summary.json").stat().st_mtime_ns

    process = cli.start("sweep", str(sweep), "--launcher=submitit-local")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert (_status(out, "lr_low", 0), _status(out, "smoke", 0)) == ("skipped: finished before", "resumed")
    assert (first / "summary.json").stat().st_mtime_ns == finished_at
    assert "after_round: " in (second / "resumes.yaml").read_text()
    ours, theirs = (torch.load(run / "last.ckpt", weights_only=True)["model"] for run in (smoke_run, second))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # bitwise
    assert (smoke_run / "test_cases.csv").read_text() == (second / "test_cases.csv").read_text()
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    dice = {v: [r["dice"] for r in rows if r["variant"] == v] for v in variants}
    assert dice["lr_low"] and dice["lr_low"] != dice["smoke"]  # the comparison tells the two runs apart

    # the same sweep left alone by the local launcher writes the same tables (all but when and how long)
    (tmp_path / "alone").mkdir()
    alone = write_sweep(tmp_path / "alone", SMOKE, variants=variants, overrides=["logger.wandb.mode=disabled"])
    result = cli("sweep", str(alone))
    assert result.returncode == 0, result.stderr[-3000:]
    tables = [tmp_path / folder / "out" for folder in ("", "alone")]
    assert len({(folder / "results.csv").read_bytes() for folder in tables}) == 1
    assert len({_dice_tables((folder / "results.md").read_text()) for folder in tables}) == 1

    # the finished sweep's per-case Dice against each structure's size (experiments/tumour_size.py)
    result = cli.python("experiments/tumour_size.py", tmp_path / "out", "--classes", "liver", "liver_tumor")
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "out" / "dice_by_size.md").read_text()
    scored = [r for r in rows if r["phase"] == "test" and r["class"] == "liver" and r["dice"]]
    counts = [int(n) for n in re.findall(r"\((\d+)\)", table.split("### liver_tumor")[0])]
    assert sum(counts) == sum(int(r["cases"]) for r in scored)  # every liver case score in one size bin
    assert (tmp_path / "out" / "dice_by_size.png").stat().st_size > 0
    missing = cli.python("experiments/tumour_size.py", tmp_path / "nowhere")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
