"""The server of an NVFlare job: NVFlare's `ModelController` sends the tasks, this project's
`federation.Server` does what `fit`'s server does with the answers (drop the failed, aggregate with
`lightning_fl.strategies`, select the best round on the sites' validation Dice, write the run
folder: metrics.csv, W&B, best.ckpt, last.ckpt, state.ckpt).

A site scores the model it receives, which is the one the previous round made, so a validated
round's record is completed by the next round's answers (or, after the last round, by a `validate`
task): the same rounds are validated, on the same cases, as in `fit`.

A job exported with `--resume` continues the run from its state.ckpt (the last round saved) after
the server stopped; each site continues from its own saved optimizer state (`client.SiteState`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning import seed_everything
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, MetaKey
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs
from omegaconf import DictConfig

from lightning_fl.checkpoint import claim_run_folder, lock_run_folder
from lightning_fl.client import ClientUpdate
from lightning_fl.config import ConfigError, config_changes
from lightning_fl.errors import RunStopped, UserInputError
from lightning_fl.federation import RoundRecord, Server, Topology, check_same_run, read_state, record_resume
from lightning_fl.flare import (
    CONFIG_FILE,
    DROPPED,
    NUM_CASES,
    RUN_ID,
    SAVED_ROUND,
    TRAIN,
    TRAIN_METRICS,
    VALIDATE,
    VALIDATE_RECEIVED,
)
from lightning_fl.flare.client import read_job_config
from lightning_fl.labels import label_space_from_config
from lightning_fl.loggers import RunLogger
from lightning_fl.networks import build_network
from lightning_fl.scores import GLOBAL

NO_ANSWER = "no answer within --task-timeout (the site is stopped, unreachable or too slow)"


class ConDistFLController(ModelController):
    """The job's server-side workflow: `fl.rounds` rounds of `train`, then `validate` the last model.

    Args (NVFlare writes them into the job's server config):
        config_file: the run's config in the server app's config folder.
        task_timeout: seconds a round waits for the sites (0: for ever); a site that has not
            answered by then is dropped for the round, as a failed site is in `fit`.
        resume: continue the run in `output_dir` from its state.ckpt instead of starting one.
    """

    def __init__(self, config_file: str = CONFIG_FILE, task_timeout: int = 0, resume: bool = False) -> None:
        super().__init__(ignore_result_error=True)  # a failing site is dropped; fl.min_sites decides
        self.config_file, self.task_timeout, self.resume = config_file, task_timeout, resume

    def run(self) -> None:
        fobs.register(TensorDecomposer)  # the weights travel as torch tensors
        self._lock = None
        try:
            self._rounds(read_job_config(Path(self.get_app_dir()) / "config" / self.config_file))
        except (UserInputError, RunStopped) as err:
            self.panic(f"lightning-fl: {err}")
        finally:
            if self._lock is not None:
                self._lock.release()

    def _start(self, cfg: DictConfig) -> Server:
        """The server's state: a new run's (its folder must not hold one), or the saved run's."""
        out = Path(cfg.output_dir)
        labels = label_space_from_config(cfg.labels.classes, cfg.labels.tumors)
        seed_everything(cfg.seed, verbose=False)  # the initial model of `fit`
        network = build_network(cfg.model, in_channels=1, out_channels=labels.num_classes)
        topology = Topology.of(cfg.method.training, [s.name for s in cfg.data.sites])
        if not self.resume:
            self._lock, _ = claim_run_folder(out, overwrite=False)
            return Server(cfg, labels, topology, network)
        self._lock = lock_run_folder(out)
        state = read_state(out)
        check_same_run(out, state)
        changed = config_changes(read_job_config(out / "config.yaml"), cfg)
        if changed:
            raise ConfigError(
                f"the job's config is not the one of the run in {out} ({', '.join(changed)} differ); "
                f"export the job again with --resume {out}, which takes the run's config.yaml"
            )
        server = Server(cfg, labels, topology, network, resume=state)
        server._load_state(state)
        return server

    def _rounds(self, cfg: DictConfig) -> None:
        server = self._start(cfg)
        first = 0 if server.resume is None else server.resume["round"] + 1
        self.saved_round = first - 1  # the round state.ckpt holds; the sites keep their states from it on
        if first >= cfg.fl.rounds and (server.output_dir / "summary.json").is_file():
            self.info(f"{server.output_dir} holds a finished run ({cfg.fl.rounds} rounds); nothing to do")
            return
        if first:
            record_resume(server.output_dir, first - 1, [], [])
            self.info(f"resuming {server.output_dir} after round {first} of {cfg.fl.rounds}")
        logger = server._start_outputs()
        sites = [s.name for s in cfg.data.sites]
        pending: RoundRecord | None = None  # a validated round waiting for the sites' Dice of its model
        for r in range(first, cfg.fl.rounds):
            start = time.perf_counter()
            answers = self._ask(TRAIN, server, r, validate=pending is not None)
            if pending is not None:
                self._complete(server, logger, pending, answers)
            updates = {site: _update(answers.get(site)) for site in sites}
            server.drop_failed(logger, r, updates)
            server.aggregate(updates)
            record = RoundRecord(r, updates, seconds=time.perf_counter() - start)
            if server.is_validated(r):
                pending = record
            else:
                self._save(server, logger, record)
        if pending is not None:
            self._complete(server, logger, pending, self._ask(VALIDATE, server, cfg.fl.rounds, validate=True))
        best = server.best[GLOBAL]
        summary = {"rounds": cfg.fl.rounds, "best_round": best.round, "best_validation_dice": best.score}
        server.write_summary(logger, summary)
        self.info(f"best global model: round {best.round + 1}, validation Dice {best.score:.4f}")

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext, **kwargs: Any) -> bool:
        """NVFlare's check of a site's answer; a failed task's return code is kept, to say why the
        site is dropped (NVFlare's message names neither the site's error nor the round)."""
        code = result.get_return_code()
        if code and code != ReturnCode.OK and not kwargs.get("is_unknown_task"):  # not a late answer
            self._failed[client_name] = code
        return super()._accept_train_result(client_name, result, fl_ctx, **kwargs)

    def _ask(self, task: str, server: Server, round_index: int, validate: bool) -> dict[str, FLModel | str]:
        """Send the global model to every site; by site name, each answer, or the return code
        NVFlare gave a site's failed task (the sites that did not answer are missing)."""
        self._failed: dict[str, str] = {}
        model = FLModel(
            params={k: v.contiguous() for k, v in server.models[GLOBAL].items()},  # safetensors' requirement
            current_round=round_index,
            total_rounds=server.cfg.fl.rounds,
            meta={VALIDATE_RECEIVED: validate, RUN_ID: server.identity["run_id"], SAVED_ROUND: self.saved_round},
        )
        answers = self.send_model_and_wait(task_name=task, data=model, timeout=self.task_timeout)
        return self._failed | {answer.meta["client_name"]: answer for answer in answers}

    def _complete(
        self, server: Server, logger: RunLogger, record: RoundRecord, answers: dict[str, FLModel | str]
    ) -> None:
        """A validated round's Dice (each site's of that round's model), its selection and files."""
        dice = {site: _dice(a) for site, a in answers.items() if isinstance(a, FLModel)}
        scored = {site: d for site, d in dice.items() if d}  # a site that could not start scores nothing
        validation = {(GLOBAL, s.name): scored[s.name] for s in server.cfg.data.sites if s.name in scored}
        server.record_validation(record, validation)
        server.select(record)
        self._save(server, logger, record)

    def _save(self, server: Server, logger: RunLogger, record: RoundRecord) -> None:
        server.save(logger, record)
        self.saved_round = record.round


def _update(answer: FLModel | str | None) -> ClientUpdate:
    """A site's answer to `train` as the update `fit` would have from it."""
    if answer is None:
        return ClientUpdate(None, 0, 0, {DROPPED: NO_ANSWER})
    if isinstance(answer, str):
        reason = f"NVFlare ended its task with {answer} (its process died, stopped sending heartbeats or raised)"
        return ClientUpdate(None, 0, 0, {DROPPED: reason})
    meta: dict[str, Any] = answer.meta
    steps, cases = meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND, 0), meta.get(NUM_CASES, 0)
    reason = (answer.metrics or {}).get(DROPPED)
    if reason is not None:
        return ClientUpdate(None, steps, cases, {DROPPED: reason})
    return ClientUpdate(dict(answer.params), steps, cases, dict(meta[TRAIN_METRICS]))


def _dice(answer: FLModel) -> dict[str, float]:
    """The Dice per class a site's answer carries (none where it was not asked to score)."""
    return {name: value for name, value in (answer.metrics or {}).items() if name != DROPPED}
