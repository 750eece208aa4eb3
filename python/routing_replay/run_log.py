"""Per-step metrics of a run: one JSON object per line in ``metrics.jsonl``, the same scalars in
TensorBoard and, with ``run.wandb`` set, in Weights & Biases; ``summary_line`` is the console's
line per step, and ``routing-replay plot RUN [RUN ...]`` draws PNG curves of them.

Metrics are flat ``{name: float}`` maps; names use ``/`` to group (``mismatch/k3``,
``staleness/mb1/mean_abs``), the same names in every sink. Appending (not rewriting) lets a resumed
run continue its curves; a resumed run continues the same W&B run (its id is kept in the run
directory, ``wandb-run-id``).

``plot`` draws one PNG per metric family (``FAMILIES``: reward, mismatch, paired diagnostics,
staleness, ...), a panel per statistic, a line per mini-batch index (or layer) of one run, or a
line per run when several runs are overlaid. Families and panels without data are skipped (old
runs, runs without paired diagnostics); metrics of groups no family knows go to ``other.png``.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from routing_replay.config import WandbSection

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb-run-id"
"""The run directory's W&B run id: a resumed job logs to the same W&B run."""


class MetricsLogError(RuntimeError):
    """A configured metrics destination cannot be written (W&B not importable, or its run not started)."""


class RunLog:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None,
                 wandb: WandbSection | None = None, config: Mapping | None = None) -> None:
        """``purge_step``: a resumed run's first step; TensorBoard hides older events from there on.
        ``wandb``: also log to Weights & Biases (``mode: disabled`` or None: not at all, wandb is not
        even imported), with ``config`` (the job's configuration) as the W&B run's config."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tb = None
        self._wandb = None
        try:
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)
            if wandb is not None and wandb.mode != "disabled":
                self._wandb = _start_wandb(self.run_dir, wandb, config)
        except BaseException:
            self.close()
            raise

    def log(self, step: int, metrics: dict[str, float]) -> None:
        bad = sorted(k for k, v in metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v))
        if bad:
            raise ValueError(f"step {step}: metrics must be finite numbers; not so: {bad}")
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_wandb(run_dir: Path, settings: WandbSection, config: Mapping | None):
    """A W&B run writing under ``run_dir/wandb``; the id in ``run_dir/wandb-run-id`` is reused, so a
    resumed job appends to the same run (``resume="allow"``). Steps a resumed job logs again (those
    after its checkpoint) keep W&B's first values online: W&B refuses steps below its last one;
    metrics.jsonl and TensorBoard hold the new ones."""
    try:
        import wandb
    except ImportError as exc:
        raise MetricsLogError(f"run.wandb is set (mode {settings.mode}) but wandb cannot be imported ({exc}): "
                              "install it (it is in requirements/lock-*.txt) or remove run.wandb") from None
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
        id_file.write_text(run_id + "\n", encoding="utf-8")
    # offline runs ignore (and warn about) ``resume``: `wandb sync --append` joins their parts
    resume = "allow" if settings.mode == "online" else None
    try:
        return wandb.init(project=settings.project, name=settings.name or run_dir.resolve().name, dir=str(run_dir),
                          mode=settings.mode, config=dict(config or {}), id=run_id, resume=resume, reinit="create_new")
    except Exception as exc:  # noqa: BLE001 - W&B raises its own types (no API key, no network): one line instead
        raise MetricsLogError(f"run.wandb: W&B could not start the run (project {settings.project!r}, mode "
                              f"{settings.mode}): {type(exc).__name__}: {exc}; log in (`wandb login` or "
                              "WANDB_API_KEY), set run.wandb.mode: offline, or remove run.wandb") from None


def routing_agreement(metrics: Mapping[str, float]) -> float | None:
    """The share of (token, layer) pairs where the trainer's own top-k set equals the rollout's: the
    mean over layers of ``routing/agreement/layerL`` (R3's replayed forward), else 1 -
    ``paired/flip_share`` (paired diagnostics, any replay mode); None when neither was logged."""
    layers = [value for name, value in metrics.items() if re.fullmatch(r"routing/agreement/layer\d+", name)]
    if layers:
        return sum(layers) / len(layers)
    flips = metrics.get("paired/flip_share")
    return None if flips is None else 1.0 - flips


def summary_line(step: int, metrics: Mapping[str, float], mini_batches: int) -> str:
    """The console's line for one step: mean reward, mismatch k3 (``mismatch/k3``), staleness k3 of
    the last mini-batch (the most off-policy; 0 in mb0), routing agreement between trainer and
    rollout (``routing_agreement``), the last mini-batch's replay agreement (the current model's own
    top-k against the routing held fixed) and the step time. A metric the step did not log (e.g. no
    routing agreement for R2 or none without paired diagnostics) is left out."""
    last = mini_batches - 1
    fields = (("reward", metrics.get("reward/mean"), ".3f"),
              ("mismatch k3", metrics.get("mismatch/k3"), ".2e"),
              (f"staleness k3 mb{last}", metrics.get(f"staleness/mb{last}/k3"), ".2e"),
              ("routing agreement", routing_agreement(metrics), ".4f"),
              (f"replay agreement mb{last}", metrics.get(f"replay/agreement/mb{last}"), ".4f"))
    parts = [f"{label} {value:{spec}}" for label, value, spec in fields if value is not None]
    if (seconds := metrics.get("time/step")) is not None:
        parts.append(f"{seconds:.2f} s")
    return f"step {step}: " + ", ".join(parts) if parts else f"step {step}"


class MetricsError(ValueError):
    """A run's metrics.jsonl is missing or malformed; the message names the file and the line."""


def read(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise MetricsError(f"{path} does not exist: is {run_dir} a run directory?")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricsError(f"{path}: cannot read: {exc}") from None
    return [_record(line, f"{path}, line {number}") for number, line in enumerate(lines, 1) if line.strip()]


def _record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MetricsError(f"{where}: not JSON: {exc}") from None
    numbers = isinstance(record, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.values())
    if not numbers or not isinstance(record.get("step"), int):
        raise MetricsError(f"{where}: not a metrics record (an object of numbers with an integer step)")
    return record


Series = dict[str, tuple[list[int], list[float]]]
"""A run's metrics as curves: name -> (steps, values)."""


def series(records: Sequence[dict]) -> Series:
    out: Series = {}
    for record in records:
        for name, value in record.items():
            if name != "step":
                steps, values = out.setdefault(name, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return out


@dataclass(frozen=True)
class Line:
    label: str
    metric: str
    color: int = 0
    """Slot in matplotlib's default colour cycle (one run; overlaid runs are coloured by run)."""
    dashed: bool = False


@dataclass(frozen=True)
class Panel:
    """One axes: fixed ``lines``, or one line per index of ``indexed`` (a metric name with ``{i}``)."""

    title: str
    unit: str
    lines: tuple[Line, ...] = ()
    indexed: str = ""
    index_name: str = "mb"
    """Legend name of an index: mb0, mb1, ... or layer0, ..."""
    overlaid: Literal["last", "mean"] = "last"
    """With several runs, an indexed panel draws per run its last index (the most off-policy
    mini-batch) or the mean over the indices (layers)."""


@dataclass(frozen=True)
class Family:
    name: str
    """The PNG's file name, without .png."""
    title: str
    groups: tuple[str, ...]
    """Metric groups (the part of a name before its first ``/``) that this family draws: the others
    go to ``other.png``."""
    panels: tuple[Panel, ...] = ()
    each_metric_under: tuple[str, ...] = ()
    """Name prefixes of which every metric gets its own panel (after ``panels``)."""
    unit: str = ""
    """The unit of those panels."""


NATS = "nats"
SHARE = "share of tokens"
_RATIO_STATS = {
    "mean_abs": ("mean |log r|", NATS),
    "k3": ("k3 = mean(r - 1 - log r), a KL estimate", NATS),
    "p99": ("p99 of |log r|", NATS),
    "max": ("max |log r|", NATS),
    "beyond_2": ("tokens with r > 2 or r < 1/2", SHARE),
    "std": ("std of log r", NATS),
    "outside_clip": ("tokens outside the clip range", SHARE),
}


def _stat_panels(metric: str, stats: Sequence[str]) -> tuple[Panel, ...]:
    """A panel per statistic of a single-line ratio metric (``metric/{stat}``)."""
    return tuple(Panel(_RATIO_STATS[s][0], _RATIO_STATS[s][1], lines=(Line(metric, f"{metric}/{s}"),)) for s in stats)


def _by_mini_batch(metric: str, stats: Sequence[str]) -> tuple[Panel, ...]:
    return tuple(Panel(_RATIO_STATS[s][0], _RATIO_STATS[s][1], indexed=f"{metric}/mb{{i}}/{s}") for s in stats)


def _own_and_rollout(title: str, unit: str, stat: str, tokens: str = "") -> Panel:
    """Own routing against the rollout's: ``paired/{own,rollout}/{tokens}{stat}``."""
    return Panel(title, unit, lines=(Line("own routing", f"paired/own/{tokens}{stat}", 0),
                                     Line("rollout's routing (replayed)", f"paired/rollout/{tokens}{stat}", 1,
                                          dashed=True)))


def _single(title: str, unit: str, metric: str) -> Panel:
    return Panel(title, unit, lines=(Line(metric, metric),))


FAMILIES = (
    Family("reward", "Reward: the task's score of each response, over the step's responses", ("reward",),
           each_metric_under=("reward/",), unit="reward"),
    Family("mismatch", "Train-inference mismatch per response token: log r = log pi_old (trainer) - log mu_old "
           "(rollout engine)", ("mismatch",),
           panels=_stat_panels("mismatch", ("mean_abs", "k3", "p99", "max", "beyond_2", "std"))),
    Family("paired", "Paired diagnostics: the same rollout scored by the trainer under its own routing and under "
           "the rollout's; log r against mu_old", ("paired",),
           panels=(*(_own_and_rollout(*_RATIO_STATS[stat], stat) for stat in ("mean_abs", "k3", "p99", "max")),
                   _own_and_rollout("k3 on tokens with a routing flip", NATS, "k3", "flipped/"),
                   _own_and_rollout("k3 on tokens without a routing flip", NATS, "k3", "unflipped/"),
                   _single("(token, layer) top-k sets flipped", "share of (token, layer)", "paired/flip_share"),
                   _single("tokens with a flip in some layer", SHARE, "paired/tokens_flipped_share"),
                   _single("flipped tokens' share of the own-routing k3", "share of k3", "paired/flipped_k3_share"),
                   _single("k3 reduction by the rollout's routing", "", "paired/k3_reduction"))),
    Family("staleness", "Staleness by mini-batch: log r = log pi_theta (policy being updated) - log pi_old; mb0 "
           "is on-policy", ("staleness",),
           panels=_by_mini_batch("staleness", ("mean_abs", "k3", "p99", "outside_clip"))),
    Family("ratio", "Policy ratio by mini-batch: log r = log pi_theta - log mu_old (staleness and mismatch "
           "together)", ("ratio",), panels=_by_mini_batch("ratio", ("mean_abs", "k3", "p99", "max"))),
    Family("replay", "Routing replay by mini-batch", ("replay",), panels=(
        Panel("trainer's own top-k agreeing with the replayed routing", "share of (token, layer)",
              indexed="replay/agreement/mb{i}"),)),
    Family("clipping", "Clipping and mismatch correction by mini-batch", ("clip_fraction", "correction"), panels=(
        Panel("tokens on the clipped branch of the objective", SHARE, indexed="clip_fraction/mb{i}"),
        Panel("mean correction weight", "weight", indexed="correction/mb{i}/weight_mean"),
        Panel("tokens whose correction weight was truncated or masked", SHARE, indexed="correction/mb{i}/changed"),
        Panel("tokens whose correction weight was capped", SHARE, indexed="correction/mb{i}/capped"))),
    Family("update", "Optimizer updates by mini-batch, and the policy's entropy",
           ("loss", "grad_norm", "learning_rate", "optimizer", "entropy"),
           panels=(Panel("loss", "loss", indexed="loss/mb{i}"),
                   Panel("gradient norm (before clipping)", "norm", indexed="grad_norm/mb{i}"),
                   Panel("learning rate (schedule)", "rate", indexed="learning_rate/mb{i}"),
                   Panel("optimizer steps skipped (non-finite gradients)", "steps",
                         lines=(Line("skipped", "optimizer/skipped_steps"),)),
                   Panel("entropy of the policy on response tokens", NATS, lines=(Line("entropy", "entropy"),)))),
    Family("routing", "Routing: replay coverage, agreement and flips per layer", ("routing",), panels=(
        Panel("loss tokens whose rollout routing arrived", SHARE, lines=(Line("coverage", "routing/coverage"),)),
        Panel("replayed routing agreeing with the trainer's own", "share of tokens",
              indexed="routing/agreement/layer{i}", index_name="layer", overlaid="mean"),
        Panel("tokens whose routing differs in some layer", "tokens",
              lines=(Line("tokens differing", "routing/tokens_differing"),)),
        Panel("samples without routing", "samples", lines=(Line("missing", "routing/missing"),)),
        Panel("top-k sets flipped, own vs rollout routing", "share of tokens", indexed="paired/flip_share/layer{i}",
              index_name="layer", overlaid="mean"))),
    Family("rollout", "Rollout engines: responses, throughput, weight-sync probe, restarts",
           ("response_length", "throughput", "sync", "engine"),
           each_metric_under=("response_length/", "throughput/", "sync/", "engine/")),
    Family("time", "Time per phase of a step", ("time",), each_metric_under=("time/",), unit="seconds"),
)
LOG_SCALE_DECADES = 2.0
"""A panel whose positive values span more decades than this gets a logarithmic y axis."""
_LINE_STYLES = ("-", "--", ":", "-.")


def _indexed_metrics(pattern: str, names: Sequence[str]) -> dict[int, str]:
    """Index -> metric name of every name matching ``pattern`` (``{i}`` stands for the index)."""
    regex = re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(\d+)") + "$")
    matches = (regex.match(name) for name in names)
    return dict(sorted((int(m.group(1)), m.group(0)) for m in matches if m))


def _each_metric_panels(family: Family, names: Sequence[str]) -> tuple[Panel, ...]:
    """A panel per metric under one of ``family.each_metric_under`` (``group/``; the bare ``group``
    is a metric of it too)."""
    return tuple(Panel(name, family.unit, lines=(Line(name.rsplit("/", 1)[-1], name),)) for name in sorted(names)
                 if any(name.startswith(prefix) or name == prefix[:-1] for prefix in family.each_metric_under))


def _other_family(names: Sequence[str]) -> Family | None:
    known = {group for family in FAMILIES for group in family.groups}
    others = sorted({name.split("/", 1)[0] for name in names} - known)
    if not others:
        return None
    return Family("other", "Other metrics", tuple(others), each_metric_under=tuple(f"{group}/" for group in others))


@dataclass(frozen=True)
class _Curve:
    label: str | None
    steps: list[int]
    values: list[float]
    color: object
    style: str


def _mean_curve(curves: Sequence[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    """The mean over several curves at each step (the steps any of them has)."""
    at: dict[int, list[float]] = {}
    for steps, values in curves:
        for step, value in zip(steps, values):
            at.setdefault(step, []).append(value)
    steps = sorted(at)
    return steps, [sum(at[s]) / len(at[s]) for s in steps]


def _indexed_curves(panel: Panel, runs: dict[str, Series], colors: Sequence[str]) -> list[_Curve]:
    """One run: a line per index, shaded dark to light. Several: a line per run (``panel.overlaid``)."""
    from matplotlib import colormaps

    curves = []
    for r, (run, data) in enumerate(runs.items()):
        indexed = _indexed_metrics(panel.indexed, list(data))
        if not indexed:
            continue
        if len(runs) > 1:
            names = [indexed[max(indexed)]] if panel.overlaid == "last" else list(indexed.values())
            curves.append(_Curve(run, *_mean_curve([data[name] for name in names]), colors[r % len(colors)], "-"))
            continue
        last = max(indexed)
        for index, name in indexed.items():
            # viridis from dark to green: its pale yellow end is hard to see on white
            shade = colormaps["viridis"](0.85 * index / last if last else 0.0)
            curves.append(_Curve(f"{panel.index_name}{index}", *data[name], shade, "-"))
    return curves


def _fixed_curves(panel: Panel, runs: dict[str, Series], colors: Sequence[str]) -> list[_Curve]:
    """One run: its lines as styled (a lone line is named by the panel's title, not the legend).
    Several: a colour per run and a line style per line."""
    curves = []
    for r, (run, data) in enumerate(runs.items()):
        for n, line in enumerate(panel.lines):
            if line.metric not in data:
                continue
            if len(runs) > 1:
                label = run if len(panel.lines) == 1 else f"{run}: {line.label}"
                curves.append(_Curve(label, *data[line.metric], colors[r % len(colors)], _LINE_STYLES[n % 4]))
            elif len(panel.lines) == 1:
                curves.append(_Curve(None, *data[line.metric], "0.2", "-"))
            else:
                curves.append(_Curve(line.label, *data[line.metric], colors[line.color % len(colors)],
                                     "--" if line.dashed else "-"))
    return curves


def _curves(panel: Panel, runs: dict[str, Series]) -> list[_Curve]:
    from matplotlib import rcParams

    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    return _indexed_curves(panel, runs, colors) if panel.indexed else _fixed_curves(panel, runs, colors)


def _y_scale(axes: Axes, values: Sequence[float]) -> None:
    """Logarithmic when the positive values span more than LOG_SCALE_DECADES; symmetric-log (linear
    around 0) when zeros or negatives are among them, so that those stay visible."""
    positive = [v for v in values if v > 0]
    if len(positive) < 2 or math.log10(max(positive) / min(positive)) <= LOG_SCALE_DECADES:
        return
    if len(positive) == len(values):
        axes.set_yscale("log")
    else:
        # the linear part ends at a power of ten, so that its tick does not crowd the tick of 0
        axes.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(min(positive))))


def _panel_title(panel: Panel, runs: dict[str, Series]) -> str:
    if len(runs) > 1 and panel.indexed:
        return f"{panel.title} ({'last mini-batch' if panel.overlaid == 'last' else 'mean over layers'})"
    return panel.title


def figure(family: Family, runs: dict[str, Series]) -> Figure | None:
    """The family's figure for runs labelled by name, or None when none of its metrics was logged."""
    import matplotlib.pyplot as plt

    names = sorted({name for data in runs.values() for name in data})
    panels = [(panel, curves) for panel in (*family.panels, *_each_metric_panels(family, names))
              if (curves := _curves(panel, runs))]
    if not panels:
        return None
    columns = 1 if len(panels) == 1 else 2 if len(panels) in (2, 4) else 3
    rows = -(-len(panels) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(4.6 * columns + 2.2, 3.0 * rows + 0.6), sharex=True,
                             squeeze=False, layout="constrained")
    axes_list = list(grid.flat)
    legend: dict[str, object] = {}
    for axes, (panel, curves) in zip(axes_list, panels):
        for curve in curves:
            (handle,) = axes.plot(curve.steps, curve.values, color=curve.color, linestyle=curve.style,
                                  marker="." if len(curve.steps) < 30 else None, linewidth=1.4)
            if curve.label is not None:
                legend.setdefault(curve.label, handle)
        _y_scale(axes, [v for curve in curves for v in curve.values])
        axes.set_title(_panel_title(panel, runs), fontsize=9.5)
        axes.set_ylabel(panel.unit, fontsize=8.5)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3, which="major")
    for axes in axes_list[len(panels):]:
        axes.set_visible(False)
    for axes in axes_list[max(len(panels) - columns, 0):len(panels)]:  # the lowest panel of each column
        axes.set_xlabel("step", fontsize=8.5)
        axes.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(family.title, fontsize=11)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=8, frameon=False)
    return fig


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, or its path below the runs' common directory where names repeat."""
    resolved = [Path(os.path.abspath(run)) for run in run_dirs]
    repeated = sorted({str(path) for path in resolved if resolved.count(path) > 1})
    if repeated:
        raise MetricsError(f"{', '.join(repeated)}: given twice")
    names = [path.name for path in resolved]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath(resolved))
    return [str(path.relative_to(common)) for path in resolved]


def plot(run_dirs: str | Path | Sequence[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """One PNG per metric family of one run, or of several runs overlaid; returns the files. The
    default ``out_dir`` is RUN/plots for one run and ``plots-A-vs-B`` beside the runs for several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(run) for run in run_dirs]
    labels = run_labels(dirs)
    runs = {label: series(read(run)) for label, run in zip(labels, dirs)}
    if out_dir is not None:
        out = Path(out_dir)
    elif len(dirs) == 1:
        out = dirs[0] / "plots"
    else:
        out = Path(os.path.commonpath([os.path.abspath(d) for d in dirs])) / (
            "plots-" + "-vs-".join(label.replace("/", "_") for label in labels))
    out.mkdir(parents=True, exist_ok=True)
    names = {name for data in runs.values() for name in data}
    families = [*FAMILIES, other] if (other := _other_family(sorted(names))) else list(FAMILIES)
    files = []
    for family in families:
        fig = figure(family, runs)
        if fig is None:
            continue
        path = out / f"{family.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
