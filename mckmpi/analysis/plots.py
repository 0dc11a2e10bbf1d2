"""PNG plots of reports, comparisons, simulations and studies (matplotlib, Agg, no pyplot).

Each plot says what it shows in its title, has units on both axes and at most a few
labelled series, so it reads without a legend hunt. Figures are built on `Figure` directly
(no global pyplot state, no display needed), which also keeps plotting usable from threads
and servers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator, ScalarFormatter

from mckmpi.analysis.app import AppStats
from mckmpi.analysis.noise import FwqRank
from mckmpi.analysis.report import fmt
from mckmpi.analysis.scaling import Curve
from mckmpi.analysis.simulate import Simulation
from mckmpi.analysis.stats import LOG_EDGES_NS, order_index
from mckmpi.analysis.summary import RunSummary
from mckmpi.analysis.trends import TREND_SIGMAS, Trend

#: Ranks drawn in a per-rank panel plot: the ones with the largest p99.9 excess.
MAX_PANELS = 8
DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _legend(ax: Axes, n: int) -> None:
    if n > 1:
        ax.legend(frameon=False, fontsize="small")


def fwq_timeline(panels: Sequence[tuple[str, FwqRank]], title: str, path: Path) -> Path:
    """FWQ sample durations over time, one panel per (label, rank), sharing the y axis.

    Each panel shows the min..max band of the samples in each of up to 2000 time bins and the
    rank's noise-free quantum as a dashed line."""
    panels = [(label, r) for label, r in panels if r.envelope is not None][:MAX_PANELS]
    fig = Figure(figsize=(9, 1.9 * max(1, len(panels)) + 0.8), layout="constrained")
    axes = fig.subplots(max(1, len(panels)), 1, sharey=True, squeeze=False)[:, 0]
    for ax, (label, r) in zip(axes, panels):
        env = r.envelope
        assert env is not None
        ax.fill_between(
            env.time_s,
            env.low_ns / 1e3,
            env.high_ns / 1e3,
            step="mid",
            color="C0",
            alpha=0.35,
            linewidth=0,
        )
        ax.plot(env.time_s, env.high_ns / 1e3, color="C0", linewidth=0.6, drawstyle="steps-mid")
        ax.axhline(r.quantum_ns / 1e3, color="k", linestyle="--", linewidth=0.8)
        ax.set_title(
            f"{label}: min {fmt(r.quantum_ns / 1e3)} us (dashed), p99.9 excess "
            f"{fmt(r.p999_ns / 1e3)} us, max excess {fmt(r.max_ns / 1e3)} us",
            fontsize="small",
            loc="left",
        )
        ax.set_ylabel("sample [us]")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time since the rank's first sample [s]")
    fig.suptitle(title)
    return _save(fig, path)


def excess_ccdf(series: Sequence[tuple[str, np.ndarray]], title: str, path: Path) -> Path:
    """Fraction of FWQ samples whose excess exceeds x, log-log (the noise tail)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    left = math.inf
    for i, (label, counts) in enumerate(series):
        total = counts.sum()
        if total == 0:
            continue
        above = total - np.cumsum(counts)  # samples >= the next edge
        x = LOG_EDGES_NS[1:] / 1e3
        keep = above > 0
        ax.step(x[keep], above[keep] / total, where="post", color=f"C{i}", label=label)
        # Start the axis a decade before the tail leaves 1 (the bulk of the samples).
        leaving = np.flatnonzero(above < 0.99 * total)
        if leaving.size:
            left = min(left, x[leaving[0]] / 10)
    if math.isfinite(left):
        ax.set_xlim(left=left)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FWQ excess over the rank's minimum [us]")
    ax.set_ylabel("fraction of samples above")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(series))
    return _save(fig, path)


def detour_histogram(series: Sequence[tuple[str, np.ndarray]], title: str, path: Path) -> Path:
    """Detour counts per duration bin (20 bins per decade), log-log."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, counts) in enumerate(series):
        if counts.sum() == 0:
            continue
        ax.stairs(
            np.where(counts > 0, counts, np.nan),
            LOG_EDGES_NS / 1e3,
            color=f"C{i}",
            label=f"{label} ({int(counts.sum())} detours)",
            linewidth=1.5,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(left=max(1e-3, _first_nonzero_edge(series)))
    ax.set_xlabel("detour duration [us]")
    ax.set_ylabel("detours per bin (20 bins per decade)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(series))
    return _save(fig, path)


def _first_nonzero_edge(series: Sequence[tuple[str, np.ndarray]]) -> float:
    firsts = [LOG_EDGES_NS[np.flatnonzero(c)[0]] / 1e3 for _, c in series if c.sum()]
    return min(firsts) / 2 if firsts else 1e-3


def latency_cdf(series: Sequence[tuple[str, np.ndarray]], title: str, path: Path) -> Path:
    """Empirical CDF of offload latencies (sorted ns arrays), log x."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, lat) in enumerate(series):
        if lat.size == 0:
            continue
        p50 = lat[order_index(0.5, lat.size)] / 1e3
        x = np.maximum(lat, 1) / 1e3
        # A rise from 0 at the first value, so even a single call draws a visible step.
        ax.step(
            np.concatenate([x[:1], x]),
            np.arange(lat.size + 1) / lat.size,
            where="post",
            color=f"C{i}",
            marker="o" if lat.size < 30 else None,
            markersize=3,
            label=f"{label} (n={lat.size}, p50 {fmt(p50)} us)",
        )
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("latency of an offloaded call, trap to completion [us]")
    ax.set_ylabel("fraction of calls at or below")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(series))
    return _save(fig, path)


def iteration_times(series: Sequence[tuple[str, AppStats]], title: str, path: Path) -> Path:
    """Per-iteration time of the slowest rank (line) and the min..median band of the ranks."""
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, a) in enumerate(series):
        if a.iterations == 0:
            continue
        it = np.arange(a.iterations)
        ax.fill_between(
            it,
            a.per_iteration_min / 1e6,
            a.per_iteration_median / 1e6,
            step="mid",
            color=f"C{i}",
            alpha=0.25,
            linewidth=0,
        )
        ax.plot(
            it,
            a.per_iteration_max / 1e6,
            color=f"C{i}",
            linewidth=0.8,
            drawstyle="steps-mid",
            label=f"{label}: slowest rank, median {a.iter_p50_ns / 1e6:.4g} ms",
        )
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("iteration time [ms]")
    ax.set_title(title + "\nline: slowest rank; band: fastest to median rank")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    return _save(fig, path)


def _worst(fwq: Sequence[FwqRank], n: int) -> list[FwqRank]:
    recorded = [r for r in fwq if r.samples]
    return sorted(sorted(recorded, key=lambda r: r.p999_ns, reverse=True)[:n], key=lambda r: r.rank)


def _pooled(hists: Sequence[np.ndarray | None]) -> np.ndarray:
    present = [h for h in hists if h is not None]
    return np.sum(present, axis=0) if present else np.zeros(len(LOG_EDGES_NS) - 1, dtype=np.int64)


def report_plots(s: RunSummary, out_dir: Path) -> list[Path]:
    """The plots of `mckmpi report` for whatever the run recorded."""
    stem = s.path.stem
    name = f"{s.path.name}\n{run_stamp(s.attrs, s.provenance)}"
    written = []
    shown = _worst(s.fwq, MAX_PANELS)
    if shown:
        recorded = sum(1 for r in s.fwq if r.samples)
        which = (
            ""
            if len(shown) == recorded
            else f" ({len(shown)} of {recorded} ranks with the largest p99.9)"
        )
        written.append(
            fwq_timeline(
                [(f"rank {r.rank}", r) for r in shown],
                f"FWQ samples over time, {name}{which}",
                out_dir / f"{stem}-fwq-timeline.png",
            )
        )
        series = [(f"rank {r.rank}", r.histogram) for r in shown if r.histogram is not None]
        if recorded > MAX_PANELS:
            series = [(f"all {recorded} ranks", _pooled([r.histogram for r in s.fwq]))]
        written.append(
            excess_ccdf(series, f"FWQ noise tail, {name}", out_dir / f"{stem}-fwq-excess.png")
        )
    if s.detour_histogram.sum():
        written.append(
            detour_histogram(
                [(f"{len(s.detours)} ranks", s.detour_histogram)],
                f"detour durations, all {len(s.detours)} ranks, {name}",
                out_dir / f"{stem}-detours.png",
            )
        )
    if s.calls:
        written.append(
            latency_cdf(
                [(c.call, c.latencies_ns) for c in s.calls[:6]],
                f"offloaded system calls, {name}",
                out_dir / f"{stem}-offload-latency.png",
            )
        )
    if s.app is not None and s.app.iterations:
        written.append(
            iteration_times(
                [(s.app.name or "app", s.app)],
                f"per-iteration time, {name}",
                out_dir / f"{stem}-iterations.png",
            )
        )
    return written


def compare_plots(
    a: RunSummary, b: RunSummary, labels: tuple[str, str], out_dir: Path
) -> list[Path]:
    """Overlays of two runs (A in blue, B in orange), for what both recorded."""
    prefix = f"compare-{a.path.stem}-vs-{b.path.stem}"
    title = (f"{labels[0]} ({a.path.name}) vs {labels[1]} ({b.path.name})\n"
             f"{labels[0]}: {run_stamp(a.attrs, a.provenance)}; "
             f"{labels[1]}: {run_stamp(b.attrs, b.provenance)}")
    written = []
    worst = [(label, _worst(s.fwq, 1)) for label, s in zip(labels, (a, b))]
    if all(w for _, w in worst):
        written.append(
            fwq_timeline(
                [(f"{label}, rank {w[0].rank} (largest p99.9)", w[0]) for label, w in worst],
                f"FWQ samples over time: {title}",
                out_dir / f"{prefix}-fwq-timeline.png",
            )
        )
        written.append(
            excess_ccdf(
                [
                    (label, _pooled([r.histogram for r in s.fwq]))
                    for label, s in zip(labels, (a, b))
                ],
                f"FWQ noise tail, all ranks: {title}",
                out_dir / f"{prefix}-fwq-excess.png",
            )
        )
    if a.detour_histogram.sum() or b.detour_histogram.sum():
        written.append(
            detour_histogram(
                [(labels[0], a.detour_histogram), (labels[1], b.detour_histogram)],
                f"detour durations: {title}",
                out_dir / f"{prefix}-detours.png",
            )
        )
    if a.calls or b.calls:
        pooled = [
            (label, np.sort(np.concatenate([c.latencies_ns for c in s.calls] or [np.zeros(0)])))
            for label, s in zip(labels, (a, b))
        ]
        written.append(
            latency_cdf(
                pooled,
                f"offloaded system calls, all calls: {title}",
                out_dir / f"{prefix}-offload-latency.png",
            )
        )
    apps = [
        (label, s.app) for label, s in zip(labels, (a, b)) if s.app is not None and s.app.iterations
    ]
    if apps:
        written.append(
            iteration_times(
                apps, f"per-iteration time: {title}", out_dir / f"{prefix}-iterations.png"
            )
        )
    return written


def simulation(sim: Simulation, path: Path, where: str = "") -> Path:
    """Slowdown and expected noise of the slowest rank against the rank count."""
    p = np.array([x.ranks for x in sim.predictions], dtype=float)
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(p, [x.slowdown for x in sim.predictions], "o-", color="C0", label="exact expectation")
    left.plot(
        p,
        [x.mc_slowdown for x in sim.predictions],
        "x",
        color="C1",
        markersize=9,
        label=f"Monte Carlo, {sim.iterations} iterations",
    )
    for x in sim.predictions:
        left.annotate(
            f"{x.slowdown:.3g}",
            (x.ranks, x.slowdown),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize="small",
        )
    left.set_xscale("log")
    left.set_xlabel("ranks (cores)")
    left.set_ylabel("slowdown (iteration time / work)")
    left.set_title("predicted slowdown", fontsize="medium")
    left.grid(alpha=0.3, which="both")
    left.legend(frameon=False, fontsize="small")
    right.plot(p, [x.expected_max_ns / 1e3 for x in sim.predictions], "o-", color="C2")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("ranks (cores)")
    right.set_ylabel("noise of the slowest rank per iteration [us]")
    right.set_title("expected max noise per iteration", fontsize="medium")
    right.grid(alpha=0.3, which="both")
    fig.suptitle(
        f"{sim.work_ns / 1e3:.4g} us of work per iteration, noise from the {sim.source} "
        f"trace of {Path(sim.path).name}" + (f"\n{where}" if where else "")
    )
    return _save(fig, path)


#: Series drawn with a legend entry in a trend plot (the rest are drawn, unnamed).
MAX_TREND_LEGEND = 10
#: Axis label of a catalogue metric by the end of its name.
_METRIC_UNITS = (("_us", "us"), ("_s", "s"), ("_pct", "%"))


def _when(created: str) -> datetime | None:
    """A run's creation time as naive UTC (None if it is not an ISO date)."""
    try:
        t = datetime.fromisoformat(created)
    except ValueError:
        return None
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def trend(metric: str, trends: Sequence[Trend], path: Path) -> Path:
    """`mckmpi runs trend`: the metric over time, one series per system and configuration,
    each with its noise band (of the repeats before each run) shaded and the runs outside
    it marked, so a regression stands out from the noise."""
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    ax = fig.subplots()
    flagged = undated = 0
    named: set[str] = set()
    for i, t in enumerate(trends):
        dated = [(w, p) for p in t.points if (w := _when(p.created)) is not None]
        undated += len(t.points) - len(dated)
        if not dated:
            continue
        x = [w for w, _ in dated]
        y = np.array([p.value for _, p in dated])
        low = np.array([p.low for _, p in dated])
        high = np.array([p.high for _, p in dated])
        color = f"C{i % 10}"
        name = f"{t.system}: {t.label}" if i < MAX_TREND_LEGEND else None
        ax.plot(x, y, "o-", color=color, markersize=4, linewidth=1, label=name)
        judged = np.isfinite(low) & np.isfinite(high)
        if judged.any():
            ax.fill_between(x, np.where(judged, low, y), np.where(judged, high, y), where=judged,
                            color=color, alpha=0.15, linewidth=0)
        for flag, marker, where in (("high", "^", "above"), ("low", "v", "below")):
            out = [(w, p.value) for w, p in dated if p.flag == flag]
            if out:
                ax.scatter([w for w, _ in out], [v for _, v in out], marker=marker, s=90,
                           facecolors="none", edgecolors="red", linewidths=1.5, zorder=3,
                           label=None if flag in named else f"{where} the noise band")
                named.add(flag)
                flagged += len(out)
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    unit = next((u for end, u in _METRIC_UNITS if metric.endswith(end)), "")
    ax.set_ylabel(f"{metric} [{unit}]" if unit else metric)
    ax.set_xlabel("run created (UTC)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize="small")
    runs = sum(len(t.points) for t in trends)
    ax.set_title(f"{metric}: {runs} runs in {len(trends)} series, {flagged} outside the noise "
                 f"band of earlier repeats (median +- {TREND_SIGMAS:g} robust sd)"
                 + (f"; {undated} without a date not drawn" if undated else ""),
                 fontsize="medium")
    return _save(fig, path)


def stamp(hosts: Sequence[str], dates: Sequence[str], commits: Sequence[str]) -> str:
    """Where, when and from which source the data of a plot came: one line for its title."""
    def short(values: Sequence[str], width: int = 0) -> str:
        kept = sorted({v[:width] if width else v for v in values if v})
        return ", ".join(kept[:3]) + (f" (+{len(kept) - 3})" if len(kept) > 3 else "") or "unknown"

    days = sorted({d[:10] for d in dates if d})
    when = days[0] if len(days) == 1 else f"{days[0]}..{days[-1]}" if days else "unknown"
    return f"host {short(hosts)}; {when}; commit {short(commits, 10)}"


def run_stamp(attrs: dict, provenance: dict) -> str:
    """`stamp` of one run file: its nodes' real hosts, its date, its source commit."""
    hosts = list(provenance.get("node_hostname") or provenance.get("hosts") or [])
    return stamp([str(h) for h in hosts], [str(attrs.get("created", ""))],
                 [str(provenance.get("source_commit", ""))])


def _rank_axis(ax: Axes, ranks: np.ndarray) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("ranks")
    ax.grid(alpha=0.3, which="both")


def scaling_plots(curves: Sequence[Curve], out_dir: Path, where: str = "",
                  predictions: dict[tuple[str, str, int], float] | None = None) -> list[Path]:
    """One figure per app, scaling kind, problem and axis values, one line per mode: time per
    iteration (median of the repeats, 95% interval as bars; predictions as open markers),
    speedup and efficiency against the common baseline (linux mode's fewest ranks)."""
    groups: dict[tuple[str, str, str, str], list[Curve]] = {}
    for c in curves:
        groups.setdefault((c.app, c.scaling, c.problem, c.axes), []).append(c)
    written = []
    for (app, kind, problem, axes), series in sorted(groups.items()):
        fig = Figure(figsize=(14, 4.6), layout="constrained")
        timing, left, right = fig.subplots(1, 3)
        ranks = np.unique(np.concatenate([c.ranks for c in series])).astype(float)
        base = series[0]
        unit, scale = ("ms", 1e3) if max(float(np.nanmax(c.time_s)) for c in series) >= 1e-3 \
            else ("us", 1e6)
        ideal = ranks / base.baseline_ranks
        left.plot(ranks, ideal, "--", color="0.5", label="ideal")
        right.axhline(1.0, linestyle="--", color="0.5", label="ideal")
        for i, c in enumerate(sorted(series, key=lambda c: c.mode)):
            low = c.time_s - (c.ci_low_s if c.ci_low_s is not None else c.time_s)
            high = (c.ci_high_s if c.ci_high_s is not None else c.time_s) - c.time_s
            err = np.nan_to_num(np.vstack([low, high]) * scale, nan=0.0)
            label = f"{c.mode} (repeats {', '.join(str(n) for n in sorted(set(c.runs)))})"
            timing.errorbar(c.ranks, c.time_s * scale, yerr=err, fmt="o-", color=f"C{i}",
                            capsize=4, label=label)
            if predictions:
                pred = [(p, predictions[(c.app, c.mode, int(p))]) for p in c.ranks
                        if (c.app, c.mode, int(p)) in predictions]
                if pred:
                    timing.plot([p for p, _ in pred], [v / 1e6 * scale for _, v in pred], "s",
                                mfc="none", color=f"C{i}", markersize=9,
                                label=f"{c.mode} predicted from the smallest point")
            left.plot(c.ranks, c.speedup, "o-", color=f"C{i}", label=c.mode)
            right.plot(c.ranks, c.efficiency, "o-", color=f"C{i}", label=c.mode)
        for ax in (timing, left, right):
            _rank_axis(ax, ranks)
            ax.legend(frameon=False, fontsize="small")
        spans = [float(np.nanmax(c.time_s) / np.nanmin(c.time_s)) for c in series]
        if max(spans + [1.0]) > 5:
            timing.set_yscale("log")
        timing.set_ylabel(f"time per iteration [{unit}] (median, 95% CI)")
        timing.set_title("time per iteration (lower is better)", fontsize="medium")
        left.set_yscale("log", base=2)
        left.yaxis.set_major_formatter(ScalarFormatter())
        baseline = f"{base.baseline_mode} at {base.baseline_ranks} ranks"
        left.set_ylabel(f"speedup over {baseline}" + (" (scaled)" if kind == "weak" else ""))
        right.set_ylabel(f"parallel efficiency vs {baseline}")
        right.set_ylim(0, max(1.1, max(float(np.nanmax(c.efficiency)) for c in series) * 1.05))
        left.set_title("speedup", fontsize="medium")
        right.set_title("efficiency", fontsize="medium")
        fig.suptitle(f"{app}: {kind} scaling, {problem}" + (f", {axes}" if axes else "")
                     + (f"\n{where}" if where else ""))
        slug = f"{app}-{kind}-{problem}-{axes}".rstrip("-")
        slug = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in slug)
        written.append(_save(fig, out_dir / f"scaling-{slug}.png"))
    return written


#: Noise below this (us) is drawn at it on log axes: under the timer's resolution, and zero
#: (a sample equal to the rank's minimum) has no place on a log scale.
NOISE_FLOOR_US = 0.01


def _hist_quantiles(counts: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Quantiles (us) of samples binned on `LOG_EDGES_NS` (each bin's geometric middle),
    at least `NOISE_FLOOR_US`."""
    total = counts.sum()
    cum = np.cumsum(counts)
    mids = np.sqrt(np.maximum(LOG_EDGES_NS[:-1], 0.5) * LOG_EDGES_NS[1:]) / 1e3
    return [max(NOISE_FLOOR_US, float(mids[min(len(mids) - 1, int(np.searchsorted(cum, q * total)))]))
            for q in qs]


def survey_plots(nodes: Sequence[tuple[str, int, str, np.ndarray]], what: str, title: str,
                 where: str, path: Path) -> Path:
    """A noise survey: per node the distribution of the noise (box: quartiles, whiskers:
    p1..p99.9, dot: max), one panel row per mode, and the CDF of all samples, one curve per
    mode and node count. `nodes`: (mode, node count of the run, node label, histogram on
    `LOG_EDGES_NS`)."""
    modes = sorted({m for m, *_ in nodes})
    fig = Figure(figsize=(13, 2.8 * len(modes) + 1.6), layout="constrained")
    grid = fig.add_gridspec(len(modes), 2, width_ratios=(3, 2))
    cdf = fig.add_subplot(grid[:, 1])
    top = None
    for row, mode in enumerate(modes):
        ax = fig.add_subplot(grid[row, 0], sharey=top)
        top = top or ax
        mine = [(n, label, h) for m, n, label, h in nodes if m == mode and h.sum()]
        stats = []
        for n, label, h in mine:
            p1, q1, med, q3, p999 = _hist_quantiles(h, (0.01, 0.25, 0.5, 0.75, 0.999))
            stats.append({"label": label, "whislo": p1, "q1": q1, "med": med,
                          "q3": q3, "whishi": p999, "fliers": [_hist_quantiles(h, (1.0,))[0]]})
        if stats:
            ax.bxp(stats, showfliers=True, patch_artist=True,
                   boxprops={"facecolor": f"C{row}", "alpha": 0.4},
                   flierprops={"marker": "o", "markersize": 4})
        ax.set_yscale("log")
        ax.set_ylim(bottom=NOISE_FLOOR_US / 2)
        ax.set_ylabel(f"{what.split(' over ')[0]} [us]")
        ax.set_title(f"{mode} mode: per node (box: quartiles, whiskers p1..p99.9, dot: max)",
                     fontsize="medium", loc="left")
        ax.tick_params(axis="x", labelsize="small")
        ax.grid(alpha=0.3, axis="y", which="both")
        pooled: dict[int, np.ndarray] = {}
        for n, _, h in mine:
            pooled[n] = pooled.get(n, np.zeros_like(h)) + h
        for k, (n, h) in enumerate(sorted(pooled.items())):
            x = LOG_EDGES_NS[1:] / 1e3
            keep = h > 0
            frac = np.cumsum(h) / h.sum()
            cdf.step(x[keep], frac[keep], where="post", color=f"C{row}",
                     linestyle=("-", "--", ":", "-.")[k % 4],
                     label=f"{mode}, {n} node{'s' if n > 1 else ''} ({int(h.sum())} samples)")
    cdf.set_xscale("log")
    cdf.set_xlim(left=NOISE_FLOOR_US / 2)
    cdf.set_ylim(0, 1.02)
    cdf.set_xlabel(f"{what} [us]")
    cdf.set_ylabel("fraction of samples at or below")
    cdf.set_title("CDF of all samples", fontsize="medium")
    cdf.grid(alpha=0.3, which="both")
    cdf.legend(frameon=False, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12),
               ncols=2)
    fig.suptitle(f"{title}\n{where}; noise below {NOISE_FLOOR_US} us (timer resolution) drawn at "
                 f"{NOISE_FLOOR_US} us")
    return _save(fig, path)
