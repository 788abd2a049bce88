"""The federated round loop on one long-lived Lightning Fabric (`docs/explanation/round-loop.md`).

    send each client its model ─▶ every client trains `local_steps` steps, returns Δ_k
        ─▶ each model's strategy(w, {Δ_k}) = w' ─▶ validate ─▶ select the best, save

`method.training` says which models there are and who trains them (`Topology`): one global model
trained by every site (federated), one model per site that never aggregates (standalone), or one
model trained on every site's cases pooled (centralized). One network object per process serves as
the model being scored and as the frozen teacher the sites distil from: at every moment it holds
the weights a client received. With several processes (`distributed.py`) each rank trains and
validates its own clients' sites; every update and score is then shared from the rank that owns it,
so every rank aggregates the same updates in the same order and holds the same models; only rank 0
writes files, logs and prints.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from lightning_fl.analysis import write_run_plots
from lightning_fl.checkpoint import (
    LOCK_FILE,
    STATE_FILE,
    CheckpointError,
    atomic_write_text,
    check_compatible,
    claim_run_folder,
    file_sha256,
    load_model,
    lock_run_folder,
    save_model,
    save_state,
)
from lightning_fl.client import ClientUpdate, SiteClient
from lightning_fl.config import to_yaml
from lightning_fl.data.datasets import SiteData, evaluation_loader, load_site, nifti_stem, prepare_data_root
from lightning_fl.data.validation import DataCheckError, check_federation
from lightning_fl.distributed import (
    broadcast_states,
    build_fabric,
    checked_on_every_rank,
    device_name,
    leave_process_group,
    make_placement,
    merge_from_ranks,
    peak_memory_mb,
)
from lightning_fl.errors import RunStopped
from lightning_fl.evaluation import nanmean, score_cases
from lightning_fl.inference import Predictor
from lightning_fl.labels import LabelSpace, label_space_from_config
from lightning_fl.loggers import Overlay, RunLogger, format_table
from lightning_fl.networks import build_network
from lightning_fl.scores import CASES_FILE, EXTERNAL, GLOBAL, TEST, CaseRow, case_table, headline_rows, pooled
from lightning_fl.site import StateDict, freeze
from lightning_fl.strategies import build_strategy

T = TypeVar("T")
IDENTITY = ("run_id", "config_sha256", "seed")  # in state.ckpt, best.ckpt and last.ckpt: which run wrote them
POOLED = "pooled"  # the one client of centralized training


@dataclass(frozen=True)
class Topology:
    """Who trains what: each client's data sites and the model it trains.

    `method.training` decides it: federated (every site a client of the one global model),
    standalone (every site a client of its own model) or centralized (one pooled client).
    """

    clients: dict[str, list[str]]  # client → the sites whose training cases it trains on
    model_of: dict[str, str]  # client → the model it receives and updates

    @staticmethod
    def of(training: str, sites: list[str]) -> Topology:
        """The topology of `method.training` over the configured sites."""
        if training == "centralized":
            return Topology({POOLED: list(sites)}, {POOLED: GLOBAL})
        return Topology({s: [s] for s in sites}, {s: s if training == "standalone" else GLOBAL for s in sites})

    @property
    def models(self) -> list[str]:
        """The models trained, in client order, each once."""
        return list(dict.fromkeys(self.model_of.values()))

    def validated_on(self, model: str) -> list[str]:
        """The sites whose validation split chooses the model's best round: those it is trained on."""
        return [s for client, sites in self.clients.items() if self.model_of[client] == model for s in sites]


@dataclass
class Best:
    """A model's best validated round so far."""

    round: int = -1
    score: float = -math.inf
    state: StateDict | None = None


Scores = dict[tuple[str, str], dict[str, list[float]]]  # (model, site) → class → per-case Dice


@dataclass
class RoundRecord:
    """What one round produced, for metrics.csv, W&B and the checkpoints."""

    round: int
    updates: dict[str, ClientUpdate]
    validation: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # (model, site) → class → Dice
    scores: dict[str, float] = field(default_factory=dict)  # validated model → mean Dice
    improved: set[str] = field(default_factory=set)
    seconds: float = 0.0
    overlays: dict[str, Overlay] = field(default_factory=dict)  # site → its first validation case, when shown


def checkpoint_name(kind: str, model: str) -> str:
    """`best.ckpt` / `last.ckpt` of the global model; `best_<site>.ckpt` of a standalone site's model."""
    return f"{kind}.ckpt" if model == GLOBAL else f"{kind}_{model}.ckpt"


class Server:
    """The server side of a run: each model's weights, server strategy and best round so far, and
    the run folder they are recorded in (metrics.csv, W&B, best/last checkpoints, state.ckpt).

    It exists so that the simulation (`Federation`) and a real FL engine (`lightning_fl.flare`)
    run the same round bookkeeping: given the round's client updates, drop the failed, aggregate,
    record the validation Dice, select the best round and save. `fabric` is None on an engine's
    server (one process, which writes the files); `network` gives the initial weights and the
    architecture saved states are checked against.
    """

    def __init__(
        self,
        cfg: DictConfig,
        labels: LabelSpace,
        topology: Topology,
        network: torch.nn.Module,
        fabric: L.Fabric | None = None,
        resume: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.labels, self.topology, self.network, self.fabric = cfg, labels, topology, network, fabric
        self.resume, self.output_dir = resume, Path(cfg.output_dir)
        self.is_main = fabric is None or fabric.global_rank == 0
        initial = {k: v.detach().clone() for k, v in network.state_dict().items()}
        self.models: dict[str, StateDict] = {m: initial for m in topology.models}
        self.strategies = {m: build_strategy(cfg.fl, initial) for m in topology.models}
        self.best = {m: Best() for m in topology.models}
        self.identity: dict[str, Any] = {}

    def _load_state(self, state: dict[str, Any]) -> None:
        """Continue after the round `state` was saved at: models, servers and best rounds."""
        path = self.output_dir / STATE_FILE
        if list(state["models"]) != self.topology.models:
            raise CheckpointError(
                f"{path} holds the models {list(state['models'])}, but method.training="
                f"{self.cfg.method.training} trains {self.topology.models}"
            )
        for model, saved in state["models"].items():
            check_compatible(path, saved["state"], state["classes"], self.network, list(self.labels.classes))
            self.models[model] = saved["state"]
            self.strategies[model].load_state_dict(saved["strategy"])
            self.best[model] = Best(**saved["best"])

    def _client_states(self) -> dict[str, dict[str, Any]]:
        """The clients' optimizer and schedule states for state.ckpt: an engine's sites keep their own."""
        return {}

    def write_summary(self, logger: RunLogger, summary: dict[str, Any]) -> None:
        """summary.json, and the W&B run ended with its scalars and the run folder's record."""
        atomic_write_text(self.output_dir / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
        logger.finish({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})

    def is_validated(self, round_index: int) -> bool:
        """Every `eval.every` rounds and the last one."""
        return (round_index + 1) % self.cfg.eval.every == 0 or round_index == self.cfg.fl.rounds - 1

    def record_validation(self, record: RoundRecord, validation: dict[tuple[str, str], dict[str, float]]) -> None:
        """Each (model, site)'s Dice per class, and each model's mean over its sites and classes."""
        record.validation = validation
        for model in self.topology.models:
            record.scores[model] = nanmean(
                [d for (m, _), dice in validation.items() if m == model for d in dice.values()]
            )

    def drop_failed(self, logger: RunLogger | None, round_index: int, updates: dict[str, ClientUpdate]) -> None:
        """Record the clients whose round failed; stop when fewer than `fl.min_sites` updates are left."""
        dropped = {name: u.metrics["dropped"] for name, u in updates.items() if u.delta is None}
        if dropped:
            self._on_main("recording dropped sites", lambda: self._record_dropped(logger, round_index, dropped))
        sent = len(updates) - len(dropped)
        if sent < self.cfg.fl.min_sites:
            raise RunStopped(
                f"round {round_index + 1}: {sent} of {len(updates)} sites sent an update, fewer than fl.min_sites="
                f"{self.cfg.fl.min_sites}; dropped: {'; '.join(f'{k}: {v}' for k, v in dropped.items())}. "
                f"The last good global model is {self.output_dir / 'last.ckpt'}"
                + (f" (round {round_index})" if round_index else " (none yet: this was the first round)")
            )

    def aggregate(self, updates: dict[str, ClientUpdate]) -> None:
        """Each model's strategy turns its clients' updates into its next weights; a model none of
        whose clients sent one keeps its weights."""
        for model in self.topology.models:
            sent = [u for name, u in updates.items() if u.delta is not None and self.topology.model_of[name] == model]
            if sent:
                weights = [float(u.num_cases) if self.cfg.fl.weighting == "cases" else 1.0 for u in sent]
                self.models[model] = self.strategies[model].aggregate(
                    self.models[model], [u.delta for u in sent], weights
                )

    def select(self, record: RoundRecord) -> None:
        """A model's best round is its best validated one (the first validated round at least)."""
        for model, score in record.scores.items():
            best = self.best[model]
            if score > best.score or best.state is None:
                self.best[model] = Best(record.round, score, self.models[model])
                record.improved.add(model)

    def save(self, logger: RunLogger | None, record: RoundRecord) -> None:
        """metrics.csv, W&B and the checkpoints, then state.ckpt."""
        sites = self._client_states()
        self._on_main(f"writing round {record.round + 1}", lambda: self._record_round(logger, record))
        resumable = {
            "round": record.round,
            "classes": list(self.labels.classes),
            "sites": sites,
            "models": {
                m: {"state": self.models[m], "strategy": self.strategies[m].state_dict(), "best": vars(self.best[m])}
                for m in self.topology.models
            },
        }
        self._on_main(f"saving round {record.round + 1}", lambda: self._save_state(logger, resumable))

    def _on_main(self, what: str, write: Callable[[], T]) -> T | None:
        """Files, W&B and the console belong to rank 0; every rank learns if writing failed."""
        if self.fabric is None:
            return write()
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
        save_state(
            self.output_dir / STATE_FILE,
            resumable
            | self.identity
            | {
                "metrics_bytes": metrics_bytes,
                "metrics_sha256": file_sha256(logger.path, metrics_bytes),
                "wandb_id": logger.wandb_id,
            },
        )

    def _record_round(self, logger: RunLogger, record: RoundRecord) -> None:
        """metrics.csv, W&B and the checkpoints of one round."""
        r = record.round
        for name, update in record.updates.items():
            if update.delta is not None:
                logger.train(r, name, update.metrics)
        for (model, site), dice in record.validation.items():
            logger.dice(r, "validation", site, model, dice)
        meta = {
            "classes": list(self.labels.classes),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            **self.identity,
        }
        for model in self.topology.models:
            score = record.scores.get(model, math.nan)
            if model in record.improved:
                save_model(
                    self.output_dir / checkpoint_name("best", model), self.models[model], round=r, score=score, **meta
                )
            save_model(
                self.output_dir / checkpoint_name("last", model), self.models[model], round=r, score=score, **meta
            )
        size = {model: state_bytes(state) for model, state in self.models.items()}  # each model once
        sent = sum(size[self.topology.model_of[name]] for name in record.updates)
        received = sum(state_bytes(u.delta) for u in record.updates.values() if u.delta is not None)
        logger.scalars(
            {"time/round_s": record.seconds, "comm/bytes_sent": sent, "comm/bytes_received": received}
            | {
                ("val/mean_dice" if model == GLOBAL else f"val/{model}/mean_dice"): score
                for model, score in record.scores.items()
                if not math.isnan(score)
            }
        )
        logger.overlays(record.overlays, dict(enumerate(self.labels.classes)))
        logger.commit(r)

    def _record_dropped(self, logger: RunLogger, r: int, dropped: dict[str, str]) -> None:
        for name, reason in dropped.items():
            print(f"warning: round {r + 1}: dropped the update of site '{name}': {reason}", file=sys.stderr)
            logger.dropped(r, name, reason)


class Federation(Server):
    """One simulated training run on this rank: the `Server` with its clients and the round loop.

    It exists to own everything that lives for the whole run, so that each round is a sequence of
    small phases over it (`fit`: train the clients, drop the failed, aggregate, validate, select,
    save; then test). Beside the server's state it holds the Fabric; each site's data; the placement
    of clients on ranks; the clients this rank trains; and the one shared network that scores a
    model and serves as the sites' frozen teacher.
    """

    def __init__(self, cfg: DictConfig, fabric: L.Fabric, resume: dict[str, Any] | None = None) -> None:
        self.cfg, self.fabric = cfg, fabric
        self._loaders: dict[str, Any] = {}
        self.labels: LabelSpace = label_space_from_config(cfg.labels.classes, cfg.labels.tumors)
        fabric.seed_everything(cfg.seed, verbose=False)  # the same initial model on every rank
        if fabric.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
        root = prepare_data_root(cfg, self.labels)
        self.network = freeze(self._network())  # reaches the device with the sites, in fabric.setup
        self.predictor = Predictor(self.network, fabric, cfg.model.channels_last)
        self.site_data = {s.name: load_site(root, s, self.labels) for s in cfg.data.sites}
        self.external = {s.name: load_site(root, s, self.labels, required=("testing",)) for s in cfg.data.external}
        self.scored_sites = self.site_data | self.external  # tested in this order
        self.topology = Topology.of(cfg.method.training, list(self.site_data))
        cost = {s.name: s.cost for s in cfg.data.sites}
        self.placement = make_placement(
            fabric,
            list(self.topology.clients),
            [sum(cost[s] for s in sites) for sites in self.topology.clients.values()],
        )
        self.hide_bars = (
            True if fabric.global_rank != 0 else (None if cfg.logger.progress else True)
        )  # None: terminals only
        student = self._network()  # one per process, shared by its clients (site.py)
        mine = [name for name in self.topology.clients if self.placement.trains(name)]
        self.clients: dict[str, SiteClient] = checked_on_every_rank(
            fabric,
            "setting up its sites",
            lambda: {name: self._client(name, student, len(mine) > 1) for name in mine},
        )
        for (
            name,
            client,
        ) in self.clients.items():  # DDP's constructor is a collective of the client's ranks: after the check
            if client.shard[1] > 1:
                client.data_parallel(self.placement.groups[name])
        super().__init__(cfg, self.labels, self.topology, self.network, fabric, resume)
        if resume is not None:
            self._load_state(resume)

    def _network(self) -> torch.nn.Module:
        return build_network(self.cfg.model, in_channels=1, out_channels=self.labels.num_classes)

    def _client(self, name: str, student: torch.nn.Module, shares_rank: bool) -> SiteClient:
        return SiteClient(
            name,
            [self.site_data[s] for s in self.topology.clients[name]],
            self.labels,
            student,
            self.network,
            self.cfg,
            self.fabric,
            self.placement.shard(name),
            self.predictor.prepare,
            shares_rank,
            self.hide_bars,
        )

    # ---------------------------------------------------------------- resumable state
    def _load_state(self, state: dict[str, Any]) -> None:
        """The server's state (`Server._load_state`) and each client's optimizer and schedule. Data
        order, augmentation and dropout need nothing: they are seeded per round."""
        super()._load_state(state)
        for name, client in self.clients.items():
            client.load_state_dict(state["sites"][name])

    def _client_states(self) -> dict[str, dict[str, Any]]:
        """Every client's optimizer and schedule state, gathered on rank 0 (which writes state.ckpt)
        from the ranks that own them."""
        rank = self.fabric.global_rank
        mine = {
            name: client.state_dict() for name, client in self.clients.items() if self.placement.owner(name) == rank
        }
        if self.fabric.world_size > 1:  # pickled through the process group: host copies
            mine = move_data_to_device(mine, "cpu")
        return merge_from_ranks(self.fabric, mine, only_to=0)

    # ---------------------------------------------------------------- the phases of a round
    def train_clients(self, round_index: int) -> dict[str, ClientUpdate]:
        """Send each client its model and train it; every client's update (or why it failed) on
        every rank, in config order."""
        mine = checked_on_every_rank(
            self.fabric,
            f"training round {round_index + 1}",
            lambda: {
                name: client.train(self.models[self.topology.model_of[name]], round_index)
                for name, client in self.clients.items()
            },
        )
        owners = {name: self.placement.owner(name) for name in self.topology.clients}
        rank = self.fabric.global_rank
        reports = merge_from_ranks(
            self.fabric, {n: (u.num_steps, u.num_cases, u.metrics) for n, u in mine.items() if owners[n] == rank}
        )
        kept = {name: owner for name, owner in owners.items() if "dropped" not in reports[name][2]}
        template = self.models[self.topology.models[0]]
        deltas = broadcast_states({name: mine[name].delta if name in mine else None for name in kept}, kept, template)
        return {name: ClientUpdate(deltas.get(name), *reports[name]) for name in owners}

    def validate(self, record: RoundRecord) -> None:
        """On validation rounds, each model's Dice on the sites it is trained on, and its mean."""
        r = record.round
        if not self.is_validated(r):
            return
        pairs = [(m, site) for m in self.topology.models for site in self.topology.validated_on(m)]
        every = self.cfg.logger.wandb.image_every
        last = r == self.cfg.fl.rounds - 1  # the run folder's overlays.png
        show = last or (self.cfg.logger.wandb.mode != "disabled" and every > 0 and (r + 1) % every == 0)
        scores = self.score(self.models, pairs, "validation", record.overlays if show else None)
        self.record_validation(
            record, {pair: {c: nanmean(v) for c, v in dice.items()} for pair, dice in scores.items()}
        )

    # ---------------------------------------------------------------- scoring
    def score(
        self,
        states: dict[str, StateDict],
        pairs: list[tuple[str, str]],
        split: str,
        overlays: dict[str, Overlay] | None = None,
    ) -> Scores:
        """Per-case Dice per class of each (model, site) pair: a training site's `split` with its own
        classes, an external site's test cases per organ. Each rank scores the sites it owns and
        loads each volume once; the scores are then shared. Given `overlays`, rank 0's gets each
        site's first case as scored (no second inference)."""
        rank = self.fabric.global_rank
        shown: dict[str, Overlay] = {}

        def keep(site: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None:
            return None if overlays is None else lambda *case: shown.__setitem__(site, Overlay.of(*case))

        def mine() -> Scores:
            out, loaded = {}, None
            for site in dict.fromkeys(s for _, s in pairs if self._scorer(s) == rank):
                data = self.scored_sites[site]
                loader = self._loader(data, split)
                for model in [m for m, s in pairs if s == site]:
                    if loaded != model:
                        self.network.load_state_dict(states[model])
                        loaded = model
                    out[(model, site)] = score_cases(
                        self.predictor,
                        loader,
                        data.foreground,
                        self.labels,
                        self.cfg.eval,
                        self.predictor.prepare,
                        site in self.external,
                        keep(site),
                    )
            return out

        scores = merge_from_ranks(self.fabric, checked_on_every_rank(self.fabric, f"scoring the {split} split", mine))
        if overlays is not None:
            gathered = merge_from_ranks(self.fabric, shown, only_to=0)  # in rank order
            overlays.update({site: gathered[site] for site in self.scored_sites if site in gathered})
        return {pair: scores[pair] for pair in pairs}

    def _scorer(self, site: str) -> int:
        """The rank that scores a site: the owner of its own client, else the sites take turns."""
        if site in self.placement.ranks:
            return self.placement.owner(site)
        return list(self.scored_sites).index(site) % self.fabric.world_size

    def _loader(self, data: SiteData, split: str) -> Any:
        """A split's whole volumes; validation's are kept, to be scored again every round."""
        split = "testing" if data.name in self.external else split
        key = f"{data.name}/{split}"
        loader = self._loaders.get(key)
        if loader is None:
            loader = evaluation_loader(data.splits[split], self.cfg.data)
        if split == "validation":
            self._loaders[key] = loader
        return loader

    # ---------------------------------------------------------------- the run
    def fit(self) -> dict[str, Any]:
        """Train every round (from the saved one when resumed), test each model's best round and
        write the summary; returns the summary (`summary.json`)."""
        cfg = self.cfg
        logger = self._on_main("creating the run folder", self._start_outputs)
        first_round = 0 if self.resume is None else self.resume["round"] + 1
        round_times: list[float] = []
        overlays: dict[str, Overlay] = {}  # the last round's, for overlays.png
        start = time.perf_counter()
        rounds = tqdm(
            range(first_round, cfg.fl.rounds),
            desc="rounds",
            disable=self.hide_bars,
            initial=first_round,
            total=cfg.fl.rounds,
        )
        for r in rounds:
            round_start = time.perf_counter()
            record = RoundRecord(r, self.train_clients(r))
            self.drop_failed(logger, r, record.updates)
            self.aggregate(record.updates)
            self.validate(record)
            self.select(record)
            record.seconds = time.perf_counter() - round_start
            round_times.append(record.seconds)
            overlays = record.overlays
            self.save(logger, record)
            score, best = nanmean(list(record.scores.values())), nanmean([b.score for b in self.best.values()])
            rounds.set_postfix(val_dice=f"{score:.3f}", best=f"{best:.3f}")

        summary = self._test(logger)
        summary["device"] = device_name(self.fabric.device)
        summary["precision"] = self.cfg.fabric.precision
        summary["wall_time_s"] = round(time.perf_counter() - start, 1)
        summary["round_time_s"] = [round(t, 2) for t in round_times]
        memory = merge_from_ranks(self.fabric, {self.fabric.global_rank: peak_memory_mb(self.fabric.device)})
        for key in memory[0]:  # host, and GPU where there is one: one value per rank
            summary[f"peak_{key}_memory_mb"] = [memory[rank][key] for rank in range(self.fabric.world_size)]
        self._on_main("writing the summary", lambda: self._finish(logger, summary))
        self._on_main("plotting the run", lambda: write_run_plots(self.output_dir, overlays, self.labels.classes))
        return summary

    def _finish(self, logger: RunLogger, summary: dict[str, Any]) -> None:
        self.write_summary(logger, summary)
        print(summary_table(summary))

    def _test(self, logger: RunLogger | None) -> dict[str, Any]:
        """Each model's best round on every site's test split (that site's classes) and on each
        external site (per organ): per case in test_cases.csv, summarised in the summary."""
        pairs = [(m, site) for m in self.topology.models for site in self.scored_sites]
        scores = self.score({m: self.best[m].state for m in self.topology.models}, pairs, "testing")
        means = {pair: {c: nanmean(v) for c, v in dice.items()} for pair, dice in scores.items()}
        rows = [
            CaseRow(self._phase(site), model, site, nifti_stem(item["image"]), name, None if math.isnan(v) else v)
            for (model, site), dice in scores.items()
            for name, values in dice.items()
            for item, v in zip(self.scored_sites[site].splits["testing"], values, strict=True)
        ]

        summary = self._summary(headline_rows(rows), means)

        def record() -> None:
            for (model, site), dice in means.items():
                logger.dice(self.best[model].round, self._phase(site), site, model, dice)
            headline = {f"test/dice/{c}": v for c, v in summary["test_dice"].items()} | {
                f"external/{e}/dice/{c}": v for e, organs in summary["external_dice"].items() for c, v in organs.items()
            }
            logger.scalars({k: v for k, v in headline.items() if not math.isnan(v)})
            logger.table("test/per_class", *summary_rows(summary))
            logger.commit(self.cfg.fl.rounds)
            atomic_write_text(self.output_dir / CASES_FILE, case_table(rows))

        self._on_main("writing the test scores", record)
        return summary

    def _phase(self, site: str) -> str:
        return EXTERNAL if site in self.external else TEST

    def _summary(self, headline: list[CaseRow], means: dict[tuple[str, str], dict[str, float]]) -> dict[str, Any]:
        """Each class's test Dice over the cases of the sites that label it, each organ's on every
        external site (`scores.headline_rows`: a standalone site's own model); a standalone run adds
        every site's model on every site (`cross_site`)."""
        test = pooled(headline, TEST)
        test_dice = {c: nanmean(test[c]) for c in self.labels.classes if c in test}
        single = self.topology.models == [GLOBAL]
        summary: dict[str, Any] = {
            "rounds": self.cfg.fl.rounds,
            "best_round": self.best[GLOBAL].round if single else {m: b.round for m, b in self.best.items()},
            "best_validation_dice": self.best[GLOBAL].score if single else {m: b.score for m, b in self.best.items()},
            "test_dice": test_dice,
            "test_mean_dice": nanmean(list(test_dice.values())),
            "external_dice": {
                e: {c: nanmean(v) for c, v in pooled(headline, EXTERNAL, e).items()} for e in self.external
            },
        }
        if not single:
            summary["cross_site"] = {m: {s: means[(m, s)] for s in self.scored_sites} for m in self.topology.models}
        return summary


def _json_safe(value: Any) -> Any:
    """NaN (a class no test case contains) becomes null: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def state_bytes(state: StateDict) -> int:
    """What sending a state dict costs: its tensors' bytes (W&B's `comm/` metrics)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def summary_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The header and rows of the end-of-run per-class table (the console's and W&B's): each
    class's test Dice, then one column per external site (None: not scored there), then the means."""
    external = summary["external_dice"]

    def value(v: float | None) -> float | None:
        return None if v is None or math.isnan(v) else v

    rows = [
        [name, value(dice), *(value(organs.get(name)) for organs in external.values())]
        for name, dice in summary["test_dice"].items()
    ]
    rows.append(
        ["mean", value(summary["test_mean_dice"]), *(value(nanmean(list(o.values()))) for o in external.values())]
    )
    return ["class", "test Dice", *(f"{name} Dice" for name in external)], rows


def summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: each class's test Dice at the sites that label it, and per organ on
    each external site (a column each); a standalone run adds each site's model on every site."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"

    header, numbers = summary_rows(summary)
    rows = [[name, *map(fmt, values)] for name, *values in numbers]
    if "cross_site" not in summary:
        title = (
            f"Best global model: after round {summary['best_round'] + 1} of {summary['rounds']}, "
            f"validation Dice {summary['best_validation_dice']:.4f}"
        )
        return f"\n{title}\n" + format_table(rows, header)
    title = (
        "Each site's own best model on its own test split; on an external site, the models of the sites "
        "labelling the organ"
    )
    cross = summary["cross_site"]
    sites = list(next(iter(cross.values())))
    cross_rows = [
        [
            f"{model} (round {summary['best_round'][model] + 1})",
            *(fmt(nanmean([v for v in dice[s].values() if v is not None])) for s in sites),
        ]
        for model, dice in cross.items()
    ]
    return (
        f"\n{title}\n"
        + format_table(rows, header)
        + "\n\nEvery site's model on every site (mean Dice over the classes each site labels)\n"
        + format_table(cross_rows, ["model", *sites])
    )


def record_resume(run_dir: Path, round_index: int, changed: list[str], overrides: list[str]) -> None:
    """Append to `resumes.yaml` when and with which config changes a run was resumed."""
    path = run_dir / "resumes.yaml"
    history = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    entry = {
        "after_round": round_index + 1,
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "changed": changed,
        "overrides": list(overrides),
    }
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


def read_state(run_dir: Path) -> dict[str, Any]:
    """A run folder's `state.ckpt`, checked to be one that lightning-fl wrote."""
    state = load_model(run_dir / STATE_FILE)
    if not isinstance(state, dict) or not {"round", "models", "metrics_bytes"} <= state.keys():
        raise CheckpointError(
            f"{run_dir / STATE_FILE} is not a run state written by lightning-fl (expected its "
            "round, global model and metrics length)"
        )
    return state


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
            state = read_state(out)
            if is_main:
                check_same_run(out, state)
            summary = out / "summary.json"
            if state["round"] >= cfg.fl.rounds - 1 and summary.is_file():  # on every rank: they all stop
                print(
                    f"{out} holds a finished run (round {state['round'] + 1} of {cfg.fl.rounds} trained, then "
                    f"tested: {summary.name}); nothing to do. To train more rounds: "
                    f"fit --resume {out} --allow-config-change fl.rounds=N"
                )
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
