"""Several processes: placement of sites on ranks, per-site randomness, and real gloo runs that
must match one process (site-parallel) or average a site's gradients (data-parallel)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from lightning_fl.config import ConfigError, load_config
from lightning_fl.data.datasets import TrainingStream, load_site, prepare_data_root
from lightning_fl.distributed import place_sites, site_seed
from lightning_fl.labels import LabelSpace
from lightning_fl.run_folder import OVERLAY_PLOT
from tests.helpers.runs import EXACT, SMOKE

SITES = ["liver", "spleen", "pancreas", "kidney"]


def test_sites_are_spread_over_ranks_by_cost():
    assert place_sites(SITES, [1, 1, 1, 1], 1) == {s: [0] for s in SITES}
    assert place_sites(SITES, [1, 1, 1, 1], 2) == {"liver": [0], "spleen": [1], "pancreas": [0], "kidney": [1]}
    # the costliest site alone on a rank, the three others together on the other
    assert place_sites(SITES, [1, 1, 3, 1], 2) == {"liver": [1], "spleen": [1], "pancreas": [0], "kidney": [1]}
    assert place_sites(SITES, [1, 1, 1, 1], 4) == {s: [r] for r, s in enumerate(SITES)}


def test_spare_ranks_form_contiguous_blocks_for_the_costliest_sites():
    assert place_sites(["liver"], [1], 2) == {"liver": [0, 1]}
    assert place_sites(SITES, [1, 1, 1, 1], 8) == {
        "liver": [0, 1],
        "spleen": [2, 3],
        "pancreas": [4, 5],
        "kidney": [6, 7],
    }
    assert place_sites(SITES, [1, 1, 3, 1], 6) == {"liver": [0], "spleen": [1], "pancreas": [2, 3, 4], "kidney": [5]}


def test_site_seed_depends_on_run_site_and_round_only():
    seeds = {site_seed(s, site, r) for s in (0, 1) for site in SITES for r in (1, 2, 3)}
    assert len(seeds) == 2 * 4 * 3 and all(0 <= x < 2**63 for x in seeds)
    assert site_seed(0, "liver", 3) == 3026096132157582905  # the same in every process and Python (no hash())


def test_training_stream_replays_a_round_and_shards_split_its_batches(data_home, smoke_config_path):
    cfg = load_config(smoke_config_path, ["data.samples_per_volume=2"])
    labels = LabelSpace.of(cfg.labels)
    site = load_site(prepare_data_root(cfg, labels), cfg.data.sites[0], labels)
    stream = TrainingStream(site, cfg.data, labels.classes)

    def first(seed: int, shard: tuple[int, int] = (0, 1), n: int = 3) -> list[torch.Tensor]:
        return [batch["image"].as_tensor() for batch in stream.start_round(seed, n, shard)]

    whole = first(7)
    assert len(whole) == 3  # 3 full batches from 2 training cases: the round runs on into the next epoch
    assert all(torch.equal(a, b) for a, b in zip(whole, first(7)))  # a round replays exactly
    assert not all(torch.equal(a, b) for a, b in zip(whole, first(8)))  # another round differs
    halves = [first(7, (i, 2)) for i in range(2)]
    for step, batch in enumerate(whole):
        assert batch.shape[0] == 2
        assert torch.equal(torch.cat([halves[0][step], halves[1][step]]), batch)


def test_unsupported_strategy_is_a_config_error(smoke_config_path):
    with pytest.raises(
        ConfigError, match=r"fabric.strategy: expected one of \['auto', 'ddp', 'ddp_spawn'\], got 'fsdp'"
    ):
        load_config(smoke_config_path, ["fabric.strategy=fsdp"])
    with pytest.raises(ConfigError, match=r"data.sites.0.cost: expected a value > 0, got 0"):
        load_config(smoke_config_path, ["data.sites.0.cost=0"])


def _dice_rows(run: Path) -> list[tuple[str, ...]]:
    rows = csv.DictReader((run / "metrics.csv").open())
    return [(r["round"], r["phase"], r["site"], r["class"], r["dice"]) for r in rows if r["dice"]]


@pytest.mark.slow
def test_two_processes_give_the_weights_of_one(cli, reference_fit, tmp_path):
    """Site-parallel: 4 sites on 2 gloo ranks, float32 and one thread in every process, against the
    one-process reference run: only the placement of the sites may differ between them. Rank 0
    alone moves an old folder aside (--overwrite), before the other rank starts."""
    two = tmp_path / "two"
    two.mkdir()
    (two / "config.yaml").write_text("an earlier run\n")
    args = ("fit", "--config", str(SMOKE), "--overwrite", f"output_dir={two}", *EXACT, "fabric.devices=2")
    result = cli(*args, "fabric.strategy=ddp", OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    aside = next(tmp_path.glob("two.replaced-*"))
    assert f"moved the previous {two} aside to {aside}\n" in result.stdout
    assert sorted(p.name for p in aside.iterdir()) == ["config.yaml", "run.lock"]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    assert result.stdout.count("Best global model") == 1  # only rank 0 prints the table
    first = torch.load(reference_fit / "last.ckpt", weights_only=True)["model"]
    second = torch.load(two / "last.ckpt", weights_only=True)["model"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)  # bitwise
    assert _dice_rows(reference_fit) == _dice_rows(two)  # validation every round, then test and external
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in reference_fit.iterdir())
    # the last round's overlays: rank 1 scored two of the sites, and rank 0 drew them all
    assert np.array_equal(imread(reference_fit / OVERLAY_PLOT), imread(two / OVERLAY_PLOT))
    summary = json.loads((two / "summary.json").read_text())
    assert len(summary["peak_host_memory_mb"]) == 2 and len(summary["round_time_s"]) == 2


@pytest.mark.slow
def test_a_data_parallel_site_averages_its_gradients_across_ranks(cli, data_home, tmp_path):
    """One site on 2 ranks: DDP over the site's subgroup; each rank's gradient is of its own half
    of the batch, and the synced gradient is their mean (tests/helpers/data_parallel_worker.py)."""
    out = tmp_path / "dp"
    worker = Path(__file__).parent / "helpers" / "data_parallel_worker.py"
    result = cli.python(worker, data_home / "synthetic-smoke", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "data_parallel.json").read_text())
    ranks = report["ranks"]
    assert [r["shard"] for r in ranks] == [[0, 2], [1, 2]] and all(r["patches"] == 1 for r in ranks)
    assert ranks[0]["rank0_vs_rank1"] > 1e-3 * ranks[0]["grad_scale"]  # the halves differ...
    assert all(r["synced_vs_mean"] <= 1e-6 * r["grad_scale"] for r in ranks)  # ...and DDP averages them
    assert not any(r["teacher_wrapped"] for r in ranks)
    assert set(report["summary"]["test_dice"]) == {"liver", "liver_tumor"}
    assert (out / "last.ckpt").is_file() and (out / "metrics.csv").is_file()


@pytest.mark.slow
def test_a_rank_that_fails_stops_every_rank(cli, data_home, tmp_path):
    """Rank 0 cannot read one of its site's images: rank 1 must stop too, not wait for it forever."""
    root = tmp_path / "federation"
    shutil.copytree(data_home / "synthetic-smoke", root)
    image = json.loads((root / "liver.json").read_text())["training"][0]["image"]
    (root / image).write_text("not a NIfTI file")
    args = [
        "fit",
        "--config",
        "configs/smoke.yaml",
        "data.synthetic=null",
        f"data.root={root}",
        f"output_dir={tmp_path / 'run'}",
        "logger.wandb.mode=disabled",
        "fabric.accelerator=cpu",
        "data.check_before_fit=false",
        "fabric.devices=2",
        "fabric.strategy=ddp",
    ]
    result = cli(*args, timeout=300)
    assert result.returncode != 0
    assert "RankFailedError: rank 0 failed while setting up its sites" in result.stderr
    assert Path(image).name in result.stderr  # the root cause names the file
