"""The federated round loop on one long-lived Lightning Fabric (spec §3; architecture.md, "One round").

    global w_r ─▶ every site: student ← w_r, teacher ← w_r; `local_steps` steps; Δ_k = student − w_r
              ─▶ strategy(w_r, {Δ_k}) = w_{r+1} ─▶ validate w_{r+1} on each site ─▶ log, select, save

One network object serves as the global model, the frozen teacher every site distils from, and the
model that is validated: in one process they are the same weights by definition.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from lightning_fl.checkpoint import atomic_write_text, save_model
from lightning_fl.config import ConfigError, to_yaml
from lightning_fl.data.datasets import SiteData, evaluation_loader, load_site, prepare_data_root, training_batches
from lightning_fl.evaluation import evaluate, nanmean
from lightning_fl.labels import LabelSpace, label_space_from_config
from lightning_fl.loggers import RunLogger, StepMeans, format_table
from lightning_fl.networks import build_network, check_size
from lightning_fl.site import Site, StateDict, freeze
from lightning_fl.strategies import build_strategy


def resolve_precision(fabric_cfg: DictConfig) -> str:
    """`auto`: bf16 autocast where the hardware computes in bf16 (recent GPUs, CPUs with
    AVX512-BF16 or AMX), full float32 elsewhere. Any explicit Fabric precision is kept."""
    if fabric_cfg.precision != "auto":
        return fabric_cfg.precision
    on_gpu = fabric_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def site_generator(seed: int, site: str) -> torch.Generator:
    """The site's own random stream: seeded from the run seed and the site's name only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(site.encode()))


@dataclass
class SiteRuntime:
    data: SiteData
    module: Any  # the Site wrapped by Fabric
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Iterator[dict[str, Tensor]]
    validation: Any

    @property
    def site(self) -> Site:
        return self.module.module


class Federation:
    def __init__(self, cfg: DictConfig) -> None:
        if cfg.fabric.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"fabric.accelerator={cfg.fabric.accelerator}, but PyTorch sees no CUDA GPU here; "
                "use fabric.accelerator=cpu (or auto)"
            )
        cfg.fabric.precision = resolve_precision(cfg.fabric)
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.labels: LabelSpace = label_space_from_config(cfg.labels.classes, cfg.labels.tumors)
        check_size(cfg.model, cfg.data.patch_size, "data.patch_size")
        check_size(cfg.model, cfg.eval.roi_size, "eval.roi_size")
        self.step_means = StepMeans()
        self.fabric = L.Fabric(
            accelerator=cfg.fabric.accelerator, devices=cfg.fabric.devices, precision=cfg.fabric.precision,
            loggers=[self.step_means],
        )
        self.fabric.seed_everything(cfg.seed, verbose=False)
        if self.fabric.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
        root = prepare_data_root(cfg, self.labels)
        self.global_model = freeze(self._network())  # reaches the device with the sites, in fabric.setup
        self.sites = [self._site_runtime(load_site(root, s, self.labels)) for s in cfg.data.sites]
        self.external = load_site(root, cfg.data.external, self.labels, required=("testing",)) if cfg.data.external else None
        self.strategy = build_strategy(cfg.fl, self._global_state())
        self.hide_bars = None if cfg.logger.progress else True  # tqdm's None: bars on terminals only

    def _network(self) -> torch.nn.Module:
        return build_network(self.cfg.model, in_channels=1, out_channels=self.labels.num_classes)

    def _site_runtime(self, data: SiteData) -> SiteRuntime:
        site = Site(
            data.name, data.foreground, self.labels.background_groups(data.foreground), self.labels.num_classes,
            student=self._network(), teacher=self.global_model, cfg=self.cfg,
        )
        opt = site.configure_optimizers()
        module, optimizer = self.fabric.setup(site, opt["optimizer"])
        return SiteRuntime(
            data=data, module=module, optimizer=optimizer, scheduler=opt["lr_scheduler"]["scheduler"],
            batches=training_batches(data, self.cfg.data, site_generator(self.cfg.seed, data.name)),
            validation=evaluation_loader(data.splits["validation"], self.cfg.data),
        )

    def _global_state(self) -> StateDict:
        return {k: v.detach().clone() for k, v in self.global_model.state_dict().items()}

    def _prepare(self, image: Tensor) -> Tensor:
        image = image.to(self.fabric.device)
        return image.to(memory_format=torch.channels_last_3d) if self.cfg.model.channels_last and image.dim() == 5 else image

    def _predictor(self, image: Tensor) -> Tensor:
        with self.fabric.autocast():
            return self.global_model(image).float()

    # ---------------------------------------------------------------- one round
    def train_site(self, runtime: SiteRuntime, global_state: StateDict, round_index: int) -> tuple[StateDict, dict[str, float]]:
        """Local training of one site for one round: returns (Δ_k, mean step metrics)."""
        site, module = runtime.site, runtime.module
        site.receive(global_state, round_index)
        module.train()
        clip = self.cfg.optim.grad_clip_norm
        steps = tqdm(range(self.cfg.fl.local_steps), desc=f"  {site.site_name}", leave=False, disable=self.hide_bars)
        for step in steps:
            batch = next(runtime.batches)
            batch = {"image": self._prepare(batch["image"].as_tensor()),
                     "label": batch["label"].as_tensor().to(self.fabric.device)}
            with self.fabric.autocast():  # Fabric applies its precision to forward(), not to training_step()
                loss = module.training_step(batch, step)
            self.fabric.backward(loss)
            if clip > 0:
                self.fabric.clip_gradients(module, runtime.optimizer, max_norm=clip)
            runtime.optimizer.step()
            runtime.optimizer.zero_grad(set_to_none=True)
            runtime.scheduler.step()
            steps.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        return site.update(global_state), self.step_means.pop()

    def aggregation_weights(self) -> list[float]:
        if self.cfg.fl.weighting == "cases":
            return [float(r.data.num_training_cases) for r in self.sites]
        return [1.0] * len(self.sites)

    def validate(self, site: SiteData, loader: Any, organ_level: bool = False) -> dict[str, float]:
        """Mean Dice per class of the current global model on one site's split."""
        if organ_level:
            classes = [self.labels.index(c) for c in site.classes]
            lut = torch.as_tensor(self.labels.organ_lut())
        else:
            classes, lut = site.foreground, None
        scores = evaluate(self._predictor, loader, classes, self.cfg.eval, self._prepare, pred_lut=lut)
        return {self.labels.classes[c]: nanmean(v) for c, v in scores.items()}

    # ---------------------------------------------------------------- the run
    def fit(self) -> dict[str, Any]:
        cfg, out = self.cfg, self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
        logger = RunLogger(out, cfg)
        meta = {"classes": list(self.labels.classes), "config": OmegaConf.to_container(cfg, resolve=True)}
        best_score, best_round, best_state = -math.inf, -1, None
        start = time.perf_counter()
        rounds = tqdm(range(cfg.fl.rounds), desc="rounds", disable=self.hide_bars)
        for r in rounds:
            round_start = time.perf_counter()
            global_state = self._global_state()
            updates = []
            for runtime in self.sites:
                update, means = self.train_site(runtime, global_state, r)
                updates.append(update)
                logger.train(r, runtime.data.name, means)
            self.global_model.load_state_dict(self.strategy.aggregate(global_state, updates, self.aggregation_weights()))

            val = {rt.data.name: self.validate(rt.data, rt.validation) for rt in self.sites}
            for name, dice in val.items():
                logger.dice(r, "validation", name, "global", dice)
            score = nanmean([d for dice in val.values() for d in dice.values()])
            state = self._global_state()
            if score > best_score or best_state is None:
                best_score, best_round, best_state = score, r, state
                save_model(out / "best.ckpt", state, round=r, score=score, **meta)
            save_model(out / "last.ckpt", state, round=r, score=score, **meta)
            logger.scalars({"validation/mean_dice": score, "time/round_s": time.perf_counter() - round_start})
            logger.commit(r)
            rounds.set_postfix(val_dice=f"{score:.3f}", best=f"{best_score:.3f}@{best_round}")

        summary = self._test(best_state, best_round, best_score, logger)
        summary["wall_time_s"] = round(time.perf_counter() - start, 1)
        atomic_write_text(out / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
        logger.finish({k: v for k, v in summary.items() if not isinstance(v, dict)})
        print(summary_table(summary))
        return summary

    def _test(self, best_state: StateDict, best_round: int, best_score: float, logger: RunLogger) -> dict[str, Any]:
        """The best global model on every site's test split (its own classes) and on the external set."""
        self.global_model.load_state_dict(best_state)
        test_dice: dict[str, float] = {}
        for rt in self.sites:
            dice = self.validate(rt.data, evaluation_loader(rt.data.splits["testing"], self.cfg.data))
            logger.dice(best_round, "test", rt.data.name, "best", dice)
            test_dice |= dice
        external_dice: dict[str, float] = {}
        if self.external is not None:
            loader = evaluation_loader(self.external.splits["testing"], self.cfg.data)
            external_dice = self.validate(self.external, loader, organ_level=True)
            logger.dice(best_round, "external", self.external.name, "best", external_dice)
        ordered = {c: test_dice[c] for c in self.labels.classes if c in test_dice}
        logger.commit(self.cfg.fl.rounds)
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
    the external set."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"

    external = summary["external_dice"]
    rows = [[name, fmt(dice), fmt(external.get(name))] for name, dice in summary["test_dice"].items()]
    rows.append(["mean", fmt(summary["test_mean_dice"]), fmt(nanmean(list(external.values())) if external else None)])
    title = (f"Best global model: after round {summary['best_round'] + 1} of {summary['rounds']}, "
             f"validation Dice {summary['best_validation_dice']:.4f}")
    return f"\n{title}\n" + format_table(rows, ["class", "test Dice", "external Dice"])


def run_fit(cfg: DictConfig) -> dict[str, Any]:
    return Federation(cfg).fit()
