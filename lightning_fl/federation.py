"""The simulated federation: the round loop on one long-lived Lightning Fabric (`docs/explanation/round-loop.md`).

    send each client its model ─▶ every client trains `local_steps` steps, returns Δ_k
        ─▶ the server drops the failed, aggregates, validates, selects the best, saves

`method.training` says which models there are and who trains them (`server.Topology`): one global
model trained by every site (federated), one model per site that never aggregates (standalone), or
one model trained on every site's cases pooled (centralized). One network object per process serves
as the model being scored and as the frozen teacher the clients distil from: at every moment it
holds the weights a client received. With several processes (`distributed.py`) each rank trains and
validates its own clients' sites; every update and score is then shared from the rank that owns it,
so every rank aggregates the same updates in the same order and holds the same models; only rank 0
writes files, logs and prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig
from tqdm.auto import tqdm

from lightning_fl.analysis import Overlay, write_run_plots
from lightning_fl.build import build_clients, build_run
from lightning_fl.client import Answer, Dropped, Trained
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
from lightning_fl.evaluation import score_cases
from lightning_fl.inference import Predictor
from lightning_fl.labels import LabelSpace
from lightning_fl.objective import StateDict
from lightning_fl.results import nanmean, summary_table, test_summary
from lightning_fl.run_folder import EXTERNAL, GLOBAL, TEST, CaseRow, RunFolder
from lightning_fl.server import RoundRecord

Scores = dict[tuple[str, str], dict[str, list[float]]]  # (model, site) → class → per-case Dice


class Federation:
    """One simulated training run on this rank: a `Server`, the clients this rank trains, and the round loop.

    It exists to own everything that lives for the whole run, so that each round is a sequence of
    small phases over it (`fit`: train the clients, then the server's drop, aggregate, validate,
    select, save; then test). It holds the Fabric; the server; each site's data; the placement of
    clients on ranks; the clients this rank trains; and the scorer of models (the run's network).
    """

    def __init__(self, cfg: DictConfig, fabric: L.Fabric, resume: dict[str, Any] | None = None) -> None:
        self.cfg, self.fabric = cfg, fabric
        run = build_run(cfg)
        self.labels: LabelSpace = run.labels
        self.topology, self.network = run.topology, run.network
        if fabric.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
        root = prepare_data_root(cfg, self.labels)
        self.predictor = Predictor(self.network, fabric, cfg.model)  # reaches the device in setup
        self.site_data = {s.name: load_site(root, s, self.labels) for s in cfg.data.sites}
        self.external = {s.name: load_site(root, s, self.labels, required=("testing",)) for s in cfg.data.external}
        self.scored_sites = self.site_data | self.external  # tested in this order
        cost = {s.name: s.cost for s in cfg.data.sites}
        self.placement = make_placement(
            fabric,
            list(self.topology.clients),
            [sum(cost[s] for s in sites) for sites in self.topology.clients.values()],
        )
        self.hide_bars = True if fabric.global_rank != 0 else (None if cfg.logger.progress else True)  # None: terminals
        shards = {name: self.placement.shard(name) for name in self.topology.clients if self.placement.trains(name)}
        self.clients = checked_on_every_rank(
            fabric,
            "setting up its sites",
            lambda: build_clients(run, fabric, self.site_data, shards, self.predictor.prepare, self.hide_bars),
        )
        for name, client in self.clients.items():  # DDP's constructor is a collective of the client's ranks
            if client.shard[1] > 1:
                client.data_parallel(self.placement.groups[name])
        self.server = run.server(fabric)
        # the time spent on the rounds before a resume (state.ckpt's; none in one saved before it kept it)
        self.timing: dict[str, Any] = {"wall_time_s": 0.0, "round_time_s": []}
        self.first_round = self.server.start() if resume is None else self._resume(resume)
        self._loaders: dict[str, Any] = {}

    def _resume(self, state: dict[str, Any]) -> int:
        """The server's state and each client's optimizer and schedule. Data order, augmentation
        and dropout need nothing: they are seeded per round."""
        first = self.server.resume(state)
        for name, client in self.clients.items():
            client.load_state_dict(state["sites"][name])
        self.timing |= state.get("timing", {})
        return first

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
    def train_clients(self, round: int) -> dict[str, Answer]:
        """Send each client its model and train it; every client's answer on every rank, in config order."""
        models = self.server.models
        mine = checked_on_every_rank(
            self.fabric,
            f"training round {round}",
            lambda: {
                name: client.train(models[self.topology.model_of[name]], round) for name, client in self.clients.items()
            },
        )
        owners = {name: self.placement.owner(name) for name in self.topology.clients}
        rank = self.fabric.global_rank
        reports = merge_from_ranks(
            self.fabric,
            {
                name: answer if isinstance(answer, Dropped) else (answer.num_steps, answer.num_cases, answer.metrics)
                for name, answer in mine.items()
                if owners[name] == rank
            },
        )
        kept = {name: owner for name, owner in owners.items() if not isinstance(reports[name], Dropped)}
        template = models[self.topology.models[0]]
        sent = {name: mine[name].delta if name in mine else None for name in kept}
        deltas = broadcast_states(sent, kept, template)
        return {name: Trained(deltas[name], *reports[name]) if name in kept else reports[name] for name in owners}

    def validate(self, record: RoundRecord) -> None:
        """On validation rounds, each model's Dice on the sites it is trained on, and its mean."""
        r = record.round
        if not self.server.is_validated(r):
            return
        every = self.cfg.logger.wandb.image_every
        last = r == self.cfg.fl.rounds  # the run folder's overlays.png
        show = last or (self.cfg.logger.wandb.mode != "disabled" and every > 0 and r % every == 0)
        scores = self.score(
            self.server.models, self._validated_pairs(), "validation", record.overlays if show else None
        )
        self.server.record_validation(
            record, {pair: {c: nanmean(v) for c, v in dice.items()} for pair, dice in scores.items()}
        )

    def _validated_pairs(self) -> list[tuple[str, str]]:
        """(model, site) for each model and each site it is validated on."""
        return [(m, site) for m in self.topology.models for site in self.topology.validated_on(m)]

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
        """Train every round (from the one after the saved one when resumed), test each model's best
        round and write the summary; returns the summary (`summary.json`)."""
        cfg, server = self.cfg, self.server
        overlays: dict[str, Overlay] = {}  # the last round's, for overlays.png
        round_times: list[float] = list(self.timing["round_time_s"])
        start = time.perf_counter() - self.timing["wall_time_s"]  # a resumed run's time covers its earlier rounds
        rounds = tqdm(
            range(self.first_round, cfg.fl.rounds + 1),
            desc="rounds",
            disable=self.hide_bars,
            initial=self.first_round - 1,
            total=cfg.fl.rounds,
        )
        for r in rounds:
            round_start = time.perf_counter()
            record = RoundRecord(r, self.train_clients(r))
            server.drop_failed(r, record.answers)
            server.aggregate(record.answers)
            self.validate(record)
            server.select(record)
            record.seconds = time.perf_counter() - round_start
            round_times.append(record.seconds)
            overlays = record.overlays
            timing = {"wall_time_s": time.perf_counter() - start, "round_time_s": round_times}
            server.save(record, self._client_states(), timing)
            score, best = nanmean(list(record.scores.values())), nanmean([b.score for b in server.best.values()])
            rounds.set_postfix(val_dice=f"{score:.3f}", best=f"{best:.3f}")
        if self.first_round > cfg.fl.rounds:  # resumed after its last round (stopped while testing)
            self.score(server.models, self._validated_pairs(), "validation", overlays)  # for overlays.png

        summary = self._test()
        summary["device"] = device_name(self.fabric.device)
        summary["precision"] = cfg.fabric.precision
        summary["wall_time_s"] = round(time.perf_counter() - start, 1)
        summary["round_time_s"] = [round(t, 2) for t in round_times]
        memory = merge_from_ranks(self.fabric, {self.fabric.global_rank: peak_memory_mb(self.fabric.device)})
        for key in memory[0]:  # host, and GPU where there is one: one value per rank
            summary[f"peak_{key}_memory_mb"] = [memory[rank][key] for rank in range(self.fabric.world_size)]
        # the plots before summary.json, the mark of a finished run: a run that fails to draw them
        # is cut off, and its resume tests and draws again
        server.on_main("printing and plotting the run", lambda: self._show(summary, overlays))
        server.finish(summary)
        return summary

    def _show(self, summary: dict[str, Any], overlays: dict[str, Overlay]) -> None:
        print(summary_table(summary))
        write_run_plots(self.server.folder.path, overlays, self.labels.classes, summary)

    def _test(self) -> dict[str, Any]:
        """Each model's best round on every site's test split (that site's classes) and on each
        external site (per organ): per case in test_cases.csv, summarised in the summary."""
        server = self.server
        pairs = [(m, site) for m in self.topology.models for site in self.scored_sites]
        scores = self.score({m: server.best[m].state for m in self.topology.models}, pairs, "testing")
        rows = [
            CaseRow(
                EXTERNAL if site in self.external else TEST,
                model,
                site,
                nifti_stem(item["image"]),
                name,
                None if math.isnan(v) else v,
            )
            for (model, site), dice in scores.items()
            for name, values in dice.items()
            for item, v in zip(self.scored_sites[site].splits["testing"], values, strict=True)
        ]
        single = self.topology.models == [GLOBAL]
        best = server.best
        summary: dict[str, Any] = {
            "rounds": self.cfg.fl.rounds,
            "best_round": best[GLOBAL].round if single else {m: b.round for m, b in best.items()},
            "best_validation_dice": best[GLOBAL].score if single else {m: b.score for m, b in best.items()},
        } | test_summary(rows, self.labels.classes, list(self.external))
        server.record_test(rows, summary)
        return summary


@dataclass
class Resume:
    """`fit --resume`: the config keys its overrides change, and the overrides (for resumes.yaml)."""

    changed: list[str]
    overrides: list[str]


def run_fit(cfg: DictConfig, resume: Resume | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Launch the processes the `fabric` config asks for (none beyond this one when Fabric runs under
    torchrun or SLURM, or with one device) and run the federation on each.

    Fabric's launcher and torchrun run this command in every process. Global rank 0 alone claims the
    run folder (`overwrite`: see `RunFolder.claim`), checks a resumed run's files and holds the
    folder's lock until the run ends: the other ranks, started after it (Fabric) or beside it
    (torchrun), would take its lock and fresh files for another run's. A finished run is left as it is."""
    fabric = build_fabric(cfg)
    folder, is_main = RunFolder(cfg.output_dir), fabric.global_rank == 0
    lock, created = None, not folder.path.exists()
    if is_main:
        if resume is None:
            lock, aside = folder.claim(overwrite)
            if aside is not None:
                print(f"moved the previous {folder.path} aside to {aside}")
        else:
            lock = folder.lock()
    try:
        state = None
        if resume is not None:
            state = folder.read_state()
            if is_main:
                folder.check_same_run(state)
            if folder.holds_finished_run(state, cfg.fl.rounds):  # on every rank: they all stop
                print(
                    f"{folder.path} holds a finished run (round {state['round']} of {cfg.fl.rounds} trained, then "
                    f"tested: {folder.SUMMARY}); nothing to do. To train more rounds: "
                    f"fit --resume {folder.path} --allow-config-change fl.rounds=N"
                )
                return folder.read_summary()
            if is_main:
                folder.record_resume(state["round"], resume.changed, resume.overrides)
                if resume.changed:  # the run's config from now on: a later --resume continues with it
                    folder.update_config(cfg)
                folder.summary.unlink(missing_ok=True)  # describes no model of the run until its new test
        if cfg.model.init_checkpoint is not None:
            build_run(cfg)  # a warm start's file is checked here, before any process starts
        labels = LabelSpace.of(cfg.labels)
        root = prepare_data_root(cfg, labels)  # once, before launch
        if cfg.data.check_before_fit and is_main:
            problems = check_federation(root, cfg, labels)
            if problems:
                raise DataCheckError(problems)
        return fabric.launch(_fit_on_rank, cfg, resume is not None)
    finally:
        if lock is not None:
            lock.release()
            if created:
                folder.remove_if_unused()


def _fit_on_rank(fabric: L.Fabric, cfg: DictConfig, resuming: bool) -> dict[str, Any]:
    """The run on one rank. A resumed rank reads state.ckpt itself: the optimizers load its buffers
    without copying them and step them in place, so ranks must not share one state, as processes
    started by `ddp_spawn` would, given it through the launcher's shared memory."""
    state = RunFolder(cfg.output_dir).read_state() if resuming else None
    summary = Federation(cfg, fabric, state).fit()
    leave_process_group(fabric)
    return summary
