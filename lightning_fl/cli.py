"""`lightning-fl` (also `python -m lightning_fl`): the project's commands.

lightning-fl fit   [--config FILE] [--overwrite] [dotted.key=value ...]   train a federation (default: the demo)
lightning-fl fit   --resume RUN_DIR [--allow-config-change] [key=value ...]   continue a run
lightning-fl synth --out DIR [--config FILE] [key=value ...] write the synthetic federation
lightning-fl check-data [--config FILE] [key=value ...]      check every site's data, list all problems
lightning-fl prepare-data --task T --src DIR --dst DIR [--datalist F] [--seed N]   a published dataset → a site
lightning-fl evaluate --checkpoint CKPT [CKPT ...] (--datalist F [--label-map NAME] | --cross-site)   Dice tables
lightning-fl infer    --checkpoint CKPT_OR_TS --input FILE_OR_DIR --output DIR [--probabilities]     label maps
lightning-fl export   --checkpoint CKPT --output DIR [--overwrite]    TorchScript model.ts + metadata.json
lightning-fl sweep    FILE [--parallel N] [--launcher L] [--rerun-changed] [--tables-only]   variants × seeds
lightning-fl export-nvflare [--config FILE] [key=value ...] --output JOB_DIR [--site NAME=DATA_ROOT ...]   NVFlare job
lightning-fl export-nvflare --resume RUN_DIR --output JOB_DIR [--site NAME=DATA_ROOT ...]   the job continuing a run
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from lightning_fl.config import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    ConfigError,
    all_sites,
    config_changes,
    load_config,
    with_overrides,
)
from lightning_fl.errors import DatalistError, RunStopped, UserInputError
from lightning_fl.labels import LabelSpace
from lightning_fl.run_folder import RunFolder, SweepFolder
from lightning_fl.sweep_plan import LAUNCHERS

USER_ERRORS = (UserInputError, FileExistsError, FileNotFoundError)
BEST, LAST = RunFolder.model_file("best"), RunFolder.model_file("last")
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # dotted.key=value


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"experiment config (default: {CONFIG_DIR / DEFAULT_CONFIG})",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. fl.rounds=4")


def _fit(args: argparse.Namespace) -> None:
    if args.resume is None:
        cfg = load_config(args.config, args.overrides)  # config mistakes surface before the heavy imports
        from lightning_fl.federation import run_fit

        run_fit(cfg, overwrite=args.overwrite)
        return
    if args.config is not None:
        raise ConfigError(f"--resume continues a run with its own {RunFolder.CONFIG}; --config cannot be given with it")
    if args.overwrite:
        raise ConfigError(
            "--overwrite starts a new run in place of the old one, --resume continues it: give one of them"
        )
    folder = RunFolder(args.resume)
    original = folder.read_config()
    cfg = with_overrides(original, args.overrides + [f"output_dir={args.resume}"], str(folder.config))
    changed = config_changes(original, cfg, ignore=("output_dir",))
    if changed and not args.allow_config_change:
        raise ConfigError(
            f"--resume {args.resume}: the overrides change the run's config ({', '.join(changed)}); "
            f"pass --allow-config-change to continue with them anyway (it is recorded in {RunFolder.RESUMES})"
        )
    from lightning_fl.federation import Resume, run_fit

    run_fit(cfg, resume=Resume(changed, args.overrides))


def _synth(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    from lightning_fl.data.synthetic import write_federation

    if cfg.data.synthetic is None:
        raise ConfigError(f"{args.config}: data.synthetic is not set, nothing to generate")
    labels = LabelSpace.of(cfg.labels)
    sites = all_sites(cfg)
    write_federation(args.out, cfg.data.synthetic, sites, labels, progress=cfg.logger.progress)
    print(f"wrote the synthetic federation ({', '.join(s.name for s in sites)}) to {args.out}")


def _check_data(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    from lightning_fl.data.datasets import prepare_data_root
    from lightning_fl.data.validation import DataCheckError, check_federation

    labels = LabelSpace.of(cfg.labels)
    root = Path(cfg.data.root).expanduser()
    if cfg.data.synthetic is not None and not root.exists():  # a mistyped path is not filled with a federation
        raise DatalistError(
            f"data.root {root} does not exist; check-data checks data that is there (fit generates the "
            "synthetic federation on first use, `lightning-fl synth --out DIR` writes one)"
        )
    root = prepare_data_root(cfg, labels)
    problems = check_federation(root, cfg, labels)
    if problems:
        raise DataCheckError(problems)
    print(f"data OK: {', '.join(s.name for s in all_sites(cfg))} under {root}")


def _prepare_data(args: argparse.Namespace) -> None:
    cfg = load_config(args.config)  # the label space to map onto
    from lightning_fl.data.prepare import prepare_task

    labels = LabelSpace.of(cfg.labels)
    listing = prepare_task(
        args.task, args.src, args.dst, labels, seed=args.seed, datalist=args.datalist, progress=cfg.logger.progress
    )
    splits = {key: len(value) for key, value in json.loads(listing.read_text()).items() if isinstance(value, list)}
    print(f"wrote {listing} ({', '.join(f'{k} {n}' for k, n in splits.items())})")


def _evaluate(args: argparse.Namespace) -> None:
    # `--checkpoint A B key=value`: argparse gives the overrides to --checkpoint; take them back
    overrides = [str(p) for p in args.checkpoint if OVERRIDE.match(str(p)) and not p.exists()]
    args.checkpoint = [p for p in args.checkpoint if str(p) not in overrides]
    args.overrides += overrides
    if not args.checkpoint:
        raise ConfigError(f"--checkpoint needs at least one model file ({BEST}, {LAST} or model.ts)")
    if args.cross_site == (args.datalist is not None):
        raise ConfigError(
            "give either --datalist FILE (one test set) or --cross-site (every site of the model's config)"
        )
    if args.label_map is not None and args.cross_site:
        raise ConfigError(
            "--label-map reads a --datalist in another label scheme; --cross-site uses the sites' own labels"
        )
    from lightning_fl.evaluation import evaluate_models

    evaluate_models(
        args.checkpoint,
        args.overrides,
        args.output,
        split=args.split,
        datalist=args.datalist,
        label_map_name=args.label_map,
        cross_site=args.cross_site,
    )


def _infer(args: argparse.Namespace) -> None:
    """Every input that passes the input checks gets its maps; a bad one (of several) is skipped
    with a line saying why, and the command then exits 2 naming every skipped input."""
    from tqdm.auto import tqdm

    from lightning_fl.data.validation import printable
    from lightning_fl.inference import check_output_names, infer_file, load_trained, nifti_inputs

    inputs = nifti_inputs(args.input)
    if any(p.resolve().parent == args.output.resolve() for p in inputs):
        raise ConfigError(f"--output {args.output} holds the inputs; choose another folder so no input is overwritten")
    check_output_names(inputs, args.output, args.probabilities)
    model = load_trained(args.checkpoint, args.overrides)
    done, skipped = 0, []
    for source in tqdm(inputs, desc="infer", unit="volume", disable=None if model.cfg.logger.progress else True):
        try:
            infer_file(model, source, args.output, probabilities=args.probabilities)
            done += 1
        except DatalistError as err:
            if len(inputs) == 1:
                raise
            skipped.append(source.name)
            tqdm.write(printable(f"lightning-fl {args.command}: skipped {source.name}: {err}"), file=sys.stderr)
    if done:
        plural = "s" if done > 1 else ""
        also = f" and {done} probability map{plural}" if args.probabilities else ""
        print(f"wrote {done} label map{plural}{also} to {args.output}")
    if skipped:
        raise DatalistError(f"skipped {len(skipped)} of {len(inputs)} inputs: {', '.join(skipped)}")


def _export(args: argparse.Namespace) -> None:
    from lightning_fl.inference import export_torchscript, load_trained

    model = load_trained(args.checkpoint, args.overrides, accelerator="cpu")  # the config keeps its own
    ts_path, meta_path = export_torchscript(model, args.output, args.overwrite)
    print(f"wrote {ts_path} and {meta_path}")


def _export_nvflare(args: argparse.Namespace) -> None:
    if args.resume is None:
        cfg = load_config(args.config, args.overrides)
    elif args.config is not None or args.overrides or args.overwrite:
        raise ConfigError(
            f"--resume continues a run with its own {RunFolder.CONFIG}: "
            "--config, overrides and --overwrite cannot be given with it"
        )
    else:
        cfg = RunFolder(args.resume).read_config()
    roots, state_dirs = _site_paths("--site", args.site), _site_paths("--site-state", args.site_state)
    if args.task_timeout < 0:
        raise ConfigError(f"--task-timeout: expected seconds ≥ 0 (0: wait for ever), got {args.task_timeout}")
    try:
        from lightning_fl.flare.job import export_job
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("nvflare"):
            raise
        raise ConfigError('export-nvflare needs NVIDIA FLARE: pip install "lightning-fl[nvflare]"') from err
    job = export_job(
        cfg, args.output, roots, args.task_timeout, args.overwrite, state_dirs, resume=args.resume is not None
    )
    sites = ",".join(s.name for s in cfg.data.sites)
    print(f"wrote the NVFlare job {job}; try it with: nvflare simulator {job} -w /tmp/nvflare-ws -c {sites}")


def _site_paths(option: str, items: list[str]) -> dict[str, str]:
    """`NAME=PATH` options, by site name."""
    paths = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{option} {item}: expected NAME=PATH, e.g. {option} liver=/data/liver")
        paths[name] = path
    return paths


def _sweep(args: argparse.Namespace) -> None:
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError(f"--parallel: expected how many runs train at once, a whole number ≥ 1, got {args.parallel}")
    if args.tables_only and args.rerun_changed:
        raise ConfigError("--tables-only trains nothing; --rerun-changed cannot be given with it")
    from lightning_fl.sweep import run_sweep
    from lightning_fl.sweep_plan import load_sweep

    flags = (
        ([f"--parallel={args.parallel}"] if args.parallel is not None else [])
        + ([f"--launcher={args.launcher}"] if args.launcher != "local" else [])
        + (["--rerun-changed"] if args.rerun_changed else [])
        + (["--tables-only"] if args.tables_only else [])
    )
    run_sweep(
        load_sweep(args.file),
        parallel=args.parallel,
        rerun_changed=args.rerun_changed,
        tables_only=args.tables_only,
        command=shlex.join(["lightning-fl", "sweep", str(args.file), *flags]),
        launcher=args.launcher,
    )


def build_parser() -> argparse.ArgumentParser:
    """The `lightning-fl` argument parser: one subcommand per command, each bound to the function it runs."""
    parser = argparse.ArgumentParser(prog="lightning-fl", description="Federated ConDistFL segmentation")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="train a federation from a config")
    _config_args(fit)
    fit.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help=f"continue a run from its last complete round ({RunFolder.STATE}), with its config",
    )
    fit.add_argument(
        "--allow-config-change",
        action="store_true",
        help=f"with --resume: accept overrides that change the config (recorded in {RunFolder.RESUMES})",
    )
    fit.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an output_dir that holds files: the old folder is moved aside to "
        "<output_dir>.replaced-<date-time> (nothing is deleted)",
    )
    fit.set_defaults(run=_fit)
    synth = commands.add_parser("synth", help="write the synthetic federation (NIfTI + datalists)")
    synth.add_argument("--out", type=Path, required=True, help="folder to create")
    _config_args(synth)
    synth.set_defaults(run=_synth)
    check = commands.add_parser("check-data", help="check every site's datalist, images and labels")
    _config_args(check)
    check.set_defaults(run=_check_data)
    prepare = commands.add_parser(
        "prepare-data", help="a published dataset (MSD, KiTS19, AMOS22) → a site folder and datalist"
    )
    prepare.add_argument(
        "--task", required=True, help="a task of configs/prepare/tasks.yaml: liver, spleen, pancreas, kidney, amos"
    )
    prepare.add_argument("--src", type=Path, required=True, help="the dataset in its published layout")
    prepare.add_argument("--dst", type=Path, required=True, help="the data root: DST/<task>/ and DST/<task>.json")
    prepare.add_argument("--datalist", type=Path, default=None, help="reuse the splits of an existing datalist")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the 60/20/20 split")
    prepare.add_argument(
        "--config", type=Path, default=None, help="config whose label space to map onto (default: the demo's)"
    )
    prepare.set_defaults(run=_prepare_data)
    evaluate = commands.add_parser(
        "evaluate", help="per-class Dice of one or more models on a test set, or across sites"
    )
    evaluate.add_argument("--checkpoint", type=Path, nargs="+", required=True, help=f"{BEST} / {LAST} / model.ts files")
    evaluate.add_argument("--datalist", type=Path, default=None, help="datalist JSON of the test set (MSD layout)")
    evaluate.add_argument(
        "--split", default="testing", choices=("training", "validation", "testing"), help="default: testing"
    )
    evaluate.add_argument(
        "--label-map",
        default=None,
        metavar="NAME",
        help="labels in another scheme: a task of configs/prepare/tasks.yaml, e.g. totalsegmentator",
    )
    evaluate.add_argument(
        "--cross-site",
        action="store_true",
        help="every model on every site of the (first) model's config: CSV matrix and heatmap",
    )
    evaluate.add_argument(
        "--output",
        type=Path,
        default=Path("evaluation"),
        help="folder for the JSON, CSV and PNG (default: ./evaluation)",
    )
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=DIR eval.sw_batch_size=2")
    evaluate.set_defaults(run=_evaluate)
    infer = commands.add_parser("infer", help="label maps on each input's own grid")
    infer.add_argument("--checkpoint", type=Path, required=True, help=f"{BEST} / {LAST}, or model.ts from export")
    infer.add_argument("--input", type=Path, required=True, help="a NIfTI file or a folder of them")
    infer.add_argument(
        "--output", type=Path, required=True, help="folder for <name>.nii.gz (and <name>_probabilities.nii.gz)"
    )
    infer.add_argument("--probabilities", action="store_true", help="also write per-class softmax probabilities")
    infer.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. fabric.accelerator=cpu eval.overlap=0.25"
    )
    infer.set_defaults(run=_infer)
    export = commands.add_parser("export", help="TorchScript model.ts with a MONAI-bundle-style metadata.json")
    export.add_argument("--checkpoint", type=Path, required=True, help=f"{BEST} or {LAST} of a run")
    export.add_argument("--output", type=Path, required=True, help="folder for model.ts and metadata.json")
    export.add_argument(
        "--overwrite", action="store_true", help="replace an export in --output (its files are moved aside)"
    )
    export.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.roi_size=[96,96,64]"
    )
    export.set_defaults(run=_export)
    sweep = commands.add_parser(
        "sweep", help="every variant × seed of a sweep file as a fit run (resumable), then tables"
    )
    sweep.add_argument("file", type=Path, help="sweep YAML: base, seeds, variants, overrides, comparisons, output_dir")
    sweep.add_argument(
        "--parallel",
        type=int,
        default=None,
        metavar="N",
        help="runs at once (default 1; with --launcher slurm every run); locally with N > 1 each gets one "
        "process and cores/N threads",
    )
    sweep.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="local",
        help="local: a process per run here (default); slurm: a SLURM job per run, submitted with submitit "
        "with the sweep file's `slurm` resources; submitit-local: the same jobs on this machine",
    )
    sweep.add_argument(
        "--rerun-changed",
        action="store_true",
        help=f"train again the runs whose {RunFolder.CONFIG} differs from what the sweep file now gives "
        "(their folders are moved aside)",
    )
    sweep.add_argument(
        "--tables-only",
        action="store_true",
        help=f"rebuild {SweepFolder.RESULTS_CSV} and {SweepFolder.RESULTS_MD} from the finished runs, train nothing",
    )
    sweep.set_defaults(run=_sweep)
    flare = commands.add_parser(
        "export-nvflare", help="the config as an NVIDIA FLARE job (server workflow + one Client API app per site)"
    )
    _config_args(flare)
    flare.add_argument("--output", type=Path, required=True, help="the job folder to write")
    flare.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME=DATA_ROOT",
        help="a site's data root on its own machine (repeat per site; default: the config's data.root)",
    )
    flare.add_argument(
        "--task-timeout",
        type=int,
        default=0,
        metavar="SECONDS",
        help="how long a round waits for the sites; one that has not answered is dropped for the round (0: for ever)",
    )
    flare.add_argument(
        "--site-state",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="where a site keeps its optimizer state between rounds, on its own machine (repeat per site; "
        "default: ~/.cache/lightning_fl/nvflare-sites)",
    )
    flare.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help=f"a job that continues this run (its {RunFolder.CONFIG}) from its last saved round, after the server "
        "stopped",
    )
    flare.add_argument("--overwrite", action="store_true", help="replace the job folder if it exists")
    flare.set_defaults(run=_export_nvflare)
    return parser


def _user_error(err: BaseException | None) -> BaseException | None:
    """The first input error in an exception's chain of causes."""
    while err is not None and not isinstance(err, USER_ERRORS):
        err = err.__cause__
    return err


def _one_message(err: BaseException) -> str:
    """The error's message on one line (a newline in a file name escaped), or the list of data problems."""
    from lightning_fl.data.validation import DataCheckError, printable

    return str(err) if isinstance(err, DataCheckError) else printable(str(err))


def main(argv: list[str] | None = None) -> int:
    """Run one `lightning-fl` command; exit status 0 done, 1 stopped, 2 a user error (one line, no traceback)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except RunStopped as err:
        print(f"lightning-fl {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a user error may arrive wrapped, e.g. by a MONAI transform
        cause = _user_error(err)
        if cause is None:
            raise
        print(f"lightning-fl {args.command}: error: {_one_message(cause)}", file=sys.stderr)
        return 2
    return 0
