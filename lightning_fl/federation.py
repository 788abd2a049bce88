"""The federated round loop on one long-lived Lightning Fabric (spec §3; architecture.md, "One round").

    global w_r ─▶ every site: student ← w_r, teacher ← w_r; `local_steps` steps; Δ_k = student − w_r
              ─▶ strategy(w_r, {Δ_k}) = w_{r+1} ─▶ validate w_{r+1} on each site ─▶ log, select, save

One network object per process serves as the global model, the frozen teacher its sites distil
from, and the model that is validated: they are the same weights by definition. With several
processes (`distributed.py`) each rank trains and validates its own sites; every site's update and
scores are then broadcast from the rank that owns it, so every rank aggregates the same updates in
the same order and holds the same global model; only rank 0 writes files, logs and prints.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import lightning as L
from lightning.fabric.utilities.apply_func import move_data_to_device
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from lightning_fl.checkpoint import (
    LOCK_FILE, STATE_FILE, CheckpointError, atomic_write_text, check_compatible, claim_run_folder, file_sha256, load_model,
    lock_run_folder, save_model, save_state,
)
from lightning_fl.config import ConfigError, to_yaml
from lightning_fl.data.datasets import SiteData, TrainingStream, evaluation_loader, load_site, prepare_data_root
from lightning_fl.data.validation import DataCheckError, check_federation
from lightning_fl.distributed import (
    broadcast_states, build_fabric, checked_on_every_rank, leave_process_group, make_placement, merge_from_ranks,
    move_optimizer_state, peak_memory_mb, site_seed,
)
from lightning_fl.errors import RunStopped
from lightning_fl.inference import Predictor
from lightning_fl.evaluation import nanmean, score_cases
from lightning_fl.labels import LabelSpace, label_space_from_config
from lightning_fl.loggers import RunLogger, StepMeans, format_table
from lightning_fl.networks import build_network
from lightning_fl.site import Site, StateDict, freeze
from lightning_fl.strategies import build_strategy

T = TypeVar("T")
IDENTITY = ("run_id", "config_sha256", "seed")  # in state.ckpt, best.ckpt and last.ckpt: which run wrote them


class SiteFailure(RuntimeError):
    """A site's round went wrong in a way that makes its update unusable (non-finite numbers)."""


@dataclass
class LocalSite:
    """A site this rank trains: its module and optimizer (set up by Fabric) and its data."""

    module: Any  # the Site wrapped by Fabric
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: TrainingStream
    shard: tuple[int, int]  # (this rank's position, ranks) in the site's block

    @property
    def site(self) -> Site:
        return self.module.module


class Federation:
    def __init__(self, cfg: DictConfig, fabric: L.Fabric, resume: dict[str, Any] | None = None) -> None:
        self.cfg, self.fabric, self.resume = cfg, fabric, resume
        self.step_means: StepMeans = fabric.logger  # where the sites' `log_dict` goes (build_fabric)
        self._loaders: dict[tuple[str, str], Any] = {}
        self.output_dir = Path(cfg.output_dir)
        self.labels: LabelSpace = label_space_from_config(cfg.labels.classes, cfg.labels.tumors)
        fabric.seed_everything(cfg.seed, verbose=False)  # the same initial global model on every rank
        if fabric.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
        root = prepare_data_root(cfg, self.labels)
        self.global_model = freeze(self._network())  # reaches the device with the sites, in fabric.setup
        self.predictor = Predictor(self.global_model, fabric, cfg.model.channels_last)
        self.site_data = [load_site(root, s, self.labels) for s in cfg.data.sites]
        self.external = [load_site(root, s, self.labels, required=("testing",)) for s in cfg.data.external]
        self.placement = make_placement(fabric, [s.name for s in cfg.data.sites], [s.cost for s in cfg.data.sites])
        student = self._network()  # one per process, shared by its sites (site.py)
        self.local = checked_on_every_rank(
            fabric, "setting up its sites",
            lambda: {d.name: self._local_site(d, student) for d in self.site_data if self.placement.trains(d.name)},
        )
        for name, local in self.local.items():  # DDP's constructor is a collective of the site's ranks: after the check
            if local.shard[1] > 1:
                device = fabric.device
                local.site.data_parallel(self.placement.groups[name], [device.index] if device.type == "cuda" else None)
        self.strategy = build_strategy(cfg.fl, self._global_state())
        if resume is not None:
            self._load_state(resume)
        self.is_main = fabric.global_rank == 0
        self.hide_bars = True if not self.is_main else (None if cfg.logger.progress else True)  # None: terminals only

    def _network(self) -> torch.nn.Module:
        return build_network(self.cfg.model, in_channels=1, out_channels=self.labels.num_classes)

    def _local_site(self, data: SiteData, student: torch.nn.Module) -> LocalSite:
        site = Site(
            data.name, data.foreground, self.labels.background_groups(data.foreground), self.labels.num_classes,
            student=student, teacher=self.global_model, cfg=self.cfg,
        )
        opt = site.configure_optimizers()
        module, optimizer = self.fabric.setup(site, opt["optimizer"])
        shard = self.placement.shard(data.name)
        if shard[1] > 1:
            patches = self.cfg.data.batch_size * self.cfg.data.samples_per_volume
            if patches % shard[1]:
                raise ConfigError(
                    f"site '{data.name}' is trained by {shard[1]} ranks, but its batch of data.batch_size × "
                    f"data.samples_per_volume = {patches} patches does not split evenly across them"
                )
        return LocalSite(module, optimizer, opt["lr_scheduler"]["scheduler"], TrainingStream(data, self.cfg.data), shard)

    # ---------------------------------------------------------------- resumable state
    def _load_state(self, state: dict[str, Any]) -> None:
        """Continue after the round `state` was saved at: global model, server, each site's optimizer
        and schedule. Data order, augmentation and dropout need nothing: they are seeded per round."""
        check_compatible(self.output_dir / STATE_FILE, state["global"], state["classes"], self.global_model,
                         list(self.labels.classes))
        self.global_model.load_state_dict(state["global"])
        self.strategy.load_state_dict(state["strategy"])
        for name, local in self.local.items():
            local.optimizer.optimizer.load_state_dict(state["sites"][name]["optimizer"])
            local.scheduler.load_state_dict(state["sites"][name]["scheduler"])

    def _site_states(self) -> dict[str, dict[str, Any]]:
        """Every site's optimizer and schedule state, gathered on rank 0 (which writes state.ckpt)
        from the ranks that own them."""
        rank = self.fabric.global_rank
        mine = {
            name: {"optimizer": local.optimizer.optimizer.state_dict(), "scheduler": local.scheduler.state_dict()}
            for name, local in self.local.items() if self.placement.owner(name) == rank
        }
        if self.fabric.world_size > 1:  # pickled through the process group: host copies
            mine = move_data_to_device(mine, "cpu")
        return merge_from_ranks(self.fabric, mine, only_to=0)

    def _global_state(self) -> StateDict:
        return {k: v.detach().clone() for k, v in self.global_model.state_dict().items()}

    # ---------------------------------------------------------------- one round
    def train_site(self, local: LocalSite, global_state: StateDict, round_index: int) -> tuple[StateDict, dict[str, float]]:
        """Local training of one site for one round: returns (Δ_k, mean step metrics)."""
        site, module, device = local.site, local.module, self.fabric.device
        seed = site_seed(self.cfg.seed, site.site_name, round_index)
        torch.manual_seed(seed)  # dropout and anything else random in the step: the site's, not the process's
        batches = local.stream.start_round(seed, self.cfg.fl.local_steps, local.shard)
        site.receive(global_state, round_index)
        move_optimizer_state(local.optimizer, device)
        module.train()
        clip = self.cfg.optim.grad_clip_norm
        steps = tqdm(range(self.cfg.fl.local_steps), desc=f"  {site.site_name}", leave=False, disable=self.hide_bars)
        for step in steps:
            batch = next(batches)
            batch = {"image": self.predictor.prepare(batch["image"].as_subclass(torch.Tensor)), "label": batch["label"].as_subclass(torch.Tensor).to(device)}
            with self.fabric.autocast():  # Fabric applies its precision to forward(), not to training_step()
                loss = module.training_step(batch, step)
            finite = torch.isfinite(loss.detach()).to(torch.int32)
            if local.shard[1] > 1:  # the ranks of a data-parallel site stop together, before DDP's all-reduce
                dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.placement.groups[site.site_name])
            if not finite:
                raise SiteFailure(f"non-finite loss at local step {step + 1}")
            self.fabric.backward(loss)
            if clip > 0:
                norm = self.fabric.clip_gradients(module, local.optimizer, max_norm=clip, error_if_nonfinite=False)
                if not torch.isfinite(norm):
                    raise SiteFailure(f"non-finite gradient norm at local step {step + 1}")
            local.optimizer.step()
            local.optimizer.zero_grad(set_to_none=True)
            local.scheduler.step()
            steps.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if len(self.local) > 1:  # another site trains next on this rank: park this one's state on the host
            move_optimizer_state(local.optimizer, torch.device("cpu"))
        means = self.step_means.pop()
        if local.shard[1] > 1:  # a data-parallel site reports the mean over its ranks' shares
            values = torch.tensor(list(means.values()), dtype=torch.float64, device=device)
            dist.all_reduce(values, group=self.placement.groups[site.site_name])
            means = dict(zip(means, (values / local.shard[1]).tolist()))
        update = site.update(global_state)
        broken = [key for key, value in update.items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if broken:
            raise SiteFailure(f"non-finite update in {len(broken)} tensors, e.g. '{broken[0]}'")
        return update, means

    def train_or_drop(self, local: LocalSite, global_state: StateDict, round_index: int) -> tuple[StateDict | None, dict[str, Any]]:
        """One site's round; an exception or a non-finite loss or update drops the site's update
        for this round (its metrics say why) and resets its optimizer state, which may hold the
        same non-finite values."""
        try:
            return self.train_site(local, global_state, round_index)
        except Exception as err:  # noqa: BLE001 - any failure of one site must not end the federation
            local.optimizer.zero_grad(set_to_none=True)
            local.optimizer.state.clear()
            self.step_means.pop()
            reason = str(err) if isinstance(err, SiteFailure) else f"{type(err).__name__}: {err}"
            return None, {"dropped": reason}

    def train_round(self, global_state: StateDict, round_index: int) -> tuple[dict[str, StateDict], dict[str, dict[str, Any]]]:
        """The updates of the sites that did not fail, and every site's step metrics (or why it was
        dropped), in config order, on every rank."""
        mine = checked_on_every_rank(
            self.fabric, f"training round {round_index + 1}",
            lambda: {name: self.train_or_drop(local, global_state, round_index) for name, local in self.local.items()},
        )
        owners = {d.name: self.placement.owner(d.name) for d in self.site_data}
        rank = self.fabric.global_rank
        means = merge_from_ranks(self.fabric, {n: m for n, (_, m) in mine.items() if owners[n] == rank})
        means = {name: means[name] for name in owners}
        kept = {name: owner for name, owner in owners.items() if "dropped" not in means[name]}
        updates = broadcast_states({name: mine[name][0] if name in mine else None for name in kept}, kept, global_state)
        return {name: updates[name] for name in kept}, means

    def aggregation_weights(self, sites: list[str]) -> list[float]:
        if self.cfg.fl.weighting == "cases":
            cases = {d.name: d.num_training_cases for d in self.site_data}
            return [float(cases[name]) for name in sites]
        return [1.0] * len(sites)

    def evaluate_sites(self, split: str) -> dict[str, dict[str, float]]:
        """Mean Dice per class of the current global model on each site's split (its own classes);
        each rank scores the sites it owns, all at once, then the scores are shared."""
        mine = checked_on_every_rank(
            self.fabric, f"scoring the {split} split",
            lambda: {d.name: self.score(d, split) for d in self.site_data if self.placement.owner(d.name) == self.fabric.global_rank},
        )
        scores = merge_from_ranks(self.fabric, mine)
        return {d.name: scores[d.name] for d in self.site_data}

    def score(self, site: SiteData, split: str, organ_level: bool = False) -> dict[str, float]:
        """Mean Dice per class of the global model on one site's split."""
        loader = self._loaders.get((site.name, split)) if split == "validation" else None
        if loader is None:
            loader = evaluation_loader(site.splits[split], self.cfg.data)
            if split == "validation":  # kept: the same cases every round
                self._loaders[(site.name, split)] = loader
        scores = score_cases(self.predictor, loader, site.foreground, self.labels, self.cfg.eval, self.predictor.prepare, organ_level)
        return {c: nanmean(v) for c, v in scores.items()}

    # ---------------------------------------------------------------- the run
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        logger = self._on_main("creating the run folder", self._start_outputs)
        best_score, best_round, best_state = -math.inf, -1, None
        first_round = 0
        if self.resume is not None:
            best = self.resume["best"]
            best_score, best_round, best_state = best["score"], best["round"], best["model"]
            first_round = self.resume["round"] + 1
        round_times: list[float] = []
        start = time.perf_counter()
        rounds = tqdm(range(first_round, cfg.fl.rounds), desc="rounds", disable=self.hide_bars,
                      initial=first_round, total=cfg.fl.rounds)
        for r in rounds:
            round_start = time.perf_counter()
            global_state = self._global_state()
            updates, means = self.train_round(global_state, r)
            dropped = {name: m["dropped"] for name, m in means.items() if "dropped" in m}
            if dropped:
                self._on_main("recording dropped sites", lambda: self._record_dropped(logger, r, dropped))
            if len(updates) < cfg.fl.min_sites:
                raise RunStopped(
                    f"round {r + 1}: {len(updates)} of {len(means)} sites sent an update, fewer than fl.min_sites="
                    f"{cfg.fl.min_sites}; dropped: {'; '.join(f'{k}: {v}' for k, v in dropped.items())}. "
                    f"The last good global model is {self.output_dir / 'last.ckpt'}"
                    + (f" (round {r})" if r else " (none yet: this was the first round)")
                )
            aggregate = self.strategy.aggregate(global_state, list(updates.values()), self.aggregation_weights(list(updates)))
            self.global_model.load_state_dict(aggregate)
            state = self._global_state()
            val, score, is_best = {}, math.nan, False  # the best model is chosen among the validated rounds
            if (r + 1) % cfg.eval.every == 0 or r == cfg.fl.rounds - 1:
                val = self.evaluate_sites("validation")
                score = nanmean([d for dice in val.values() for d in dice.values()])
                is_best = score > best_score or best_state is None
            if is_best:
                best_score, best_round, best_state = score, r, state
            round_times.append(time.perf_counter() - round_start)
            sites = self._site_states()
            self._on_main(f"writing round {r + 1}",
                          lambda: self._record_round(logger, r, means, val, state, score, is_best, round_times[-1]))
            resumable = {
                "round": r, "classes": list(self.labels.classes), "global": state,
                "strategy": self.strategy.state_dict(), "sites": sites,
                "best": {"round": best_round, "score": best_score, "model": best_state},
            }
            self._on_main(f"saving round {r + 1}", lambda: self._save_state(logger, resumable))
            rounds.set_postfix(val_dice=f"{score:.3f}", best=f"{best_score:.3f}@{best_round + 1}")

        summary = self._test(best_state, best_round, best_score, logger)
        summary["wall_time_s"] = round(time.perf_counter() - start, 1)
        summary["round_time_s"] = [round(t, 2) for t in round_times]
        memory = merge_from_ranks(self.fabric, {self.fabric.global_rank: peak_memory_mb(self.fabric.device)})
        for key in memory[0]:  # host, and GPU where there is one: one value per rank
            summary[f"peak_{key}_memory_mb"] = [memory[rank][key] for rank in range(self.fabric.world_size)]
        self._on_main("writing the summary", lambda: self._finish(logger, summary))
        return summary

    def _on_main(self, what: str, write: Callable[[], T]) -> T | None:
        """Files, W&B and the console belong to rank 0; every rank learns if writing failed."""
        return checked_on_every_rank(self.fabric, what, lambda: write() if self.is_main else None)

    def _start_outputs(self) -> RunLogger:
        """The run folder, its resolved config and the metrics logger; a resumed run keeps its
        folder, config and identity and continues its metrics and W&B run. The identity, stored in
        every checkpoint, ties them to the run's config.yaml (see `check_same_run`)."""
        if self.resume is not None:
            self.identity = {key: self.resume[key] for key in IDENTITY}
            return RunLogger(self.output_dir, self.cfg, resume=(self.resume["metrics_bytes"], self.resume["wandb_id"]))
        config = self.output_dir / "config.yaml"
        atomic_write_text(config, to_yaml(self.cfg))  # creates the folder
        self.identity = {"run_id": uuid.uuid4().hex, "config_sha256": file_sha256(config), "seed": self.cfg.seed}
        return RunLogger(self.output_dir, self.cfg)

    def _save_state(self, logger: RunLogger, resumable: dict[str, Any]) -> None:
        """`state.ckpt`: everything `fit --resume` needs, written last, so it never points past
        what metrics.csv and the model files hold."""
        metrics_bytes = logger.position()
        save_state(self.output_dir / STATE_FILE, resumable | self.identity | {
            "metrics_bytes": metrics_bytes, "metrics_sha256": file_sha256(logger.path, metrics_bytes),
            "wandb_id": logger.wandb_id,
        })

    def _record_round(
        self, logger: RunLogger, r: int, means: dict[str, dict[str, float]], val: dict[str, dict[str, float]],
        state: StateDict, score: float, is_best: bool, seconds: float,
    ) -> None:
        """metrics.csv, W&B and the checkpoints of one round."""
        for name, site_means in means.items():
            if "dropped" not in site_means:
                logger.train(r, name, site_means)
        for name, dice in val.items():
            logger.dice(r, "validation", name, "global", dice)
        meta = {"classes": list(self.labels.classes), "config": OmegaConf.to_container(self.cfg, resolve=True),
                **self.identity}
        if is_best:
            save_model(self.output_dir / "best.ckpt", state, round=r, score=score, **meta)
        save_model(self.output_dir / "last.ckpt", state, round=r, score=score, **meta)
        logger.scalars({"time/round_s": seconds} | ({} if math.isnan(score) else {"validation/mean_dice": score}))
        logger.commit(r)

    def _record_dropped(self, logger: RunLogger, r: int, dropped: dict[str, str]) -> None:
        for name, reason in dropped.items():
            print(f"warning: round {r + 1}: dropped the update of site '{name}': {reason}", file=sys.stderr)
            logger.dropped(r, name, reason)

    def _finish(self, logger: RunLogger, summary: dict[str, Any]) -> None:
        atomic_write_text(self.output_dir / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
        logger.finish({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
        print(summary_table(summary))

    def _test(self, best_state: StateDict, best_round: int, best_score: float, logger: RunLogger | None) -> dict[str, Any]:
        """The best global model on every site's test split (its own classes) and on each external
        site (per organ; external sites are shared out over the ranks)."""
        self.global_model.load_state_dict(best_state)
        test = self.evaluate_sites("testing")
        rank, ranks = self.fabric.global_rank, self.fabric.world_size
        scored = merge_from_ranks(self.fabric, checked_on_every_rank(
            self.fabric, "scoring the external sites",
            lambda: {e.name: self.score(e, "testing", organ_level=True) for i, e in enumerate(self.external) if i % ranks == rank},
        ))
        external_dice = {e.name: scored[e.name] for e in self.external}
        test_dice = {name: value for dice in test.values() for name, value in dice.items()}
        ordered = {c: test_dice[c] for c in self.labels.classes if c in test_dice}

        def record() -> None:
            for name, dice in test.items():
                logger.dice(best_round, "test", name, "best", dice)
            for name, dice in external_dice.items():
                logger.dice(best_round, "external", name, "best", dice)
            logger.commit(self.cfg.fl.rounds)

        self._on_main("writing the test scores", record)
        return {
            "rounds": self.cfg.fl.rounds,
            "best_round": best_round,
            "best_validation_dice": best_score,
            "test_dice": ordered,
            "test_mean_dice": nanmean(list(ordered.values())),
            "external_dice": external_dice,
        }


def _json_safe(value: Any) -> Any:
    """NaN (a class no test case contains) becomes null: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: each class's test Dice at the sites that label it, and per organ on
    each external site (a column each)."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"

    external = summary["external_dice"]
    rows = [[name, fmt(dice), *(fmt(organs.get(name)) for organs in external.values())]
            for name, dice in summary["test_dice"].items()]
    rows.append(["mean", fmt(summary["test_mean_dice"]), *(fmt(nanmean(list(o.values()))) for o in external.values())])
    title = (f"Best global model: after round {summary['best_round'] + 1} of {summary['rounds']}, "
             f"validation Dice {summary['best_validation_dice']:.4f}")
    return f"\n{title}\n" + format_table(rows, ["class", "test Dice", *(f"{name} Dice" for name in external)])


def record_resume(run_dir: Path, round_index: int, changed: list[str], overrides: list[str]) -> None:
    """Append to `resumes.yaml` when and with which config changes a run was resumed."""
    path = run_dir / "resumes.yaml"
    history = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    entry = {"after_round": round_index + 1, "at": time.strftime("%Y-%m-%d %H:%M:%S"), "changed": changed,
             "overrides": list(overrides)}
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(list(history) + [entry])))


def check_same_run(run_dir: Path, state: dict[str, Any]) -> None:
    """Refuse to resume from a folder whose config.yaml or metrics.csv are not those of the run that
    saved its state.ckpt (another run started over it, a file replaced, edited or cut short): the
    resumed run would continue one run's model with another's config or lose rows of its metrics."""
    ckpt = run_dir / STATE_FILE
    if "run_id" not in state:
        raise CheckpointError(
            f"{ckpt} was written by an older lightning-fl that did not record which run it belongs to, so its "
            "config.yaml and metrics.csv cannot be checked against it; resume it with that version, or start a new run"
        )
    config = run_dir / "config.yaml"
    if file_sha256(config) != state["config_sha256"]:
        raise CheckpointError(
            f"{config} is not the config of run {state['run_id']}, which saved {ckpt} (their sha256 differ): "
            "another run was started in this folder, which now mixes two runs and cannot be resumed"
        )
    metrics, recorded = run_dir / "metrics.csv", state["metrics_bytes"]
    size = metrics.stat().st_size if metrics.is_file() else 0
    if size < recorded:
        raise CheckpointError(
            f"{metrics} has {size} bytes, {ckpt} records {recorded}: rows of the rounds the checkpoint holds "
            "are missing, and resuming would lose them"
        )
    if file_sha256(metrics, recorded) != state["metrics_sha256"]:
        raise CheckpointError(
            f"{metrics}: its first {recorded} bytes are not the ones {ckpt} records (their sha256 differ); "
            "it was rewritten or edited since"
        )


@dataclass
class Resume:
    """`fit --resume`: the config keys its overrides change, and the overrides (for resumes.yaml)."""

    changed: list[str]
    overrides: list[str]


def run_fit(cfg: DictConfig, resume: Resume | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Launch the processes the `fabric` config asks for (none beyond this one when Fabric runs under
    torchrun or SLURM, or with one device) and run the federation on each.

    Fabric's launcher and torchrun run this command in every process. Global rank 0 alone claims the
    run folder (`overwrite`: see `claim_run_folder`), checks a resumed run's files and holds the
    folder's lock until the run ends: the other ranks, started after it (Fabric) or beside it
    (torchrun), would take its lock and fresh files for another run's. A finished run is left as it is."""
    fabric = build_fabric(cfg)
    out, is_main = Path(cfg.output_dir), fabric.global_rank == 0
    lock, created = None, not out.exists()
    if is_main:
        if resume is None:
            lock, aside = claim_run_folder(out, overwrite)
            if aside is not None:
                print(f"moved the previous {out} aside to {aside}")
        else:
            lock = lock_run_folder(out)
    try:
        state = None
        if resume is not None:
            state = load_model(out / STATE_FILE)
            if not isinstance(state, dict) or not {"round", "global", "metrics_bytes"} <= state.keys():
                raise CheckpointError(f"{out / STATE_FILE} is not a run state written by lightning-fl fit (expected its "
                                      "round, global model and metrics length)")
            if is_main:
                check_same_run(out, state)
            summary = out / "summary.json"
            if state["round"] >= cfg.fl.rounds - 1 and summary.is_file():  # on every rank: they all stop
                print(f"{out} holds a finished run (round {state['round'] + 1} of {cfg.fl.rounds} trained, then "
                      f"tested: {summary.name}); nothing to do. To train more rounds: "
                      f"fit --resume {out} --allow-config-change fl.rounds=N")
                return json.loads(summary.read_text())
            if is_main:
                record_resume(out, state["round"], resume.changed, resume.overrides)
        labels = label_space_from_config(cfg.labels.classes, cfg.labels.tumors)
        root = prepare_data_root(cfg, labels)  # once, before launch
        if cfg.data.check_before_fit and is_main:
            problems = check_federation(root, cfg, labels)
            if problems:
                raise DataCheckError(problems)
        return fabric.launch(_fit_on_rank, cfg, state)
    finally:
        if lock is not None:
            lock.release()
            if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:  # stopped before writing anything
                (out / LOCK_FILE).unlink()
                out.rmdir()


def _fit_on_rank(fabric: L.Fabric, cfg: DictConfig, resume: dict[str, Any] | None) -> dict[str, Any]:
    summary = Federation(cfg, fabric, resume).fit()
    leave_process_group(fabric)
    return summary
