"""`lightning-fl export-nvflare`: the run's config as an NVFlare job, built with NVFlare's Job API.

The server app runs `server.ConDistFLController`; each site's app runs `site_script.py` through
NVFlare's Client API in a process of its own, with its data root as the job parameter. The run's
resolved config travels in every app's config folder; the code does not (every machine installs
`lightning-fl[nvflare]`), so the job holds no copy of the package to drift from it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from nvflare.client.config import ExchangeFormat
from nvflare.job_config.api import FedJob
from nvflare.job_config.script_runner import FrameworkType, ScriptRunner
from omegaconf import DictConfig

from lightning_fl.checkpoint import OutputError, RunFolderError, atomic_write_text, move_aside, umask_mode
from lightning_fl.config import ConfigError, to_yaml
from lightning_fl.data.datasets import prepare_data_root
from lightning_fl.flare import CONFIG_FILE, TRAIN, VALIDATE
from lightning_fl.flare.server import ConDistFLController
from lightning_fl.labels import LabelSpace

SITE_SCRIPT = Path(__file__).with_name("site_script.py")
JOB_NAME = "lightning-fl"


def export_job(
    cfg: DictConfig,
    output: Path,
    data_roots: dict[str, str],
    task_timeout: int = 0,
    overwrite: bool = False,
    state_dirs: dict[str, str] | None = None,
    resume: bool = False,
) -> Path:
    """Write the NVFlare job of `cfg` to `output` (what `nvflare simulator` and `nvflare job submit`
    take); returns it. `data_roots` and `state_dirs`: site → its data root and the folder it keeps
    its optimizer state in, on its own machine (defaults: `data.root`, `client.DEFAULT_STATE_DIR`).
    `resume`: the job continues the run in `output_dir` from its last saved round."""
    state_dirs = state_dirs or {}
    if cfg.method.training != "federated":
        raise ConfigError(
            f"method.training={cfg.method.training}: an NVFlare job trains one global model across the "
            "sites (federated); standalone and centralized training are simulations, run them with fit"
        )
    sites = [s.name for s in cfg.data.sites]
    for option, given in (("--site", data_roots), ("--site-state", state_dirs)):
        unknown = sorted(set(given) - set(sites))
        if unknown:
            raise ConfigError(f"{option} {unknown[0]}: not one of data.sites {sites}")
    if output.exists():
        _check_replaceable(output, overwrite)
    if cfg.data.synthetic is not None:  # generated once here, before the sites start (the simulator, POC)
        prepare_data_root(cfg, LabelSpace.of(cfg.labels))

    output = output.absolute()
    job = FedJob(name=JOB_NAME, min_clients=cfg.fl.min_sites)
    job.set_app_packages(["lightning_fl"])
    job.to_server(ConDistFLController(task_timeout=task_timeout, resume=resume))
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        # NVFlare places a script by its path relative to sys.path or the working directory: given
        # from its own folder, it lands at custom/site_script.py, where the site's command runs it
        os.chdir(tmp)
        try:
            shutil.copy(SITE_SCRIPT, SITE_SCRIPT.name)
            atomic_write_text(Path(CONFIG_FILE), to_yaml(cfg))
            job.add_file_to_server(CONFIG_FILE, app_folder_type="config")
            for site in sites:
                runner = ScriptRunner(
                    script=SITE_SCRIPT.name,
                    script_args=_site_args(data_roots.get(site), state_dirs.get(site)) or "",
                    launch_external_process=True,  # one process per site: its own seeds, threads and memory
                    framework=FrameworkType.PYTORCH,
                    server_expected_format=ExchangeFormat.PYTORCH,
                )
                job.to(runner, site, tasks=[TRAIN, VALIDATE])
                job.add_file_to(CONFIG_FILE, site, app_folder_type="config")
            _write(job, output)
        finally:
            os.chdir(here)
    return output


def _site_args(data_root: str | None, state_dir: str | None) -> list[str]:
    """The site script's options: the site's paths on its own machine, where given."""
    args = ["--data-root", data_root] if data_root else []
    return args + (["--state-dir", state_dir] if state_dir else [])


def _check_replaceable(output: Path, overwrite: bool) -> None:
    """An existing `output` may be replaced only when asked to and only if it is a job this command
    wrote (its meta.json and the server app's config): never a run, a data folder or `.`."""
    if not output.is_dir():
        raise RunFolderError(f"--output {output} is a file; expected a folder for the job (or a new path)")
    if not overwrite:
        raise RunFolderError(f"{output} exists; pass --overwrite to replace the job there (it is moved aside)")
    if not ((output / "meta.json").is_file() and (output / "app_server" / "config" / CONFIG_FILE).is_file()):
        raise RunFolderError(
            f"--output {output} is not a job written by export-nvflare (no meta.json and "
            f"app_server/config/{CONFIG_FILE}); it is left as it is: choose another --output"
        )


def _write(job: FedJob, output: Path) -> None:
    """Export into a staging folder beside `output`, then move it in place: never half a job. A job
    already there (checked by `_check_replaceable`) is moved aside, never deleted."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        job.export_job(str(staging))
        exported = staging / JOB_NAME
        for folder in (exported, *(p for p in exported.rglob("*") if p.is_dir())):
            folder.chmod(umask_mode())
        if output.exists():
            print(f"moved the previous job {output} aside to {move_aside(output)}")
        exported.rename(output)
    except OSError as err:
        raise OutputError(f"cannot write the job to {output}: {err.strerror or err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
