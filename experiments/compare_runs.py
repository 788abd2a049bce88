"""One table of several finished runs that are not a sweep (probes of one setting at a time): each
run's test Dice per class and its mean, its best round, how far its validation curve moved over the
last quarter of the rounds, its wall time, device and precision, and each run's config changes
against the first run's. Reads the run folders' records (summary.json, metrics.csv, config.yaml);
writes FILE as markdown with the command that made it.

    python experiments/compare_runs.py --output experiments/results/testbed_compute/compared.md \
        testbed=experiments/results/testbed/runs/centralized/seed0 \
        32-filters=experiments/results/testbed_compute/filters32 ...   # the first run is the reference
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lightning_fl.checkpoint import atomic_write_text
from lightning_fl.config import config_changes
from lightning_fl.errors import UserInputError
from lightning_fl.results import run_costs, run_mean
from lightning_fl.run_folder import RunFolder

IGNORED = ("output_dir", "logger.wandb.name", "logger.wandb.group", "logger.wandb.job_type", "logger.progress")


def read_runs(pairs: list[str]) -> dict[str, RunFolder]:
    """NAME=FOLDER pairs → finished run folders, in order; a folder that is not a finished run is refused."""
    runs = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        folder = RunFolder(Path(path))
        if not sep or not name:
            raise UserInputError(f"'{pair}': expected NAME=RUN_FOLDER")
        if not folder.is_finished:
            raise UserInputError(f"{path}: not a finished run (no summary.json and test_cases.csv written whole)")
        runs[name] = folder
    return runs


def comparison(runs: dict[str, RunFolder]) -> str:
    """The markdown table: classes, then the mean, best round, last-quarter change, time, device; then
    what each run changed against the first."""
    names = list(runs)
    summaries = {name: folder.read_summary() for name, folder in runs.items()}
    configs = {name: folder.read_config() for name, folder in runs.items()}
    folders = {(name, 0): folder for name, folder in runs.items()}
    costs = {name: cost for (name, _), cost in run_costs(folders, configs).items()}
    classes = list(summaries[names[0]]["test_dice"])
    rows = [[c, *(cell(summaries[n]["test_dice"].get(c)) for n in names)] for c in classes]
    rows.append(["mean", *(cell(run_mean(summaries[n]["test_dice"])) for n in names)])
    rows.append(["best round", *(f"{summaries[n]['best_round']} of {summaries[n]['rounds']}" for n in names)])
    rows.append(["last-quarter change", *(f"{costs[n]['tail_change']:.3f}" for n in names)])
    rows.append(["min per run", *(f"{costs[n]['wall_s'] / 60:.1f}" for n in names)])
    rows.append(["device, precision", *(f"{costs[n]['device']}, {costs[n]['precision']}" for n in names)])
    lines = ["| test Dice | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    first = configs[names[0]]
    lines.append("")
    for name in names[1:]:
        cfg = configs[name]
        changes = config_changes(first, cfg, ignore=IGNORED)
        shown = ", ".join(f"`{k}={command_line_value(OmegaConf.select(cfg, k))}`" for k in changes) or "nothing"
        lines.append(f"- {name}: {shown} (against {names[0]})")
    return "\n".join(lines) + "\n"


def cell(dice: float | None) -> str:
    """A Dice to 3 decimals; n/a where no case holds the class (None or NaN)."""
    return "n/a" if dice is None or math.isnan(dice) else f"{dice:.3f}"


def command_line_value(value: object) -> object:
    """A config value as it is written on the command line (lists without spaces)."""
    if OmegaConf.is_config(value):
        return str(OmegaConf.to_container(value)).replace(" ", "")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER, the first the reference")
    parser.add_argument("--output", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--title", default="Runs compared", help="the file's heading")
    args = parser.parse_args(argv)
    try:
        runs = read_runs(args.runs)
    except UserInputError as err:
        print(f"compare_runs: error: {err}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "experiments/compare_runs.py", *(argv if argv is not None else sys.argv[1:])])
    atomic_write_text(args.output, f"# {args.title}\n\nWritten by `{command}`.\n\n{comparison(runs)}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
