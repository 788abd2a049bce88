"""Write the README's demo block from the committed demo run (`experiments/results/demo`): the
console table `lightning-fl fit` printed at its end, and how and where it was measured, so the
README shows what the run folder holds and nothing typed by hand. `tests/test_docs.py` checks
that they agree.

    lightning-fl fit --overwrite output_dir=experiments/results/demo   # the demo run (models not committed)
    python experiments/readme_demo.py                                  # its block in README.md
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from lightning_fl.checkpoint import atomic_write_text
from lightning_fl.results import summary_table
from lightning_fl.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "experiments" / "results" / "demo"
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- demo:begin.*?-->\n)(.*?)(<!-- demo:end -->)", re.DOTALL)


def demo_block(folder: Path = DEMO) -> str:
    """The demo's final table and a line on its configuration, device, precision and wall time."""
    run = RunFolder(folder)
    summary, cfg = run.read_summary(), OmegaConf.load(run.config)
    minutes, seconds = divmod(round(summary["wall_time_s"]), 60)
    dims = f"{len(cfg.model.strides[0])}D"
    return (
        f"```{summary_table(summary)}\n```\n\n"
        f"Seed {cfg.seed}, {dims} network ({cfg.model.filters[0]} base filters), {cfg.fl.rounds} rounds × "
        f"{cfg.fl.local_steps} local steps per site, {summary['precision']} on {summary['device']}: "
        f"{minutes} min {seconds:02d} s of `fit` (written from `{folder.relative_to(REPO)}` by "
        f"`experiments/readme_demo.py`).\n"
    )


def main() -> None:
    text = README.read_text()
    if not BLOCK.search(text):
        raise SystemExit(f"{README}: no '<!-- demo:begin -->' … '<!-- demo:end -->' block to write")
    atomic_write_text(README, BLOCK.sub(lambda m: m.group(1) + demo_block() + m.group(3), text))
    print(f"wrote the demo block of {README}")


if __name__ == "__main__":
    main()
