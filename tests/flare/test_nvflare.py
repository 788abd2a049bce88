"""The NVFlare deployment: the exported job, run in NVFlare's own simulator (a server and four site
processes talking through NVFlare), gives the model `fit` gives, bitwise in float32, in 3D and
(stopped and resumed) in 2D; a failing site is dropped in the same rounds as in `fit`; the
checkpoints it saves are read by evaluate, infer and export. Both runs pin one thread per process:
oneDNN's float32 sums depend on the thread count (see test_distributed.py)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

pytest.importorskip("nvflare", reason='the NVFlare tests need the extra: pip install "lightning-fl[nvflare]"')

from lightning_fl.cli import main  # noqa: E402
from lightning_fl.flare import CONFIG_FILE  # noqa: E402
from lightning_fl.flare.client import SiteStateStore  # noqa: E402
from lightning_fl.flare.server import ConDistFLController  # noqa: E402
from tests.helpers.cli import run_main  # noqa: E402
from tests.helpers.runs import EXACT, SMOKE, SMOKE_2D  # noqa: E402

SITES = ["liver", "spleen", "pancreas", "kidney"]


class Exported(NamedTuple):
    returncode: int
    stderr: str
    stdout: str


def _export_nvflare(*args: str) -> Exported:
    """`lightning-fl export-nvflare *args` in this process (NVFlare is imported once, not per call)."""
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = main(["export-nvflare", *args])
    return Exported(code, stderr.getvalue(), stdout.getvalue())


def _export(job: Path, run: Path, *overrides: str, options: tuple[str, ...] = (), config: Path = SMOKE) -> Exported:
    """The smoke config's job (or `config`'s), run into `run`, exactly (float32, no W&B)."""
    return _export_nvflare(
        "--config", str(config), "--output", str(job), *options, f"output_dir={run}", *EXACT, *overrides
    )


def _simulator(job: Path, workspace: Path, data_home: Path) -> tuple[list[str], dict[str, str]]:
    """`nvflare simulator` on the job, each site in a process of its own (`python3` on PATH: this one's)."""
    env = os.environ | {
        "LIGHTNING_FL_DATA": str(data_home),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    command = [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(workspace)]
    return [*command, "-c", ",".join(SITES), "-t", str(len(SITES))], env


def _simulate(job: Path, workspace: Path, data_home: Path) -> subprocess.CompletedProcess:
    command, env = _simulator(job, workspace, data_home)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _short_heartbeat(job: Path, timeout_s: float = 6.0) -> None:
    """The job's sites missing heartbeats for `timeout_s` (NVFlare's default: 30 s) are given up:
    a test job notices a killed site sooner; nothing else about the job changes."""
    for config in job.glob("app_*/config/config_fed_client.json"):
        content = json.loads(config.read_text())
        for executor in content["executors"]:
            executor["executor"]["args"] |= {"heartbeat_interval": 1.0, "heartbeat_timeout": timeout_s}
        config.write_text(json.dumps(content, indent=2))


def _model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _rows(run: Path, phases: tuple[str, ...]) -> list[dict[str, str]]:
    """metrics.csv's rows of those phases, without the note (a message may name an object's address)."""
    rows = csv.DictReader((run / "metrics.csv").open())
    return [{k: v for k, v in r.items() if k != "note"} for r in rows if r["phase"] in phases]


@pytest.mark.slow  # importing NVFlare: ~10 s
def test_the_job_holds_the_server_workflow_a_client_app_per_site_and_the_config(data_home, tmp_path):
    job, run = tmp_path / "job", tmp_path / "run"
    result = _export(
        job,
        run,
        options=("--site", "kidney=/data/kidney", "--site-state", "kidney=/state", "--task-timeout", "600"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((job / "meta.json").read_text())
    assert meta["deploy_map"] == {"app_server": ["server"]} | {f"app_{s}": [s] for s in SITES}
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    (workflow,) = server["workflows"]
    assert workflow["path"] == f"{ConDistFLController.__module__}.ConDistFLController"
    assert workflow["args"] == {"task_timeout": 600}
    saved = (job / "app_server" / "config" / CONFIG_FILE).read_text()
    assert f"output_dir: {run}" in saved and "precision: 32-true" in saved
    for site in SITES:
        app = job / f"app_{site}"
        assert (app / "config" / CONFIG_FILE).read_text() == saved
        assert not (app / "custom" / "lightning_fl").exists()  # the package is installed, not shipped
        (executor,) = json.loads((app / "config" / "config_fed_client.json").read_text())["executors"]
        command = executor["executor"]["args"]["command"]
        assert command[:3] == ["python3", "-u", "custom/site_script.py"]
        assert command[3:] == (["--data-root", "/data/kidney", "--state-dir", "/state"] if site == "kidney" else [])
        assert set(executor["tasks"]) == {"train", "validate"}

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(job.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700

    again = _export(job, run)
    assert again.returncode == 2 and f"{job} exists; pass --overwrite" in again.stderr
    replaced = _export(job, run, options=("--overwrite",))
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    (aside,) = tmp_path.glob("job.replaced-*")  # the old job is moved aside, never deleted
    assert f"moved the previous job {job} aside to {aside}" in replaced.stdout
    assert (aside / "app_server" / "config" / CONFIG_FILE).read_text() == saved
    # --overwrite replaces only a job: a run folder (or any other folder) is left as it is
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    refused = _export(run, tmp_path / "run2", options=("--overwrite",))
    assert refused.returncode == 2 and f"--output {run} is not a job written by export-nvflare" in refused.stderr
    assert (run / "notes.txt").read_text() == "mine" and not list(tmp_path.glob("run.replaced-*"))
    wrong = _export(tmp_path / "j2", run, options=("--site", "heart=/data"))
    assert wrong.returncode == 2 and "--site heart: not one of data.sites" in wrong.stderr
    alone = _export(tmp_path / "j3", run, "method=standalone")
    assert (
        alone.returncode == 2 and "method.training=standalone: an NVFlare job trains one global model" in alone.stderr
    )


@pytest.fixture(scope="module")
def simulated(reference_fit, data_home, tmp_path_factory) -> tuple[Path, Path]:
    """The smoke config trained by `fit` (the session's exact reference run) and by the exported job
    in the NVFlare simulator."""
    base = tmp_path_factory.mktemp("nvflare")
    flare_run, job = base / "flare", base / "job"
    assert _export(job, flare_run).returncode == 0
    result = _simulate(job, base / "workspace", data_home)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return reference_fit, flare_run


@pytest.mark.slow
def test_the_simulated_job_gives_the_model_of_fit_bitwise(simulated):
    fit_run, flare_run = simulated
    for name in ("last.ckpt", "best.ckpt"):
        ours, theirs = _model(fit_run / name), _model(flare_run / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
        fit_meta, flare_meta = (torch.load(r / name, weights_only=True) for r in (fit_run, flare_run))
        assert (flare_meta["round"], flare_meta["score"]) == (fit_meta["round"], fit_meta["score"])
        assert flare_meta["config"] == json.loads(json.dumps(flare_meta["config"]))  # the config rides along
    # the same training losses per site and round, the same validation Dice per site and class
    assert _rows(flare_run, ("train", "validation")) == _rows(fit_run, ("train", "validation"))
    summary = json.loads((flare_run / "summary.json").read_text())
    fit_summary = json.loads((fit_run / "summary.json").read_text())
    assert summary["best_round"] == fit_summary["best_round"]
    assert summary["best_validation_dice"] == fit_summary["best_validation_dice"]


@pytest.mark.slow
def test_evaluate_infer_and_export_take_the_checkpoints_the_job_saved(capsys, data_home, simulated, tmp_path):
    fit_run, flare_run = simulated
    evaluation = tmp_path / "eval"
    status, _, err = run_main(
        capsys,
        "evaluate",
        "--cross-site",
        "--output",
        evaluation,
        "--checkpoint",
        flare_run / "best.ckpt",
        fit_run / "best.ckpt",
    )
    assert status == 0, err[-3000:]
    rows = list(csv.DictReader((evaluation / "cross_site.csv").open()))
    models = list(dict.fromkeys(r["model"] for r in rows))
    assert len(models) == 2
    scores = [[(r["site"], r["class"], r["dice"]) for r in rows if r["model"] == m] for m in models]
    assert scores[0] == scores[1] and scores[0]  # the same weights score the same on every site
    image = next((data_home / "synthetic-smoke" / "liver" / "images").glob("*.nii.gz"))
    status, _, err = run_main(
        capsys, "infer", "--checkpoint", flare_run / "best.ckpt", "--input", image, "--output", tmp_path / "seg"
    )
    assert status == 0 and len(list((tmp_path / "seg").glob("*.nii.gz"))) == 1, err[-3000:]
    status, _, err = run_main(capsys, "export", "--checkpoint", flare_run / "last.ckpt", "--output", tmp_path / "ts")
    assert status == 0 and (tmp_path / "ts" / "model.ts").is_file(), err[-3000:]


def _site_processes(workspace: Path, site: str) -> list[int]:
    """The process ids of a site's script in the simulator's workspace (from Linux's /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            running = proc.name.isdigit() and b"custom/site_script.py" in (proc / "cmdline").read_bytes()
            if running and Path(os.readlink(proc / "cwd")).is_relative_to(workspace / site):
                pids.append(int(proc.name))
        except OSError:  # ended meanwhile, or another user's
            continue
    return pids


@pytest.mark.slow
def test_sites_that_cannot_start_or_die_are_dropped_and_the_others_go_on(data_home, tmp_path):
    """spleen's data root holds no datalist: it answers every round with why it cannot start;
    pancreas's process is killed once it has connected: NVFlare ends its tasks with an error. The
    two other sites carry the run (fl.min_sites=2) to its end, each round recording both drops."""
    run, job, workspace = tmp_path / "flare", tmp_path / "job", tmp_path / "workspace"
    (tmp_path / "empty").mkdir()
    data = [f"data.root={data_home / 'synthetic-smoke'}", "data.synthetic=null", "fl.min_sites=2"]
    exported = _export(job, run, *data, options=("--site", f"spleen={tmp_path / 'empty'}"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    _short_heartbeat(job)
    command, env = _simulator(job, workspace, data_home)
    simulator = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    watchdog = threading.Timer(600, os.killpg, (simulator.pid, signal.SIGKILL))  # a hung job fails the test, not CI
    watchdog.start()
    lines, killed = [], []
    for line in simulator.stdout:  # once pancreas's script has connected to its NVFlare client
        lines.append(line)
        if not killed and "trainer session established" in line and "fqcn=pancreas." in line:
            killed = _site_processes(workspace, "pancreas")
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
    simulator.wait()
    watchdog.cancel()
    log = "".join(lines)
    assert killed and simulator.returncode == 0, log[-4000:]
    dropped = [
        (r["round"], r["site"], r["note"])
        for r in csv.DictReader((run / "metrics.csv").open())
        if r["phase"] == "dropped"
    ]
    cannot_start = f"cannot start: datalist not found: {tmp_path / 'empty' / 'spleen.json'}"
    died = "NVFlare ended its task with EXECUTION_EXCEPTION (its process died, stopped sending heartbeats or raised)"
    assert sorted(dropped) == [(r, s, n) for r in "12" for s, n in (("pancreas", died), ("spleen", cannot_start))]
    validated = {r["site"] for r in csv.DictReader((run / "metrics.csv").open()) if r["phase"] == "validation"}
    assert validated == {"liver", "kidney"}
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2


@pytest.mark.slow
def test_a_2d_job_with_a_failing_site_resumed_after_the_server_stopped_gives_the_model_of_fit(cli, data_home, tmp_path):
    """The 2D smoke config (axial slices; the 3D job: the tests above). One of the spleen site's two
    training volumes is cut short: each round that draws it fails to load it, in fit and on NVFlare
    alike (nothing cached, so every draw reads the file), and the site is dropped for that round.
    The simulator is killed (server and sites at once) as soon as the run's state.ckpt holds round
    1, when the sites have trained round 2 already; the job exported with --resume continues after
    round 1, each site from its own saved optimizer state, and ends with fit's model, having dropped
    the site in the rounds fit drops it."""
    data = tmp_path / "data"
    shutil.copytree(data_home / "synthetic-smoke", data)
    broken = data / "spleen" / "images" / "spleen_000.nii.gz"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    bad = [f"data.root={data}", "data.synthetic=null", "data.check_before_fit=false", "data.cache_rate=0"]
    fit_run, run, states = tmp_path / "fit", tmp_path / "flare", tmp_path / "site-states"
    fitted = cli("fit", "--config", str(SMOKE_2D), f"output_dir={fit_run}", *EXACT, *bad, OMP_NUM_THREADS="1")
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    site_states = [f"--site-state={site}={states}" for site in SITES]
    assert _export(tmp_path / "job", run, *bad, options=tuple(site_states), config=SMOKE_2D).returncode == 0
    command, env = _simulator(tmp_path / "job", tmp_path / "workspace", data_home)
    simulator = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        while not (run / "state.ckpt").is_file() and simulator.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(simulator.pid, signal.SIGKILL)
        simulator.wait()
    assert torch.load(run / "state.ckpt", weights_only=True)["round"] == 1
    assert not (run / "summary.json").exists()
    assert sorted(p.name for p in states.glob("*/liver/*")) == ["round-0001.ckpt", "round-0002.ckpt"]

    config_too = _export_nvflare("--resume", str(run), "--config", str(SMOKE_2D), "--output", str(tmp_path / "j"))
    assert config_too.returncode == 2 and "--resume continues a run with its own config.yaml" in config_too.stderr
    job = tmp_path / "resumed"
    assert _export_nvflare("--resume", str(run), "--output", str(job), *site_states).returncode == 0
    result = _simulate(job, tmp_path / "workspace-2", data_home)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    for site in SITES:
        assert f"site {site}: continuing from its state after round 1" in log
    for name in ("last.ckpt", "best.ckpt"):
        ours, theirs = _model(fit_run / name), _model(run / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert _rows(run, ("train", "validation")) == _rows(fit_run, ("train", "validation"))
    dropped = _rows(run, ("dropped",))
    assert dropped and {r["site"] for r in dropped} == {"spleen"} and dropped == _rows(fit_run, ("dropped",))
    note = next(r for r in csv.DictReader((run / "metrics.csv").open()) if r["phase"] == "dropped")["note"]
    assert "LoadImaged" in note
    assert "after_round: 1" in (run / "resumes.yaml").read_text()
    assert (run / "summary.json").is_file()  # the run went on to its end


def test_a_site_keeps_the_states_a_resumed_job_can_need(tmp_path):
    """Its states after the server's saved round (it may have trained past it), and the newest up
    to that round: the one a resumed job, starting at the next round, continues from."""
    store = SiteStateStore(tmp_path, "liver")
    for trained, saved in [(1, 0), (2, 0), (3, 1), (4, 3), (5, 3)]:  # (round trained, round state.ckpt holds)
        store.save("run-a", trained, {"step": torch.tensor(trained)}, saved)
    assert sorted(p.name for p in (tmp_path / "run-a" / "liver").iterdir()) == [
        "round-0003.ckpt",
        "round-0004.ckpt",
        "round-0005.ckpt",
    ]
    resumed_at, saved_state = store.load("run-a", before=4)
    assert resumed_at == 3 and saved_state["step"].item() == 3
    assert store.load("run-a", before=1) is None and store.load("run-b", before=4) is None
    store.save("run-a", 10, {"step": torch.tensor(10)}, saved_round=9)  # it missed rounds 6 to 9: 5 is kept
    assert sorted(p.name for p in (tmp_path / "run-a" / "liver").iterdir()) == ["round-0005.ckpt", "round-0010.ckpt"]
