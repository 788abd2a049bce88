"""The README is the way in: short, every relative link resolving, no path outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

from lightning_fl.config import CONFIG_DIR, config_changes, load_config
from lightning_fl.run_folder import RunFolder
from tests.helpers.runs import REPO, experiment_script

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
DOCUMENTS = [REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "configs" / "README.md"]


def _relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(path.read_text()) if "://" not in target]


def test_the_readme_is_short_and_its_links_resolve():
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= 120
    links = _relative_links(readme)
    assert len(links) >= 10  # the documentation table: every page is reachable from the README
    for path in DOCUMENTS:
        missing = [t for t in _relative_links(path) if not (path.parent / t).exists()]
        assert not missing, f"{path.relative_to(REPO)} links to missing files: {missing}"


def test_no_document_names_a_path_outside_the_repository():
    documents = [*DOCUMENTS, *sorted((REPO / "docs").rglob("*.md"))]
    for path in documents:
        text = path.read_text()
        assert "../shared" not in text and "/work/" not in text, path.relative_to(REPO)
        for target in _relative_links(path):
            assert (path.parent / target).resolve().is_relative_to(REPO), (path.relative_to(REPO), target)


def test_every_test_file_the_documents_name_exists():
    """The docs cite tests as evidence (`docs/reference/bad-input.md` for every row): each must exist,
    as a path under tests/ or a file name relative to it."""
    texts = [path.read_text() for path in [*DOCUMENTS, *sorted((REPO / "docs").rglob("*.md"))]]
    named = {name for text in texts for name in re.findall(r"\btests/([\w/]+\.py)", text)}
    named |= {name for text in texts for name in re.findall(r"`((?:[a-z]+/)?test_\w+\.py)`", text)}
    assert len(named) > 10
    missing = sorted(name for name in named if not (REPO / "tests" / name.removeprefix("tests/")).is_file())
    assert not missing, missing


def test_the_demo_blocks_are_the_committed_demo_runs():
    """The demo tables and their measurement lines in README.md (the demo) and
    docs/getting-started.md (the demo, on AVX2 too, and the 3D demo) are what experiments/readme_demo.py makes of
    the committed runs, so no document shows a run the repository does not hold."""
    readme_demo = experiment_script("readme_demo")
    for path in readme_demo.DOCUMENTS:
        text = path.read_text()
        assert text == readme_demo.written(text, path), path.relative_to(REPO)
    readme, started = ((REPO / name).read_text() for name in ("README.md", "docs/getting-started.md"))
    assert readme_demo.block_pattern("demo").search(readme)
    assert all(readme_demo.block_pattern(name).search(started) for name in readme_demo.DEMOS)


def test_the_committed_demo_runs_are_the_shipped_demo_configs():
    """Each committed demo run was made by its config as shipped (read as a resumed run reads it:
    keys added since take their defaults), so the tables above describe what `lightning-fl fit`
    runs today. Only where it was written, where the data lay, and what `auto` became on its
    machine may differ."""
    machine = ("output_dir", "data.root", "fabric.devices", "fabric.precision")
    shipped = (("demo", None), ("demo_avx2", None), ("demo_3d", CONFIG_DIR / "condistfl_synthetic.yaml"))
    for folder, config in shipped:
        saved = RunFolder(REPO / "experiments" / "results" / folder).read_config()
        changes = config_changes(load_config(config), saved, ignore=machine)
        assert not changes, (folder, changes)
