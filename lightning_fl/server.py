"""The server side of a run: who trains which model, and the bookkeeping of each round.

    start() or resume(state) ─▶ per round: drop_failed ─▶ aggregate ─▶ record_validation ─▶ select ─▶ save
                             ─▶ finish(summary)

It is one object with a public API so that the simulation (`federation.Federation`, which holds a
`Server`) and a real FL engine's server (`flare.server`) run the same bookkeeping on the clients'
answers: drop the failed, aggregate, record the validation Dice, select the best round, write the
run folder (metrics.csv, W&B, the model files, state.ckpt).
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_fl.aggregation import StateDict, build_aggregator, update_norm
from lightning_fl.analysis import Overlay
from lightning_fl.checkpoint import CheckpointError, check_compatible, file_sha256
from lightning_fl.client import Answer, Dropped, Trained
from lightning_fl.distributed import checked_on_every_rank
from lightning_fl.errors import RunStopped
from lightning_fl.labels import LabelSpace
from lightning_fl.loggers import RunLogger
from lightning_fl.results import case_means, nanmean, summary_rows
from lightning_fl.run_folder import GLOBAL, VALIDATION, CaseRow, Identity, RunFolder

T = TypeVar("T")
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
    """A model's best validated round so far (0: none yet; rounds are numbered from 1)."""

    round: int = 0
    score: float = -math.inf
    state: StateDict | None = None


@dataclass
class RoundRecord:
    """What one round produced, for metrics.csv, W&B and the model files."""

    round: int
    answers: dict[str, Answer]
    validation: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # (model, site) → class → Dice
    scores: dict[str, float] = field(default_factory=dict)  # validated model → mean Dice
    improved: set[str] = field(default_factory=set)
    seconds: float = 0.0
    overlays: dict[str, Overlay] = field(default_factory=dict)  # site → its first validation case, when shown

    @property
    def trained(self) -> dict[str, Trained]:
        return {name: a for name, a in self.answers.items() if isinstance(a, Trained)}


def state_bytes(state: StateDict) -> int:
    """What sending a state dict costs: its tensors' bytes (W&B's `comm/` metrics)."""
    return sum(t.numel() * t.element_size() for t in state.values())


class Server:
    """The server side of a run: each model's weights, aggregator and best round so far, and the
    run folder they are recorded in.

    `network` gives the initial weights and the architecture saved states are checked against.
    `fabric` is None on an engine's server (one process, which writes the files); in a simulation
    over several processes every rank holds the same server state and only rank 0 writes.
    """

    def __init__(
        self, cfg: DictConfig, labels: LabelSpace, topology: Topology, network: torch.nn.Module, fabric: L.Fabric | None
    ) -> None:
        self.cfg, self.labels, self.topology, self.network, self.fabric = cfg, labels, topology, network, fabric
        self.folder = RunFolder(cfg.output_dir)
        self.is_main = fabric is None or fabric.global_rank == 0
        initial = {k: v.detach().clone() for k, v in network.state_dict().items()}
        self.models: dict[str, StateDict] = {m: initial for m in topology.models}
        self.aggregators = {m: build_aggregator(cfg.fl, initial) for m in topology.models}
        self.best = {m: Best() for m in topology.models}
        self.identity: Identity | None = None
        self.logger: RunLogger | None = None  # rank 0's: metrics.csv and W&B

    # ---------------------------------------------------------------- start or resume
    def start(self) -> int:
        """A new run in its (claimed) folder: its config.yaml and identity, metrics.csv and W&B.
        Returns the first round to train."""

        def outputs() -> Identity:
            identity = self.folder.write_config(self.cfg)  # creates the folder
            self.logger = RunLogger(self.folder, self.cfg)
            return identity

        self.identity = self.on_main("creating the run folder", outputs)  # rank 0's: it writes the files
        return 1

    def resume(self, state: dict[str, Any]) -> int:
        """Continue after the round `state` (a state.ckpt read by `RunFolder.read_state`) was saved
        at: models, aggregators, best rounds and identity; metrics.csv and W&B carry on. Returns
        the first round to train."""
        path = self.folder.state
        if list(state["models"]) != self.topology.models:
            raise CheckpointError(
                f"{path} holds the models {list(state['models'])}, but method.training="
                f"{self.cfg.method.training} trains {self.topology.models}"
            )
        for model, saved in state["models"].items():
            check_compatible(path, saved["state"], state["classes"], self.network, list(self.labels.classes))
            self.models[model] = saved["state"]
            self.aggregators[model].load_state_dict(saved["server"])
            self.best[model] = Best(**saved["best"])
        # config.yaml was checked against the state (`check_same_run`) and may since hold the
        # resume's config changes: the states saved from now on belong to it
        self.identity = replace(Identity.of(state), config_sha256=file_sha256(self.folder.config))
        if self.is_main:
            self.logger = RunLogger(self.folder, self.cfg, resume=(state["metrics_bytes"], state["wandb_id"]))
        return state["round"] + 1

    # ---------------------------------------------------------------- the phases of a round
    def is_validated(self, round: int) -> bool:
        """Every `eval.every` rounds and the last one."""
        return round % self.cfg.eval.every == 0 or round == self.cfg.fl.rounds

    def drop_failed(self, round: int, answers: dict[str, Answer]) -> None:
        """Record the clients whose round failed, turning an outlying update into a failure first
        or clipping it (`bound_outliers`); stop when fewer than `fl.min_sites` updates are left."""
        clipped = self.bound_outliers(answers)
        if clipped:
            self.on_main("recording clipped updates", lambda: self._record_clipped(round, clipped))
        dropped = {name: a.reason for name, a in answers.items() if isinstance(a, Dropped)}
        if dropped:
            self.on_main("recording dropped sites", lambda: self._record_dropped(round, dropped))
        sent = len(answers) - len(dropped)
        if sent < self.cfg.fl.min_sites:
            raise RunStopped(
                f"round {round}: {sent} of {len(answers)} sites sent an update, fewer than fl.min_sites="
                f"{self.cfg.fl.min_sites}; dropped: {'; '.join(f'{k}: {v}' for k, v in dropped.items())}. "
                f"The last good global model is {self.folder.model('last')}"
                + (f" (round {round - 1})" if round > 1 else " (none yet: this was the first round)")
            )

    def bound_outliers(self, answers: dict[str, Answer]) -> dict[str, str]:
        """Every update whose L2 norm exceeds `fl.max_update_ratio` times the median norm of the
        updates to the same model (3 updates at least: with 2 neither is the odd one) becomes a
        `Dropped` answer, or with `fl.outlier_update=clip` is scaled down to that bound; returns the
        clipped sites and why. Finite but absurd updates (a bug, a corrupted batch, a hostile site)
        would otherwise wreck the global model for every site; an update within the bound is
        trusted as it is."""
        ratio, clipped = self.cfg.fl.max_update_ratio, {}
        if ratio == 0:
            return clipped
        for model in self.topology.models:
            norms = {
                name: update_norm(a.delta)
                for name, a in answers.items()
                if isinstance(a, Trained) and self.topology.model_of[name] == model
            }
            if len(norms) < 3:
                continue
            median = statistics.median(norms.values())
            for name, norm in norms.items():
                if norm <= ratio * median:
                    continue
                reason = (
                    f"update norm {norm:.3g} is more than fl.max_update_ratio={ratio:g} times the round's "
                    f"median {median:.3g}"
                )
                answer = answers[name]
                if self.cfg.fl.outlier_update == "drop":
                    answers[name] = Dropped(reason)
                    continue
                scale = ratio * median / norm
                delta = {k: v * scale if v.is_floating_point() else v for k, v in answer.delta.items()}
                answers[name] = replace(answer, delta=delta)
                clipped[name] = f"{reason}: scaled by {scale:.3g} to it"
        return clipped

    def aggregate(self, answers: dict[str, Answer]) -> None:
        """Each model's aggregator turns its clients' updates into its next weights; a model none of
        whose clients sent one keeps its weights."""
        for model in self.topology.models:
            sent = [
                a for name, a in answers.items() if isinstance(a, Trained) and self.topology.model_of[name] == model
            ]
            if sent:
                weights = [float(a.num_cases) if self.cfg.fl.weighting == "cases" else 1.0 for a in sent]
                self.models[model] = self.aggregators[model].aggregate(
                    self.models[model], [a.delta for a in sent], weights
                )

    def record_validation(self, record: RoundRecord, validation: dict[tuple[str, str], dict[str, float]]) -> None:
        """Each (model, site)'s Dice per class, and each model's mean over its sites and classes."""
        record.validation = validation
        for model in self.topology.models:
            record.scores[model] = nanmean(
                [d for (m, _), dice in validation.items() if m == model for d in dice.values()]
            )

    def select(self, record: RoundRecord) -> None:
        """A model's best round is its best validated one (the first validated round at least)."""
        for model, score in record.scores.items():
            best = self.best[model]
            if score > best.score or best.state is None:
                self.best[model] = Best(record.round, score, self.models[model])
                record.improved.add(model)

    def save(
        self,
        record: RoundRecord,
        client_states: dict[str, dict[str, Any]] | None = None,
        timing: dict[str, Any] | None = None,
    ) -> None:
        """metrics.csv, W&B and the model files, then state.ckpt (with the clients' optimizer and
        schedule states where the server holds them: an engine's sites keep their own; and the
        run's time so far, where the loop measures it)."""
        self.on_main(f"writing round {record.round}", lambda: self._record_round(record))
        resumable = {
            "round": record.round,
            "timing": timing or {},
            "classes": list(self.labels.classes),
            "sites": client_states or {},
            "models": {
                m: {"state": self.models[m], "server": self.aggregators[m].state_dict(), "best": vars(self.best[m])}
                for m in self.topology.models
            },
        }
        self.on_main(f"saving round {record.round}", lambda: self._save_state(resumable))

    def finish(self, summary: dict[str, Any]) -> None:
        """summary.json (the run's last file), and the W&B run ended with its scalars and the run's record."""

        def write() -> None:
            assert self.logger is not None
            self.folder.write_summary(summary)
            self.logger.finish({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})

        self.on_main("writing the summary", write)

    def record_test(self, rows: list[CaseRow], summary: dict[str, Any]) -> None:
        """The test of each model's best round: every case in test_cases.csv, the mean Dice per
        (model, site) in metrics.csv (at the model's best round) and W&B with the headline numbers
        and the per-class table (after the last round)."""
        phases = {row.site: row.phase for row in rows}

        def write() -> None:
            logger = self.logger
            assert logger is not None
            for (model, site), dice in case_means(rows).items():
                logger.dice(self.best[model].round, phases[site], site, model, dice)
            headline = {f"test/dice/{c}": v for c, v in summary["test_dice"].items()} | {
                f"external/{e}/dice/{c}": v for e, organs in summary["external_dice"].items() for c, v in organs.items()
            }
            logger.scalars({k: v for k, v in headline.items() if not math.isnan(v)})
            logger.table("test/per_class", *summary_rows(summary))
            logger.commit(step=self.cfg.fl.rounds + 1, round=self.cfg.fl.rounds)
            self.folder.write_cases(rows)

        self.on_main("writing the test scores", write)

    # ---------------------------------------------------------------- writing, on rank 0
    def on_main(self, what: str, write: Callable[[], T]) -> T | None:
        """Run `write` (files, W&B, the console) on rank 0 alone; every rank learns if it failed."""
        if self.fabric is None:
            return write()
        return checked_on_every_rank(self.fabric, what, lambda: write() if self.is_main else None)

    def _save_state(self, resumable: dict[str, Any]) -> None:
        """`state.ckpt`: everything `fit --resume` needs, written last, so it never points past
        what metrics.csv and the model files hold."""
        assert self.logger is not None and self.identity is not None
        metrics_bytes = self.logger.position()
        self.folder.save_state(
            resumable
            | asdict(self.identity)
            | {
                "metrics_bytes": metrics_bytes,
                "metrics_sha256": file_sha256(self.folder.metrics, metrics_bytes),
                "wandb_id": self.logger.wandb_id,
            }
        )

    def _record_round(self, record: RoundRecord) -> None:
        """metrics.csv, W&B and the model files of one round."""
        logger, r = self.logger, record.round
        assert logger is not None and self.identity is not None
        for name, answer in record.trained.items():
            logger.train(r, name, answer.metrics)
        for (model, site), dice in record.validation.items():
            logger.dice(r, VALIDATION, site, model, dice)
        meta = {
            "classes": list(self.labels.classes),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            **asdict(self.identity),
        }
        for model in self.topology.models:
            score = record.scores.get(model, math.nan)
            if model in record.improved:
                self.folder.save_model("best", model, self.models[model], round=r, score=score, **meta)
            self.folder.save_model("last", model, self.models[model], round=r, score=score, **meta)
        size = {model: state_bytes(state) for model, state in self.models.items()}  # each model once
        sent = sum(size[self.topology.model_of[name]] for name in record.answers)
        received = sum(state_bytes(a.delta) for a in record.trained.values())
        logger.scalars(
            {"time/round_s": record.seconds, "comm/bytes_sent": sent, "comm/bytes_received": received}
            | {
                ("val/mean_dice" if model == GLOBAL else f"val/{model}/mean_dice"): score
                for model, score in record.scores.items()
                if not math.isnan(score)
            }
        )
        logger.overlays(record.overlays, dict(enumerate(self.labels.classes)))
        logger.commit(step=r, round=r)

    def _record_clipped(self, round: int, clipped: dict[str, str]) -> None:
        assert self.logger is not None
        for name, reason in clipped.items():
            print(f"warning: round {round}: clipped the update of site '{name}': {reason}", file=sys.stderr)
            self.logger.clipped(round, name, reason)

    def _record_dropped(self, round: int, dropped: dict[str, str]) -> None:
        assert self.logger is not None
        for name, reason in dropped.items():
            print(f"warning: round {round}: dropped the update of site '{name}': {reason}", file=sys.stderr)
            self.logger.dropped(round, name, reason)
