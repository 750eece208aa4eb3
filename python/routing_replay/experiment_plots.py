"""Comparison plots of the seed's experiment: one PNG per claim, the modes side by side.

Reads each cell's metrics.jsonl (``seed{S}-{mode}-mb{N}``) and writes into the experiment
directory: the mismatch under each routing by mode (paired: the same batches scored twice), the
share of it carried by routing flips, staleness / replay agreement / clip fraction by mini-batch
index, and reward by step. Values are means over a cell's steps, then over seeds.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

MODES = ("none", "R2", "R3")
MODE_COLORS = {"none": "tab:red", "R2": "tab:orange", "R3": "tab:blue"}


def plot_experiment(out: Path, cells: Sequence) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from routing_replay import run_log

    records = {cell: [r for r in run_log.read(out / cell.name) if r["step"] > 0] for cell in cells}
    written = [
        _mismatch_by_mode(out, records),
        _flip_share_by_mode(out, records),
        *(_by_mini_batch_index(out, records, metric, title, log_scale)
          for metric, title, log_scale in (
              ("staleness/mb{i}/mean_abs", "staleness mean |log pi_theta/pi_old| (nats)", True),
              ("replay/agreement/mb{i}", "replay agreement: current top-k = routing held fixed", False),
              ("clip_fraction/mb{i}", "clip fraction", False))),
        _reward_by_step(out, records),
    ]
    return [path for path in written if path is not None]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _cell_mean(records: Sequence[dict], metric: str) -> float | None:
    values = [r[metric] for r in records if metric in r]
    return _mean(values) if values else None


def _modes(records: dict) -> list[str]:
    present = {cell.replay for cell in records}
    return [mode for mode in MODES if mode in present]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _paired_panel(axes, records: dict, stat: str, title: str) -> None:
    """Per mode: each cell's value under the trainer's own routing (left) joined to the same batches'
    value under the rollout's routing (right); the large markers are the means over cells."""
    modes = _modes(records)
    for m, mode in enumerate(modes):
        pairs = [(own, rollout) for cell, recs in records.items() if cell.replay == mode
                 for own, rollout in [(_cell_mean(recs, f"paired/own/{stat}"), _cell_mean(recs, f"paired/rollout/{stat}"))]
                 if own is not None and rollout is not None]
        if not pairs:
            continue
        x = (m - 0.2, m + 0.2)
        for pair in pairs:
            axes.plot(x, pair, color=MODE_COLORS[mode], alpha=0.45, linewidth=1, marker=".")
        means = (_mean([p[0] for p in pairs]), _mean([p[1] for p in pairs]))
        axes.plot(x, means, color=MODE_COLORS[mode], linewidth=2.5, marker="o", markersize=8)
    axes.set_xticks([x for m in range(len(modes)) for x in (m - 0.2, m + 0.2)],
                    [label for mode in modes for label in (f"{mode}\nown", f"{mode}\nrollout")])
    axes.set_xlim(-0.5, len(modes) - 0.5)
    axes.set_yscale("log")
    axes.set_title(title)


def _mismatch_by_mode(out: Path, records: dict) -> Path | None:
    import matplotlib.pyplot as plt

    if not any("paired/own/k3" in r for recs in records.values() for r in recs):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (stat, title) in zip(axes, (("k3", "k3 of log pi_old/mu_old (KL(mu||pi_old), nats)"),
                                        ("p99", "p99 of |log pi_old/mu_old| (nats)"),
                                        ("max", "max |log pi_old/mu_old| (nats)"))):
        _paired_panel(ax, records, stat, title)
    fig.suptitle("Train-inference mismatch: the same batches scored under the trainer's own routing and under "
                 "the rollout's (a line per cell, thick: mean over cells)")
    return _save(fig, out / "mismatch-by-mode.png")


def _flip_share_by_mode(out: Path, records: dict) -> Path | None:
    import matplotlib.pyplot as plt

    metrics = (("paired/flip_share", "(token, layer) pairs whose top-k flipped"),
               ("paired/tokens_flipped_share", "tokens a flip can reach"),
               ("paired/flipped_k3_share", "share of own-routing k3 on those tokens"))
    if not any(metrics[0][0] in r for recs in records.values() for r in recs):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (metric, title) in zip(axes, metrics):
        for m, mode in enumerate(_modes(records)):
            values = [v for cell, recs in records.items() if cell.replay == mode
                      for v in [_cell_mean(recs, metric)] if v is not None]
            ax.bar(m, _mean(values), color=MODE_COLORS[mode], alpha=0.8)
            ax.scatter([m] * len(values), values, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(_modes(records))), _modes(records))
        ax.set_ylim(0, 1.05 if "k3" in metric else None)
        ax.set_title(title)
    fig.suptitle("Routing flips between SGLang (bf16) and the trainer (fp32), and how much mismatch they carry")
    return _save(fig, out / "flips-by-mode.png")


def _by_mini_batch_index(out: Path, records: dict, pattern: str, title: str, log_scale: bool) -> Path | None:
    import matplotlib.pyplot as plt

    sizes = sorted({cell.mini_batches for cell in records if cell.mini_batches > 1})
    if not sizes:
        return None
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.6 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for mode in _modes(records):
            curve = _index_curve(records, mode, size, pattern)
            if curve:
                ax.plot(range(len(curve)), curve, marker="o", color=MODE_COLORS[mode], label=mode)
        ax.set_title(f"{size} mini-batches per rollout batch")
        ax.set_xlabel("mini-batch index")
        ax.set_xticks(range(size))
        if log_scale:  # mini-batch 0 is on-policy: 0, then decades above it
            ax.set_yscale("symlog", linthresh=1e-6)
            ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle(textwrap.fill(f"{title}, by mini-batch index (mean over steps and seeds)", 45 * len(sizes)))
    return _save(fig, out / f"{pattern.split('/')[0].replace('_', '-')}-by-mini-batch.png")


def _index_curve(records: dict, mode: str, size: int, pattern: str) -> list[float]:
    per_index: dict[int, list[float]] = defaultdict(list)
    for cell, recs in records.items():
        if cell.replay == mode and cell.mini_batches == size:
            for i in range(size):
                value = _cell_mean(recs, pattern.format(i=i))
                if value is not None:
                    per_index[i].append(value)
    return [_mean(per_index[i]) for i in range(size)] if len(per_index) == size else []


def _reward_by_step(out: Path, records: dict) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sizes = sorted({cell.mini_batches for cell in records})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.6 * len(sizes), 4), squeeze=False, sharey=True)
    for ax, size in zip(axes[0], sizes):
        for mode in _modes(records):
            steps, rewards = _seed_mean_curve(records, mode, size, lambda r: r.get("reward/mean"))
            ax.plot(steps, rewards, marker=".", color=MODE_COLORS[mode], label=mode)
        ax.set_title(f"{size} mini-batch{'es' if size > 1 else ''} per rollout batch")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    axes[0][0].set_ylabel("mean reward")
    fig.suptitle("Reward by step (mean over seeds)")
    return _save(fig, out / "reward.png")


def _seed_mean_curve(records: dict, mode: str, size: int,
                     value: Callable[[dict], float | None]) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for cell, recs in records.items():
        if cell.replay == mode and cell.mini_batches == size:
            for record in recs:
                v = value(record)
                if v is not None:
                    by_step[record["step"]].append(v)
    steps = sorted(by_step)
    return steps, [_mean(by_step[s]) for s in steps]
