"""A sweep file, checked (every mistake names the file and the key), and the runs it plans: each
variant × seed with its folder, overrides and config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_fl import sweep as sweeps
from lightning_fl.cli import main
from lightning_fl.config import ConfigError, load_config
from lightning_fl.sweep_plan import load_sweep, plan_runs
from tests.helpers.runs import SMOKE
from tests.helpers.sweeps import write_sweep


# ---------------------------------------------------------------- the sweep file
def test_a_sweep_file_loads_in_order_with_its_defaults(tmp_path, monkeypatch):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "mine.yaml").write_text(
        SMOKE.read_text().replace("defaults: [condistfl_synthetic]", "defaults: [condistfl_synthetic.yaml]")
    )
    path = tmp_path / "experiments" / "ablation.yaml"
    path.write_text("base: mine.yaml\nseeds: [2, 0]\nvariants:\n  z-last: []\n  a_first: [method.condist=false]\n")
    sweep = load_sweep(path)
    assert sweep.base == (tmp_path / "experiments" / "mine.yaml").resolve()  # beside the sweep file first
    assert (sweep.seeds, list(sweep.variants), sweep.variants["a_first"]) == (
        [2, 0],
        ["z-last", "a_first"],
        ["method.condist=false"],
    )
    assert (sweep.overrides, sweep.comparisons, sweep.output_dir, sweep.name) == (
        [],
        [],
        Path("runs/sweeps/ablation"),
        "ablation",
    )
    monkeypatch.chdir(tmp_path)
    path.write_text(
        "base: configs/smoke.yaml\nseeds: [0]\nvariants: {a: []}\n"
    )  # not beside it, not here: the repository's
    assert load_sweep(path).base == SMOKE


def test_variants_share_lists_of_overrides_through_yaml_anchors(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "base: configs/smoke.yaml\nseeds: [0]\nshared:\n  two: &two [fl.rounds=3, fl.local_steps=1]\n"
        "variants:\n  a: [method.condist=false, *two]\n  b: [*two, optim.lr=0.1]\n"
    )
    sweep = load_sweep(path)
    assert sweep.variants == {
        "a": ["method.condist=false", "fl.rounds=3", "fl.local_steps=1"],
        "b": ["fl.rounds=3", "fl.local_steps=1", "optim.lr=0.1"],
    }


VALID = {"base": "configs/smoke.yaml", "seeds": [0], "variants": {"a": []}}
GONE = object()  # a key left out


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"seed": 1}, r"unknown key \['seed'\]; a sweep file has \['base', 'seeds', 'variants', 'overrides'"),
        ({"variants": GONE}, "missing variants: a sweep needs a base config, seeds and variants"),
        ({"base": 3}, "base: expected the path of a config file .*got 3"),
        ({"base": "no/such.yaml"}, "base: config file no/such.yaml not found .*looked for .*/no/such.yaml"),
        ({"seeds": []}, r"seeds: expected a non-empty list of whole numbers, e.g. \[0, 1, 2\], got \[\]"),
        ({"seeds": 0}, "seeds: expected a non-empty list"),
        ({"seeds": [0, -1]}, r"seeds: expected whole numbers in \[0, 2\*\*32 - 1\], got -1"),
        ({"seeds": [True]}, "seeds: expected whole numbers .*got True"),
        ({"seeds": [0, 1, 0]}, r"seeds: each seed once, got \[0\] more than once in \[0, 1, 0\]"),
        ({"variants": {}}, "variants: expected a non-empty mapping of name -> list of overrides"),
        ({"variants": ["a"]}, "variants: expected a non-empty mapping"),
        ({"variants": {"a b": []}}, "variants: .*letters, digits, '_' and '-', got 'a b'"),
        ({"variants": {"../up": []}}, "variants: .*got '../up'"),
        ({"variants": {"a": "fl.rounds=2"}}, r"variants.a: expected a list of overrides key=value \(\[\] for none\)"),
        ({"variants": {"a": ["fl.rounds"]}}, "variants.a: expected overrides of the form key=value, got 'fl.rounds'"),
        ({"variants": {"a": [{"fl.rounds": 2}]}}, "variants.a: expected overrides of the form key=value"),
        ({"variants": {"a": ["seed=3"]}}, "variants.a: 'seed=3': the sweep sets seed, output_dir, logger.wandb.group"),
        ({"overrides": ["output_dir=x"]}, "overrides: 'output_dir=x': the sweep sets"),
        ({"overrides": "fl.rounds=2"}, "overrides: expected a list"),
        ({"comparisons": ["a", "b"]}, "comparisons: expected pairs .*got 'a'"),
        ({"comparisons": [["a", "b"]]}, r"comparisons: \['a', 'b'\]: 'b' is not a variant; the variants are \['a'\]"),
        ({"comparisons": [["a", "a"]]}, "comparisons: .*two different variants"),
        ({"output_dir": 3}, "output_dir: expected a folder"),
        ({"slurm": 4}, r"slurm: expected a mapping such as \{nodes: 1, gpus_per_node: 4\}, got 4"),
        ({"slurm": {"gpus": 4}}, r"slurm: unknown key \['gpus'\]; expected \['nodes', 'gpus_per_node'"),
        ({"slurm": {"nodes": 0}}, "slurm.nodes: expected a whole number ≥ 1, got 0"),
        ({"slurm": {"gpus_per_node": -1}}, "slurm.gpus_per_node: expected a whole number ≥ 0, got -1"),
        ({"slurm": {"timeout_min": 0.5}}, "slurm.timeout_min: expected a whole number ≥ 1, got 0.5"),
        (
            {"slurm": {"timeout_min": 1}},
            r"slurm.signal_delay_s: expected fewer seconds than timeout_min gives a job \(60 s\), got 90",
        ),
        ({"slurm": {"mem_gb": "64G"}}, "slurm.mem_gb: expected a number of GB > 0, got '64G'"),
        ({"slurm": {"partition": 3}}, "slurm.partition: expected a partition name, got 3"),
        ({"slurm": {"additional": ["--qos=high"]}}, "slurm.additional: expected a mapping of sbatch options"),
    ],
)
def test_sweep_file_mistakes_name_the_file_and_key(tmp_path, changes, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({k: v for k, v in (VALID | changes).items() if v is not GONE}))
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        load_sweep(path)


@pytest.mark.parametrize(
    "text,message",
    [
        ("- base\n", r"expected a mapping with the keys \['base', 'seeds', 'variants'\] .*got list"),
        ("base: [unclosed\n", "not valid YAML"),
    ],
)
def test_a_sweep_file_that_is_no_mapping_is_named(tmp_path, text, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        load_sweep(path)


def test_a_missing_sweep_file_and_a_bad_flag_are_one_line_errors(tmp_path, capsys, flat_smoke):
    assert main(["sweep", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err == f"lightning-fl sweep: error: sweep file not found: {tmp_path / 'none.yaml'}\n"
    path = write_sweep(tmp_path, flat_smoke)
    assert main(["sweep", str(path), "--parallel", "0"]) == 2
    assert "--parallel: expected how many runs train at once, a whole number ≥ 1, got 0" in capsys.readouterr().err
    assert main(["sweep", str(path), "--tables-only", "--rerun-changed"]) == 2
    assert "--rerun-changed cannot be given with it" in capsys.readouterr().err


# ---------------------------------------------------------------- the runs and their folders
def test_every_run_gets_its_folder_overrides_and_config(tmp_path, flat_smoke):
    sweep = load_sweep(
        write_sweep(
            tmp_path,
            flat_smoke,
            seeds=[0, 1],
            overrides=["fl.rounds=3"],
            variants={"fedavg": ["fl.aggregation=fedavg"], "plain": ["method.condist=false"]},
        )
    )
    runs = plan_runs(sweep)
    assert [r.name for r in runs] == ["fedavg/seed0", "plain/seed0", "fedavg/seed1", "plain/seed1"]  # seed by seed
    run = runs[3]
    assert run.folder.path == tmp_path / "out" / "runs" / "plain" / "seed1"
    assert run.log == tmp_path / "out" / "runs" / "plain" / "seed1.log"
    assert run.overrides == [
        "fl.rounds=3",
        "method.condist=false",
        "logger.wandb.group=sweep",
        "logger.wandb.job_type=plain",
        "seed=1",
        f"output_dir={run.folder.path}",
        "logger.wandb.name=plain-seed1",
    ]
    cfg = run.cfg
    assert (cfg.seed, cfg.fl.rounds, cfg.method.condist, cfg.output_dir) == (1, 3, False, str(run.folder.path))
    assert (cfg.logger.wandb.group, cfg.logger.wandb.job_type, cfg.logger.wandb.name) == (
        "sweep",
        "plain",
        "plain-seed1",
    )
    for planned in runs:  # each seed's config, composed once per variant, is the one its overrides compose
        assert OmegaConf.to_container(planned.cfg) == OmegaConf.to_container(load_config(flat_smoke, planned.overrides))
    command = sweeps.fit_command(sweep, run, parallel=1)
    assert command == [sys.executable, "-m", "lightning_fl", "fit", "--config", str(flat_smoke), *run.overrides]
    assert sweeps.fit_command(sweep, run, parallel=2)[-1] == "fabric.devices=1"


def test_a_value_that_interpolates_the_seed_is_each_runs_own(tmp_path, flat_smoke):
    """A variant's files are composed once for all its seeds: `${seed}` still resolves per run (the
    warm-start sweep names each seed's pretrained model so)."""
    warm = ["model.init_checkpoint=pretrain/seed${seed}/best.ckpt"]
    sweep = load_sweep(write_sweep(tmp_path, flat_smoke, seeds=[0, 2], variants={"warm": warm}))
    checkpoints = [run.cfg.model.init_checkpoint for run in plan_runs(sweep)]
    assert checkpoints == ["pretrain/seed0/best.ckpt", "pretrain/seed2/best.ckpt"]


def test_a_config_mistake_in_any_variant_stops_the_sweep_before_it_trains(tmp_path, capsys, flat_smoke):
    path = write_sweep(
        tmp_path, flat_smoke, seeds=[0, 1], variants={"good": [], "bad": ["fl.rounds=0"], "worse": ["fl.roundz=1"]}
    )
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        f"lightning-fl sweep: error: {path}: variant 'bad': fl.rounds: expected a value ≥ 1, got 0; "
        "variant 'worse': override 'fl.roundz=1': Key 'roundz' not in" in err
    )
    assert not (tmp_path / "out").exists()
