"""The server of an NVFlare job: NVFlare's `ModelController` sends the tasks, this project's
`server.Server`, built by the same recipe as `fit`'s (`build.build_run`), does what `fit`'s server
does with the answers (drop the failed, aggregate, select the best round on the sites' validation
Dice, write the run folder: metrics.csv, W&B, best.ckpt, last.ckpt, state.ckpt).

A site scores the model it receives, which is the one the previous round made, so a validated
round's record is completed by the next round's answers (or, after the last round, by a `validate`
task): the same rounds are validated, on the same cases, as in `fit`.

A job exported with `--resume` continues the run from its state.ckpt (the last round saved) after
the server stopped; each site continues from its own saved optimizer state (`client.SiteStateStore`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, MetaKey
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs
from omegaconf import DictConfig

from lightning_fl.build import build_run
from lightning_fl.client import Answer, Dropped, Trained
from lightning_fl.config import ConfigError, config_changes
from lightning_fl.errors import RunStopped, UserInputError
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
from lightning_fl.run_folder import GLOBAL, RunFolder
from lightning_fl.server import RoundRecord, Server

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

    def _start(self, cfg: DictConfig) -> tuple[Server, int]:
        """The server and the first round to train: a new run's (its folder must not hold one), or
        the saved run's, after checking that its files and the job's config are the run's."""
        server, folder = build_run(cfg).server(), RunFolder(cfg.output_dir)
        if not self.resume:
            self._lock, _ = folder.claim(overwrite=False)
            return server, server.start()
        self._lock = folder.lock()
        state = folder.read_state()
        folder.check_same_run(state)
        changed = config_changes(folder.read_config(), cfg)
        if changed:
            raise ConfigError(
                f"the job's config is not the one of the run in {folder.path} ({', '.join(changed)} differ); "
                f"export the job again with --resume {folder.path}, which takes the run's {folder.CONFIG}"
            )
        if folder.holds_finished_run(state, cfg.fl.rounds):
            return server, cfg.fl.rounds + 1
        folder.record_resume(state["round"], [], [])
        return server, server.resume(state)

    def _rounds(self, cfg: DictConfig) -> None:
        server, first = self._start(cfg)
        if first > cfg.fl.rounds:
            self.info(f"{server.folder.path} holds a finished run ({cfg.fl.rounds} rounds); nothing to do")
            return
        if first > 1:
            self.info(f"resuming {server.folder.path} after round {first - 1} of {cfg.fl.rounds}")
        self.saved_round = first - 1  # the round state.ckpt holds; the sites keep their states from it on
        sites = [s.name for s in cfg.data.sites]
        pending: RoundRecord | None = None  # a validated round waiting for the sites' Dice of its model
        for r in range(first, cfg.fl.rounds + 1):
            start = time.perf_counter()
            answers = self._ask(TRAIN, server, r, validate=pending is not None)
            if pending is not None:
                self._complete(server, pending, answers)
            record = RoundRecord(r, {site: _answer(answers.get(site)) for site in sites})
            server.drop_failed(r, record.answers)
            server.aggregate(record.answers)
            record.seconds = time.perf_counter() - start
            if server.is_validated(r):
                pending = record
            else:
                self._save(server, record)
        if pending is not None:
            self._complete(server, pending, self._ask(VALIDATE, server, cfg.fl.rounds + 1, validate=True))
        best = server.best[GLOBAL]
        server.finish({"rounds": cfg.fl.rounds, "best_round": best.round, "best_validation_dice": best.score})
        self.info(f"best global model: round {best.round}, validation Dice {best.score:.4f}")

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext, **kwargs: Any) -> bool:
        """NVFlare's check of a site's answer; a failed task's return code is kept, to say why the
        site is dropped (NVFlare's message names neither the site's error nor the round)."""
        code = result.get_return_code()
        if code and code != ReturnCode.OK and not kwargs.get("is_unknown_task"):  # not a late answer
            self._failed[client_name] = code
        return super()._accept_train_result(client_name, result, fl_ctx, **kwargs)

    def _ask(self, task: str, server: Server, round: int, validate: bool) -> dict[str, FLModel | str]:
        """Send the global model to every site for `round` (numbered from 1; `fl.rounds + 1`: only
        to score it); by site name, each answer, or the return code NVFlare gave a site's failed
        task (the sites that did not answer are missing)."""
        assert server.identity is not None
        self._failed: dict[str, str] = {}
        model = FLModel(
            params={k: v.contiguous() for k, v in server.models[GLOBAL].items()},  # safetensors' requirement
            current_round=round,
            total_rounds=server.cfg.fl.rounds,
            meta={VALIDATE_RECEIVED: validate, RUN_ID: server.identity.run_id, SAVED_ROUND: self.saved_round},
        )
        answers = self.send_model_and_wait(task_name=task, data=model, timeout=self.task_timeout)
        return self._failed | {answer.meta["client_name"]: answer for answer in answers}

    def _complete(self, server: Server, record: RoundRecord, answers: dict[str, FLModel | str]) -> None:
        """A validated round's Dice (each site's of that round's model), its selection and files."""
        dice = {site: _dice(a) for site, a in answers.items() if isinstance(a, FLModel)}
        scored = {site: d for site, d in dice.items() if d}  # a site that could not start scores nothing
        validation = {(GLOBAL, s.name): scored[s.name] for s in server.cfg.data.sites if s.name in scored}
        server.record_validation(record, validation)
        server.select(record)
        self._save(server, record)

    def _save(self, server: Server, record: RoundRecord) -> None:
        server.save(record)
        self.saved_round = record.round


def _answer(message: FLModel | str | None) -> Answer:
    """A site's reply to `train` as the answer `fit` would have from its client."""
    if message is None:
        return Dropped(NO_ANSWER)
    if isinstance(message, str):
        return Dropped(
            f"NVFlare ended its task with {message} (its process died, stopped sending heartbeats or raised)"
        )
    reason = (message.metrics or {}).get(DROPPED)
    if reason is not None:
        return Dropped(reason)
    meta: dict[str, Any] = message.meta
    steps, cases = meta[MetaKey.NUM_STEPS_CURRENT_ROUND], meta[NUM_CASES]
    return Trained(dict(message.params), steps, cases, dict(meta[TRAIN_METRICS]))


def _dice(answer: FLModel) -> dict[str, float]:
    """The Dice per class a site's answer carries (none where it was not asked to score)."""
    return {name: value for name, value in (answer.metrics or {}).items() if name != DROPPED}
