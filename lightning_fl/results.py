"""What a run's scores say, computed once: which rows speak for a model, means per run, means ± std
over seeds, paired differences with intervals over seeds and over cases, and the tables that show them.

`fit` summarises its run here (`summary.json` and the console table), `sweep` writes its tables
here (`results.csv`, `results.md`) and the notebooks read a sweep back here, so "ConDistFL's liver
Dice" is computed by one function wherever it is shown. numpy only: no torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from lightning_fl.config import CONFIG_DIR, file_holds
from lightning_fl.labels import LabelSpace
from lightning_fl.run_folder import EXTERNAL, GLOBAL, TEST, VALIDATION, CaseRow, RunFolder, SweepFolder
from lightning_fl.sweep_plan import SET_BY_SWEEP, Sweep

Results = dict[tuple[str, int], list[CaseRow]]  # (variant, seed) → its run's test cases
PerRun = dict[tuple[str, int], dict[str, float]]  # (variant, seed) → class → Dice
RESULT_COLUMNS = ("variant", "seed", "phase", "model", "site", "class", "dice", "cases")
ALL_CLASSES = "all classes"
REPOSITORY = CONFIG_DIR.parent
# what may differ between the runs of one variant: the sweep's per-run keys, and the machine
SEED_RUN_KEYS = (*SET_BY_SWEEP, "fabric.precision", "fabric.devices")
RESAMPLES, BOOTSTRAP_SEED = 10_000, 0


# ---------------------------------------------------------------- one run
def nanmean(values: Sequence[float]) -> float:
    """numpy's mean of the values that are not NaN; NaN when there are none (a class no case contains).
    The one mean of Dice values: per case, per class, per run and over seeds alike."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def headline_rows(rows: list[CaseRow]) -> list[CaseRow]:
    """The rows a run's headline numbers come from: the global model's (federated and centralized
    runs), or, where each site has its own model (standalone), each site's model on its own test
    split and, on the external sites, on the classes its site labels."""
    if any(row.model == GLOBAL for row in rows):
        return [row for row in rows if row.model == GLOBAL]
    own = [row for row in rows if row.phase == TEST and row.model == row.site]
    learnt = {(row.model, row.cls) for row in own}
    return own + [row for row in rows if row.phase == EXTERNAL and (row.model, row.cls) in learnt]


def pooled(rows: Iterable[CaseRow], phase: str, site: str | None = None) -> dict[str, list[float]]:
    """Each class's Dice over the cases that have it, pooled over the sites that label it (or of one site)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        if row.phase == phase and site in (None, row.site):
            values.setdefault(row.cls, [])
            if row.dice is not None:
                values[row.cls].append(row.dice)
    return values


def class_means(rows: Iterable[CaseRow], phase: str, site: str | None = None) -> dict[str, float]:
    """Each class's mean Dice over the cases that have it (pooled over the sites that label it)."""
    return {cls: nanmean(v) for cls, v in pooled(rows, phase, site).items()}


def run_mean(dice: Mapping[str, float]) -> float:
    """A run's mean over its classes (those with a value): the tables' mean row."""
    return nanmean([v for v in dice.values() if v is not None])


def test_summary(rows: list[CaseRow], classes: Sequence[str], external: Sequence[str]) -> dict[str, Any]:
    """The test part of a run's summary: each class's Dice over the cases of the sites that label
    it, their mean, each organ's on every external site (the headline rows), and, where each site
    has its own model, every model on every site (`cross_site`)."""
    headline = headline_rows(rows)
    test = class_means(headline, TEST)
    test_dice = {c: test[c] for c in classes if c in test}
    summary: dict[str, Any] = {
        "test_dice": test_dice,
        "test_mean_dice": nanmean(list(test_dice.values())),
        "external_dice": {e: class_means(headline, EXTERNAL, e) for e in external},
    }
    if not any(row.model == GLOBAL for row in rows):
        cross: dict[str, dict[str, dict[str, float]]] = {}
        for (model, site), means in case_means(rows).items():
            cross.setdefault(model, {})[site] = means
        summary["cross_site"] = cross
    return summary


def case_means(rows: list[CaseRow]) -> dict[tuple[str, str], dict[str, float]]:
    """(model, site) → class → mean Dice over that site's cases (NaN: no case has it), in row order."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in rows:
        per_class = values.setdefault((row.model, row.site), {}).setdefault(row.cls, [])
        if row.dice is not None:
            per_class.append(row.dice)
    return {key: {c: nanmean(v) for c, v in by.items()} for key, by in values.items()}


def summary_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The header and rows of the end-of-run per-class table (the console's and W&B's): each
    class's test Dice, then one column per external site (None: not scored there), then the means."""
    external = summary["external_dice"]

    def value(v: float | None) -> float | None:
        return None if v is None or math.isnan(v) else v

    rows = [
        [name, value(dice), *(value(organs.get(name)) for organs in external.values())]
        for name, dice in summary["test_dice"].items()
    ]
    rows.append(["mean", value(summary["test_mean_dice"]), *(value(run_mean(o)) for o in external.values())])
    return ["class", "test Dice", *(f"{name} Dice" for name in external)], rows


def summary_table(summary: Mapping[str, Any]) -> str:
    """The end-of-run table: each class's test Dice at the sites that label it, and per organ on
    each external site (a column each); a standalone run adds each site's model on every site."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"

    header, numbers = summary_rows(summary)
    rows = [[name, *map(fmt, values)] for name, *values in numbers]
    if "cross_site" not in summary:
        title = (
            f"Best global model: after round {summary['best_round']} of {summary['rounds']}, "
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
        [f"{model} (round {summary['best_round'][model]})", *(fmt(run_mean(dice[s])) for s in sites)]
        for model, dice in cross.items()
    ]
    return (
        f"\n{title}\n"
        + format_table(rows, header)
        + "\n\nEvery site's model on every site (mean Dice over the classes each site labels)\n"
        + format_table(cross_rows, ["model", *sites])
    )


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain aligned text table (stdout may be a log file, not a terminal)."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(row: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "-" * len(line(header))] + [line(r) for r in rows])


# ---------------------------------------------------------------- over seeds
def over_seeds(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std of the finite values (std 0 for one, NaN for none)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return nanmean(finite), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def mean_std(values: Iterable[float]) -> str:
    """A table cell over seeds: `mean ± std` (sample std), the mean alone for one seed, n/a for none."""
    finite = [v for v in values if not math.isnan(v)]
    mean, std = over_seeds(finite)
    return "n/a" if not finite else f"{mean:.3f}" if len(finite) == 1 else f"{mean:.3f} ± {std:.3f}"


def per_run(results: Results, phase: str = TEST, site: str | None = None) -> PerRun:
    """Each run's class means over the cases of its headline model (`phase`; `site`: one external site)."""
    return {key: class_means(headline_rows(rows), phase, site) for key, rows in results.items()}


def variants_of(results: Mapping[tuple[str, int], Any]) -> list[str]:
    return list(dict.fromkeys(v for v, _ in results))


def seed_table(by_run: PerRun, variants: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Rows = classes (in the order the runs list them) and their mean; columns = variants; cells
    mean ± std over the variant's seeds (results.md's tables, the sweep notebook's)."""
    classes = list(dict.fromkeys(cls for means in by_run.values() for cls in means))

    def cell(variant: str, value: Any) -> str:
        return mean_std(value(dice) for (v, _), dice in by_run.items() if v == variant)

    rows = [[c, *(cell(v, lambda d, c=c: d.get(c, math.nan)) for v in variants)] for c in classes]
    return ["class", *variants], rows + [["mean", *(cell(v, run_mean) for v in variants)]]


def standalone_variants(results: Results) -> list[str]:
    """The variants whose sites each have their own model (`method=standalone`)."""
    federated = {v for (v, _), rows in results.items() if any(row.model == GLOBAL for row in rows)}
    return [v for v in variants_of(results) if v not in federated]


def cross_site(results: Results, variant: str) -> tuple[list[str], list[str], np.ndarray]:
    """A standalone variant's every site model (rows) on every site's test split and class
    (columns `site/class`), mean over seeds of each run's mean over cases (NaN: not scored)."""
    runs = [[row for row in rows if row.phase == TEST] for (v, _), rows in results.items() if v == variant]
    models = list(dict.fromkeys(row.model for rows in runs for row in rows))
    columns = list(dict.fromkeys((row.site, row.cls) for rows in runs for row in rows))
    seeds: dict[tuple[str, str, str], list[float]] = {}
    for rows in runs:
        for (model, site), means in case_means(rows).items():
            for cls, value in means.items():
                if not math.isnan(value):
                    seeds.setdefault((model, site, cls), []).append(value)
    matrix = np.full((len(models), len(columns)), np.nan)
    for (model, site, cls), values in seeds.items():
        matrix[models.index(model), columns.index((site, cls))] = np.mean(values)
    return models, [f"{site}/{cls}" for site, cls in columns], matrix


def frequency_points(configs: Mapping[str, DictConfig], by_run: PerRun) -> dict[str, dict[int, list[float]]]:
    """Method → local steps per round → each finished run's test mean Dice, from each variant's
    config. A method is the variants whose configs differ only in how often they aggregate, named
    by their names' common prefix (`condistfl_6steps`, `condistfl_24steps` → `condistfl`)."""
    methods: dict[str, list[str]] = {}
    for variant, cfg in configs.items():
        methods.setdefault(_method_key(cfg), []).append(variant)
    points: dict[str, dict[int, list[float]]] = {}
    for variants in methods.values():
        label = os.path.commonprefix(variants).rstrip("_-") or variants[0]
        for (variant, _), dice in by_run.items():
            if variant in variants:
                points.setdefault(label, {}).setdefault(configs[variant].fl.local_steps, []).append(run_mean(dice))
    return points


def _method_key(cfg: DictConfig) -> str:
    """A variant's config but for how often it aggregates (fl.rounds, fl.local_steps, eval.every)
    and what runs it (seed, folder, logger, fabric): the variants of one method share it."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in ("seed", "output_dir", "logger", "fabric"):
        config.pop(key, None)
    for section, key in (("fl", "rounds"), ("fl", "local_steps"), ("eval", "every")):
        config[section].pop(key, None)
    return json.dumps(config, sort_keys=True, default=str)


# ---------------------------------------------------------------- paired differences
def bootstrap_mean(
    values: Sequence[float],
    clusters: Sequence[Any] | None = None,
    resamples: int = RESAMPLES,
    level: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """The mean of `values` and its percentile bootstrap interval at `level`: the cases
    (`clusters`, one per value by default) are resampled with replacement, each with all its values,
    so that the classes and seeds of one case count as the one case they are. Reproducible: a fixed seed."""
    values = np.asarray(values, dtype=float)
    if not len(values):
        raise ValueError("bootstrap_mean needs at least one value")
    keys = list(range(len(values))) if clusters is None else list(clusters)
    ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    index = np.array([ids[key] for key in keys])
    sums, counts = np.bincount(index, weights=values), np.bincount(index).astype(float)
    rng, means = np.random.default_rng(seed), []
    for start in range(0, resamples, 1000):  # chunks keep memory at 1000 × cases
        draws = rng.integers(0, len(sums), size=(min(1000, resamples - start), len(sums)))
        means.append(sums[draws].sum(axis=1) / counts[draws].sum(axis=1))
    low, high = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


def _case_scores(results: Results, variant: str) -> dict[tuple[int, str, str, str, str], float]:
    """(seed, phase, site, case, class) → the Dice of the variant's headline model (the mean, should
    several models score it)."""
    scores: dict[tuple[int, str, str, str, str], list[float]] = {}
    for (v, seed), rows in results.items():
        if v == variant:
            for row in headline_rows(rows):
                if row.dice is not None:
                    scores.setdefault((seed, row.phase, row.site, row.case, row.cls), []).append(row.dice)
    return {key: nanmean(values) for key, values in scores.items()}


def seed_interval(per_seed: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The Student t interval at `level` of the mean of per-seed values (S − 1 degrees of freedom):
    the spread that retraining with another seed gives, which no resampling of one model's cases
    shows. NaN with fewer than two seeds."""
    values = np.asarray(per_seed, dtype=float)
    if len(values) < 2:
        return math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


class Difference(NamedTuple):
    """a − b over one class (or all) of the test splits or of one external site: the mean over every
    pair, its interval over seeds (each seed's mean difference, t interval) and over cases (bootstrap)."""

    group: str  # "test" or "external: <site>"
    cls: str  # a class, or ALL_CLASSES
    n: int  # paired values (case × class × seed)
    seeds: int  # seeds that scored a pair
    cases: int  # distinct cases (site, case)
    mean: float
    seed_low: float
    seed_high: float
    case_low: float
    case_high: float

    def cells(self) -> list[str]:
        """seeds, cases, n, the mean and both intervals, as every table writes them."""
        seeds = "n/a" if math.isnan(self.seed_low) else f"[{signed(self.seed_low)}, {signed(self.seed_high)}]"
        cases = f"[{signed(self.case_low)}, {signed(self.case_high)}]"
        return [str(self.seeds), str(self.cases), str(self.n), signed(self.mean), seeds, cases]

    @property
    def verdict(self) -> str:
        """ "> 0" or "< 0" where both intervals lie on that side of 0; else "not shown"."""
        if self.seed_low > 0 and self.case_low > 0:
            return "> 0"
        if self.seed_high < 0 and self.case_high < 0:
            return "< 0"
        return "not shown"


def paired_differences(results: Results, a: str, b: str) -> list[Difference]:
    """a − b over the cases both scored (same seed, phase, site, case and class, Dice in both), per
    class and over all classes, for the test splits and each external site."""
    scores_a, scores_b = _case_scores(results, a), _case_scores(results, b)
    groups: dict[tuple[str, str], list[tuple[float, tuple[str, str], int]]] = {}
    for key, value in scores_a.items():
        if key in scores_b:
            seed, phase, site, case, cls = key
            group = TEST if phase == TEST else f"{EXTERNAL}: {site}"
            pair = (value - scores_b[key], (site, case), seed)
            groups.setdefault((group, cls), []).append(pair)
            groups.setdefault((group, ALL_CLASSES), []).append(pair)
    ordered = [
        key
        for group in dict.fromkeys(g for g, _ in groups)
        for key in [*(k for k in groups if k[0] == group and k[1] != ALL_CLASSES), (group, ALL_CLASSES)]
    ]
    differences = []
    for group, cls in ordered:
        diffs, clusters, seeds = zip(*groups[(group, cls)])
        by_seed: dict[int, list[float]] = {}
        for diff, seed in zip(diffs, seeds):
            by_seed.setdefault(seed, []).append(diff)
        mean, case_low, case_high = bootstrap_mean(diffs, clusters)
        seed_low, seed_high = seed_interval([float(np.mean(v)) for v in by_seed.values()])
        differences.append(
            Difference(
                group, cls, len(diffs), len(by_seed), len(set(clusters)), mean, seed_low, seed_high, case_low, case_high
            )
        )
    return differences


# ---------------------------------------------------------------- a sweep's tables
CONVERGED_CHANGE = 0.01  # a run has converged when its validation curve's last quarter moves less


def validation_curve(metrics: Iterable[Mapping[str, str]], classes: Container[str] | None = None) -> dict[int, float]:
    """Round → mean validation Dice over every model, site and class scored that round (metrics.csv's
    rows), or over `classes` only: the curve whose tail says whether a run has converged."""
    values: dict[int, list[float]] = {}
    for row in metrics:
        if row["phase"] == VALIDATION and row["dice"] != "" and (classes is None or row["class"] in classes):
            values.setdefault(int(row["round"]), []).append(float(row["dice"]))
    return {r: nanmean(v) for r, v in sorted(values.items())}


def _last_quarter(curve: Mapping[int, float], rounds: int) -> list[float]:
    """The curve's values from round R − ⌈R/4⌉ to the last round R, in order."""
    return [v for r, v in sorted(curve.items()) if r >= rounds - math.ceil(rounds / 4)]


def last_quarter_change(curve: Mapping[int, float], rounds: int) -> float:
    """How far the curve moves (max − min) from round R − ⌈R/4⌉ to the last round R: where the best
    round lies when this is small is not an artefact of stopping early. NaN with fewer than two
    validated rounds there."""
    tail = _last_quarter(curve, rounds)
    return max(tail) - min(tail) if len(tail) >= 2 else math.nan


def last_quarter_rise(curve: Mapping[int, float], rounds: int) -> float:
    """The curve's last value minus its first over the same rounds: near the change when the run is
    still climbing, near 0 when it only jitters about a plateau. NaN with fewer than two validated rounds."""
    tail = _last_quarter(curve, rounds)
    return tail[-1] - tail[0] if len(tail) >= 2 else math.nan


def run_costs(
    runs: Mapping[tuple[str, int], RunFolder], configs: Mapping[str, DictConfig]
) -> dict[tuple[str, int], dict[str, Any]]:
    """What each finished run cost and where it ended, from its summary.json and metrics.csv: wall
    time, time per round, device, precision, and its validation curve's last-quarter change, also
    over its organs and over its tumours alone (which of them still moves; `configs`: each variant's,
    for its label space), and its last-quarter rise (whether it still climbs)."""
    costs = {}
    for (variant, seed), folder in runs.items():
        summary = folder.read_summary()
        if summary:
            rounds = summary.get("round_time_s") or [math.nan]
            metrics = folder.read_metrics()
            labels = LabelSpace.of(configs[variant].labels)
            tumours = set(labels.tumor_of)
            organs = set(labels.classes[1:]) - tumours  # classes[0] is the background
            costs[(variant, seed)] = {
                "wall_s": summary.get("wall_time_s", math.nan),
                "round_s": sum(rounds) / len(rounds),
                "device": summary.get("device", "not recorded"),
                "precision": summary.get("precision", "not recorded"),
                **{
                    name: last_quarter_change(validation_curve(metrics, classes), summary["rounds"])
                    for name, classes in (("tail_change", None), ("organs", organs), ("tumours", tumours))
                },
                "tail_rise": last_quarter_rise(validation_curve(metrics), summary["rounds"]),
            }
    return costs


def results_csv(results: Results) -> str:
    """One row per run × phase × model × site × class: the mean Dice over the cases that have the
    class, and how many they are."""
    groups: dict[tuple[Any, ...], list[float]] = {}
    for (variant, seed), rows in results.items():
        for row in rows:
            values = groups.setdefault((variant, seed, row.phase, row.model, row.site, row.cls), [])
            if row.dice is not None:
                values.append(row.dice)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for key, values in groups.items():
        writer.writerow([*key, repr(nanmean(values)) if values else "", len(values)])
    return out.getvalue()


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table, then an empty one."""
    lines = [header, ["---"] * len(header), *rows]
    return ["| " + " | ".join(line) + " |" for line in lines] + [""]


def signed(value: float) -> str:
    """+0.012 / -0.012, and +0.000 rather than a rounding's -0.000."""
    return f"{round(value, 3) + 0.0:+.3f}"


def rise_cell(value: float) -> str:
    """A mean rise over the last quarter; n/a where a run validated too few rounds in it."""
    return "n/a" if math.isnan(value) else signed(value)


def _time_table(variants: Sequence[str], costs: Mapping[tuple[str, int], dict[str, Any]]) -> list[str]:
    """Per variant: minutes per run and seconds per round (mean over its seeds), the largest
    last-quarter change of a seed's validation curve, its mean last-quarter rise and how many seeds
    converged, where and how it ran."""
    rows = []
    for variant in variants:
        mine = [c for (v, _), c in costs.items() if v == variant]
        if mine:
            changes = [c["tail_change"] for c in mine]
            rows.append(
                [
                    variant,
                    str(len(mine)),
                    f"{np.mean([c['wall_s'] for c in mine]) / 60:.1f}",
                    f"{np.mean([c['round_s'] for c in mine]):.1f}",
                    *(_largest([c[part] for c in mine]) for part in ("tail_change", "organs", "tumours")),
                    rise_cell(float(np.mean([c["tail_rise"] for c in mine]))),
                    f"{sum(x < CONVERGED_CHANGE for x in changes)} of {len(mine)}",
                    "; ".join(sorted({f"{c['device']}, {c['precision']}" for c in mine})),
                ]
            )
    header = [
        "variant",
        "runs",
        "min per run",
        "s per round",
        "last-quarter change",
        "organs",
        "tumours",
        "rise",
        "converged",
        "device, precision",
    ]
    return markdown_table(header, rows) if rows else []


def _largest(changes: Sequence[float]) -> str:
    """The largest last-quarter change over the seeds; n/a where a seed has none (too few validated
    rounds, or no such class)."""
    return "n/a" if any(math.isnan(x) for x in changes) else f"{max(changes):.3f}"


def _shown(path: Path) -> Path:
    """A path as the tables show it: relative to the repository where it lies inside, so committed
    tables do not name one machine's folders."""
    resolved = path.resolve()
    return resolved.relative_to(REPOSITORY) if resolved.is_relative_to(REPOSITORY) else path


def results_markdown(
    sweep: Sweep,
    results: Results,
    missing: list[str],
    command: str,
    costs: Mapping[tuple[str, int], dict[str, Any]] | None = None,
) -> str:
    """The sweep's `results.md`: what ran and how, then its tables (test, external, cross-site, time,
    paired differences)."""
    headline = {key: headline_rows(rows) for key, rows in results.items()}
    variants = list(sweep.variants)
    lines = [
        f"# Sweep `{sweep.name}`",
        "",
        f"- sweep file: `{_shown(sweep.path)}`",
        f"- base config: `{_shown(sweep.base)}`",
        f"- seeds: {', '.join(map(str, sweep.seeds))}",
        f"- overrides of every variant: {' '.join(sweep.overrides) or 'none'}",
        *(f"- variant `{name}`: {' '.join(own) or '(the base config)'}" for name, own in sweep.variants.items()),
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        f"- command: `{command}`",
        f"- runs in these tables: {len(results)} of {len(sweep.seeds) * len(sweep.variants)}"
        + (f"; not: {'; '.join(missing)}" if missing else ""),
        "",
        "Cells: each run's mean Dice over the cases, then mean ± sample std over seeds (3 decimals; one seed: the "
        "mean). The mean row averages each run's classes first.",
        "",
        "## Test",
        "",
        "Each class at the sites that label it (the global model; standalone variants: each site's own model on "
        "its own site).",
        "",
        *markdown_table(*seed_table(per_run(results), variants)),
    ]
    for site in dict.fromkeys(r.site for rows in headline.values() for r in rows if r.phase == EXTERNAL):
        lines += [
            f"## external: {site}",
            "",
            "Per organ (standalone variants: each organ by the models of the sites that label it).",
            "",
            *markdown_table(*seed_table(per_run(results, EXTERNAL, site), variants)),
        ]
    for variant in standalone_variants(results):
        models, columns, matrix = cross_site(results, variant)
        table = [[m, *("n/a" if math.isnan(v) else f"{v:.3f}" for v in row)] for m, row in zip(models, matrix)]
        lines += [
            f"## cross-site: {variant}",
            "",
            "Each site's model (rows) on each site's test split and class (columns), mean over seeds: "
            "a site's model has not learnt what its site never labelled.",
            "",
            *markdown_table(["model \\ site/class", *columns], table),
        ]
    if costs:
        lines += [
            "## Time and convergence",
            "",
            "Wall time of each run (training, validation and test) and of a round, mean over "
            "the seeds; how far each seed's mean validation Dice moved (max − min) over the last quarter of "
            "the rounds, the largest over the seeds, also over its organs and over its tumours alone; its rise "
            "over those rounds (last validated round − first), the mean over the seeds: near the change while "
            "runs still climb, near 0 where they jitter about a plateau; how "
            f"many seeds moved less than {CONVERGED_CHANGE} (converged); the device and precision each ran on.",
            "",
            *_time_table(variants, costs),
        ]
    if sweep.comparisons:
        resamples = f"{RESAMPLES:,}".replace(",", " ")
        lines += [
            "## Paired differences",
            "",
            "Over the cases both variants scored (same seed, site, case and class, Dice in both; the models of "
            "the tables above): the mean per-case difference over n pairs (case × class × seed), and two 95 % "
            "intervals. Over seeds: the t interval of the seeds' mean differences (seeds − 1 degrees of freedom), "
            "which covers what retraining with another seed changes; n/a with one seed. Over cases: the "
            f"percentile bootstrap ({resamples} resamples of the cases with replacement, each with all its "
            f"classes and seeds; numpy seed {BOOTSTRAP_SEED}), which covers which cases were drawn, for these "
            "trained models. A difference is shown (> 0 or < 0) only where both intervals exclude 0.",
            "",
        ]
        for a, b in sweep.comparisons:
            rows = [[d.group, d.cls, *d.cells(), d.verdict] for d in paired_differences(results, a, b)]
            header = [
                "phase",
                "class",
                "seeds",
                "cases",
                "n",
                f"{a} − {b}",
                "95 % CI, seeds",
                "95 % CI, cases",
                "shown",
            ]
            lines += [f"### {a} − {b}", ""]
            lines += markdown_table(header, rows) if rows else ["No case was scored by both.", ""]
    return "\n".join(lines)


def read_sweep(folder: Path | str) -> tuple[Results, dict[str, DictConfig]]:
    """A sweep folder read back as its tables were made: each tabulated run's test cases (in the
    sweep's order) and each variant's config, from the run folders."""
    sweep = SweepFolder(folder)
    results, configs = {}, {}
    for key in sweep.tabulated():  # each run's config.yaml composed once (it checks the run's cases)...
        run, first = sweep.run(*key), configs.get(key[0])
        same = first is not None and file_holds(run.config, first, SEED_RUN_KEYS)  # ...unless plainly its variant's
        cfg = first if same else run.read_config()
        results[key] = run.read_cases(cfg)
        configs.setdefault(key[0], cfg)
    return results, configs
