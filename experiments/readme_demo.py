"""Write the demo blocks of the README and of docs/getting-started.md from the committed demo runs:
the console table `lightning-fl fit` printed at its end, and how and where it was measured, so the
documents show what the run folders hold and nothing typed by hand. `tests/test_docs.py` checks
that they agree.

    lightning-fl fit --overwrite output_dir=experiments/results/demo        # the demo (2D; models not committed)
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        lightning-fl fit --overwrite output_dir=experiments/results/demo_avx2  # the same on AVX2 (float32)
    lightning-fl fit --config configs/condistfl_synthetic.yaml --overwrite output_dir=experiments/results/demo_3d
    python experiments/readme_demo.py                                       # their blocks in the documents
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from lightning_fl.checkpoint import atomic_write_text
from lightning_fl.results import summary_table
from lightning_fl.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
# block name → run folder: the demo, the same on a CPU held to AVX2 (float32), the 3D demo
DEMOS = {"demo": RESULTS / "demo", "demo-avx2": RESULTS / "demo_avx2", "demo-3d": RESULTS / "demo_3d"}
DOCUMENTS = [REPO / "README.md", REPO / "docs" / "getting-started.md"]


def block_pattern(name: str) -> re.Pattern[str]:
    """`<!-- NAME:begin ... -->` (kept), the block, `<!-- NAME:end -->` (kept)."""
    return re.compile(rf"(<!-- {name}:begin.*?-->\n)(.*?)(<!-- {name}:end -->)", re.DOTALL)


def demo_block(folder: Path) -> str:
    """A demo run's final table and a line on its configuration, device, precision and wall time."""
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


def written(text: str, source: Path) -> str:
    """`text` with every demo block it holds rewritten; it must hold at least one."""
    found = [name for name in DEMOS if block_pattern(name).search(text)]
    if not found:
        raise SystemExit(f"{source}: no '<!-- demo:begin -->' … '<!-- demo:end -->' block to write")
    for name in found:
        match = block_pattern(name).search(text)
        text = text[: match.start(2)] + demo_block(DEMOS[name]) + text[match.end(2) :]
    return text


def main() -> None:
    for path in DOCUMENTS:
        atomic_write_text(path, written(path.read_text(), path))
        print(f"wrote the demo blocks of {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
