"""`mckmpi report`: one run file as text tables (times in microseconds unless marked).

Tables with one row per rank show every rank up to `MAX_RANK_ROWS`; beyond that, the ranks
that suffered most, plus the median and the maximum over all ranks, so a 10^4-rank run still
reads on one screen (`--json` has every rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mckmpi.analysis import kernel
from mckmpi.analysis.app import TimeArray
from mckmpi.analysis.summary import RunSummary, summarize
from mckmpi.provenance import nodes_of, shared_hosts
from mckmpi.trace.reader import Run
from mckmpi.utility.table import counted, render
from mckmpi.utility.units import format_size

MAX_RANK_ROWS = 16


def num(x: float | int | None) -> float | int | str:
    """A table cell: whole numbers from 1000 up (no exponent), 4 significant digits below,
    '-' when unknown."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return int(round(x)) if abs(x) >= 1000 else x


def fmt(x: float | int | None) -> str:
    """`num` as text, for numbers inside sentences."""
    v = num(x)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def us(ns: float | int | None) -> float | int | str:
    """Nanoseconds as a microseconds cell."""
    return "-" if ns is None else num(ns / 1e3)


def pct(fraction: float | None) -> float | int | str:
    """A fraction as a percentage cell."""
    return "-" if fraction is None else num(fraction * 100)


def header(s: RunSummary) -> str:
    a = s.attrs
    lines = [
        f"run file   {s.path}",
        f"app        {a.get('app')} {a.get('app_args', '')}".rstrip(),
        f"mode       {a.get('mode')}   ranks {a.get('world_size')}   nodes {a.get('nnodes')}"
        f"   launcher {a.get('launcher')}",
        f"created    {a.get('created')}   schema {a.get('schema')} v{a.get('schema_version')}"
        f"   complete {bool(a.get('complete'))}",
    ]
    if a.get("ending") not in (None, "", "normal"):
        lines.append(f"ending     {a['ending']} {a.get('signal') or ''}".rstrip()
                     + f"   status {a.get('exit_status')}   rank {a.get('ending_rank')}"
                     + (f"   {a['error']}" if a.get("error") else ""))
    if a.get("slurm_job_id"):
        lines.append(f"slurm      job {a['slurm_job_id']} on {a.get('slurm_nodelist')}")
    prov = s.provenance
    if prov:
        lines.append(
            f"versions   mckmpi {prov.get('mckmpi')}, Python {prov.get('python')}, "
            f"numpy {prov.get('numpy')}, mpi4py {prov.get('mpi4py')}, HDF5 {prov.get('hdf5')}"
        )
        lines.append(f"mpi        {prov.get('mpi_library')}")
        lines.append(f"kernel     {prov.get('kernel')}")
        for plan in prov.get("node_plans", []):
            lines.append(f"partition  {plan}")
        lines += provenance_lines(prov)
    return "\n".join(lines)


def provenance_lines(prov: dict[str, Any]) -> list[str]:
    """Where and how the job ran (`mckmpi.provenance`): Slurm step, source, app, launch,
    every node's host, CPU and isolation; nothing for files that predate these facts."""
    lines = []
    if prov.get("slurm_job_id"):
        ids = [f"job {prov['slurm_job_id']} step {prov.get('slurm_step_id') or '-'}"]
        if prov.get("slurm_array_job_id"):
            ids.append(f"array {prov['slurm_array_job_id']}_{prov.get('slurm_array_task_id')}")
        if prov.get("slurm_het_size"):
            ids.append(f"het job {prov.get('slurm_het_job_id')} of {prov['slurm_het_size']} "
                       f"components ({prov.get('slurm_het_nodelists') or '-'}), rank 0 in "
                       f"component {prov.get('slurm_het_component') or '-'}")
        lines.append(
            f"step       {', '.join(ids)}; cluster {prov.get('slurm_cluster') or '-'}, "
            f"partition {prov.get('slurm_partition') or '-'}, "
            f"{prov.get('slurm_version') or 'Slurm version unknown'}, "
            f"step nodes {prov.get('slurm_step_nodelist') or '-'}"
        )
    if "source_commit" in prov:
        lines.append(f"source     mckmpi {prov.get('mckmpi')} commit "
                     f"{prov.get('source_commit') or 'unknown (not a git checkout)'}")
    if prov.get("app_file"):
        lines.append(f"app file   {prov['app_file']} sha256 {prov.get('app_sha256') or '-'}")
    if prov.get("launch_command"):
        lines.append(f"launch     {prov['launch_command']}")
    if prov.get("parent_command"):
        lines.append(f"started by {prov['parent_command']}")
    env = list(prov.get("environment") or [])
    if "environment" in prov:
        own = [e for e in env if e.startswith("MCKMPI_")]
        lines.append(f"env        {len(env)} MCKMPI_/OMPI_/PMIX_/SLURM_ variables (--json has "
                     f"them){': ' + ' '.join(own) if own else ''}")
    nodes = nodes_of(prov)
    if nodes:
        rows = [[i, n.name, n.hostname, n.cpu_model, n.isolation] for i, n in enumerate(nodes)]
        lines.append(render(("node", "name", "host", "cpu", "isolation"), rows,
                            title="nodes (host: the machine's own name)"))
        for cmdline in sorted({n.kernel_cmdline for n in nodes}):
            names = ", ".join(n.name for n in nodes if n.kernel_cmdline == cmdline)
            lines.append(f"kernel command line ({names}): {cmdline or '-'}")
        if shared_hosts(nodes):
            hosts = sorted({n.hostname for n in nodes})
            lines.append(f"NOTE: {counted(len(nodes), 'node')} on {counted(len(hosts), 'host')} "
                         f"({', '.join(hosts)}): nodes of one host share its CPUs, so their "
                         "noise and timings are not independent")
    return lines


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def ranks_table(s: RunSummary) -> str:
    if s.ranks is None:
        return "ranks: no /ranks table in this file"
    names = set(s.ranks.dtype.names or ())
    columns = [
        c
        for c in (
            "rank",
            "node",
            "local_rank",
            "host",
            "pid",
            "cpus",
            "linux_cpus",
            "numa_node",
            "mem",
            "clock_offset_ns",
        )
        if c in names
    ]
    shown = s.ranks if len(s.ranks) <= MAX_RANK_ROWS else s.ranks[:MAX_RANK_ROWS]
    rows = [
        [
            (
                (format_size(int(r[c])) if r[c] else "-")
                if c == "mem"
                else _text(r[c]) if isinstance(r[c], bytes) else r[c].item()
            )
            for c in columns
        ]
        for r in shown
    ]
    title = (
        "ranks"
        if len(shown) == len(s.ranks)
        else f"ranks (first {len(shown)} of {len(s.ranks)}; --json has all)"
    )
    return render(columns, rows, title=title)


def _rank_rows(
    items: Sequence[Any], cells: Callable[[Any], list], worst: Callable[[Any], float]
) -> tuple[list[list], str]:
    """Rows of every rank (or of the worst ones) plus median/max rows over all ranks."""
    shown = list(items)
    note = ""
    if len(items) > MAX_RANK_ROWS:
        shown = sorted(sorted(items, key=worst, reverse=True)[:MAX_RANK_ROWS], key=lambda x: x.rank)
        note = f" ({MAX_RANK_ROWS} of {len(items)} ranks, those with the largest values)"
    rows = [cells(x) for x in shown]
    if len(items) > 1:
        table = [cells(x)[1:] for x in items]
        for label, fn in (("median", np.median), ("max", np.max)):
            agg = []
            for col in zip(*table):
                nums = [v for v in col if isinstance(v, (int, float)) and math.isfinite(v)]
                agg.append(num(float(fn(nums))) if nums and len(nums) == len(col) else "-")
            rows.append([label, *agg])
    return rows, note


def fwq_table(s: RunSummary) -> str:
    recorded = [r for r in s.fwq if r.samples]
    if not recorded:
        return ""
    a = s.noise_attrs
    rows, note = _rank_rows(
        recorded,
        lambda r: [
            r.rank,
            r.samples,
            us(r.quantum_ns),
            us(r.p50_ns),
            us(r.p99_ns),
            us(r.p999_ns),
            us(r.max_ns),
            us(r.mean_ns),
            pct(r.noise_fraction),
        ],
        lambda r: r.p999_ns,
    )
    lines = [
        render(
            (
                "rank",
                "samples",
                "min sample us",
                "excess p50 us",
                "excess p99 us",
                "excess p99.9 us",
                "excess max us",
                "excess mean us",
                "noise %",
            ),
            rows,
            title="FWQ noise" + note,
        )
    ]
    facts = []
    if "fwq_quantum_ns" in a:
        facts.append(f"target quantum {us(a['fwq_quantum_ns'])} us")
    if "fwq_reps" in a:
        facts.append(f"{counted(int(a['fwq_reps']), 'kernel repetition')} per sample")
    if "timer_cost_ns" in a:
        facts.append(f"timer cost {a['timer_cost_ns']} ns")
    missing = len(s.fwq) - len(recorded)
    if missing:
        facts.append(f"{counted(missing, 'rank')} recorded no samples")
    lines.append(
        "excess = sample - the rank's smallest sample (min sample); excess percentiles are "
        "exact values of the rank's excess (no interpolation); noise % = sum(excess) / sum(samples)"
    )
    if facts:
        lines.append("; ".join(facts))
    return "\n".join(lines)


def ftq_table(s: RunSummary) -> str:
    recorded = [r for r in s.ftq if r.intervals]
    if not recorded:
        return ""
    rows, note = _rank_rows(
        recorded,
        lambda r: [
            r.rank,
            r.intervals,
            r.max_count,
            num(r.mean_count),
            r.min_count,
            pct(r.noise_fraction),
        ],
        lambda r: r.noise_fraction,
    )
    interval = s.noise_attrs.get("ftq_interval_ns")
    lines = [
        render(
            ("rank", "intervals", "max count", "mean count", "min count", "noise %"),
            rows,
            title="FTQ noise" + note,
        ),
        "noise % = 1 - mean count / max count (work lost against the best interval)",
    ]
    if interval:
        lines[-1] += f"; interval {us(interval)} us"
    return "\n".join(lines)


def detours_table(s: RunSummary) -> str:
    if not s.detours:
        return ""
    rows, note = _rank_rows(
        s.detours,
        lambda r: [
            r.rank,
            r.count,
            num(r.rate_hz),
            num(r.total_ns / 1e6),
            num(r.span_ns / 1e9) if r.span_ns else "-",
            pct(r.fraction),
            us(r.p50_ns),
            us(r.p99_ns),
            us(r.max_ns),
            us(r.threshold_ns),
        ],
        lambda r: r.fraction if math.isfinite(r.fraction) else r.total_ns,
    )
    return "\n".join(
        [
            render(
                (
                    "rank",
                    "detours",
                    "per s",
                    "total ms",
                    "span s",
                    "noise %",
                    "p50 us",
                    "p99 us",
                    "max us",
                    "threshold us",
                ),
                rows,
                title="selfish detours" + note,
            ),
            "noise % = sum of detour durations / measured span",
        ]
    )


def offload_table(s: RunSummary) -> str:
    if not s.calls:
        return ""
    rows = [
        [
            c.call,
            c.count,
            c.ranks,
            format_size(c.bytes) if c.bytes else "0",
            c.errors,
            us(c.p50_ns),
            us(c.p99_ns),
            us(c.max_ns),
            us(c.mean_ns),
        ]
        for c in s.calls
    ]
    total = sum(c.count for c in s.calls)
    return "\n".join(
        [
            render(
                (
                    "call",
                    "count",
                    "ranks",
                    "bytes",
                    "errors",
                    "p50 us",
                    "p99 us",
                    "max us",
                    "mean us",
                ),
                rows,
                title=f"offloaded system calls ({total})",
            ),
            "latency = completion - trap, as the rank saw it",
        ]
    )


def counters_table(s: RunSummary) -> str:
    if not s.counters:
        return ""
    rows = [
        [c.key, c.units, num(c.minimum), num(c.median), num(c.maximum), num(c.total), c.values]
        for c in s.counters
    ]
    return render(
        ("value", "units", "min", "median", "max", "total", "values"),
        rows,
        title="per-rank values: memory, scheduler, app, noise (across ranks)",
    )


#: App attributes the app section shows in its first line.
_APP_HEADLINE = ("name", "scaling", "global_size", "verified")


def app_table(s: RunSummary) -> str:
    a = s.app
    if a is None:
        return ""
    facts = [
        f"app        {a.name or '-'}"
        + (f"   {a.scaling} scaling" if a.scaling else "")
        + (f"   global size {a.size}" if a.size else "")
        + ("" if a.verified is None else f"   verified {a.verified}")
    ]
    others = {k: v for k, v in a.attrs.items() if k not in _APP_HEADLINE}
    if others:
        facts.append(
            "attributes " + ", ".join(f"{k}={_attr(v)}" for k, v in sorted(others.items()))
        )
    if a.wall_ns is not None:
        facts.append(f"wall time  {fmt(a.wall_ns / 1e9)} s (slowest rank)")
    if a.iterations:
        facts.append(
            f"iteration  {counted(a.iterations, 'iteration')}; "
            "time of the slowest rank per iteration: "
            f"p50 {fmt(a.iter_p50_ns / 1e3)} us, mean {fmt(a.iter_mean_ns / 1e3)} us, "
            f"p99 {fmt(a.iter_p99_ns / 1e3)} us, max {fmt(a.iter_max_ns / 1e3)} us"
        )
        shares = [
            f"{name} {v * 100:.3g} %"
            for name, v in (("compute", a.compute_share), ("communication", a.comm_share))
            if math.isfinite(v)
        ]
        if shares:
            facts.append("share      " + ", ".join(shares) + " of all ranks' iteration time")
    for times, what, title in (
        (a.arrays, "times", "other app times (all ranks and iterations)"),
        (a.allreduce, "message", "allreduce latency per message size (all ranks and calls)"),
    ):
        if times:
            facts.append("")
            facts.append(_times_table(times, what, title))
    return "\n".join(facts)


def _times_table(times: list[TimeArray], what: str, title: str) -> str:
    return render(
        (what, "values", "p50 us", "p99 us", "max us", "mean us"),
        [[t.key, t.count, us(t.p50_ns), us(t.p99_ns), us(t.max_ns), us(t.mean_ns)] for t in times],
        title=title,
    )


def _attr(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return ",".join(map(str, v.tolist()))
    return fmt(v) if isinstance(v, float) else str(v)


def kernel_tables(s: RunSummary) -> str:
    """Per node: what interrupted each core (events per second of the measured phases, else of
    the whole app), where each core's time went, who sent IPIs to the rank cores, and the other
    tasks that ran there (over the whole app)."""
    parts = []
    span = "the app's measured phases" if s.kernel_window == "measured" else "the app"
    apps = {(c.host, c.node, c.cpu): c for c in s.kernel_app}
    for cores in kernel.by_node(s.kernel):
        first = cores[0]
        where = f"{first.host} node {first.node}" if first.host else f"node {first.node}"
        heads = ("kind", "source", "description", *(c.label for c in cores))
        rows: list[list[Any]] = [[k, src, d, *(num(r) for r in rates)]
                                 for k, src, d, rates in kernel.source_rows(cores)]
        app_cores = [apps.get((c.host, c.node, c.cpu)) for c in cores]
        rows.append(["sched", "switches", "context switches (whole app)",
                     *("-" if a is None or a.switches < 0 else num(a.switches / a.seconds)
                       for a in app_cores)])
        parts.append(render(heads, rows, title=(
            f"what interrupted each core ({where}): events per second over the "
            f"{fmt(first.seconds)} s of {span}")))
        time_rows = [[f, *(pct(kernel.share(c, c.times_ns[f])) for c in cores)]
                     for f in kernel.TIME_FIELDS]
        time_rows.append(["other tasks (whole app)",
                          *("-" if a is None else pct(kernel.share(a, a.other_run_ns()))
                            for a in app_cores)])
        parts.append(render(("time", *(c.label for c in cores)), time_rows,
                            title=f"where each core's time went ({where}, % of {span})"))
        senders = kernel.sender_rows(cores)
        if senders:
            parts.append(render(
                ("cpu", "event", "sender", "tid", "owner", "callsite", "function", "count", "/s"),
                [[c.cpu, t["event"], t["sender"], t["tid"], t["owner"], t["callsite"],
                  t["function"] or "-", t["count"], num(t["count"] / c.seconds)] for c, t in senders],
                title=f"who sent IPIs to the rank cores ({where}, {span})"))
        tasks = kernel.task_rows([a for a in app_cores if a is not None])
        if tasks:
            parts.append(render(
                ("cpu", "task", "pid", "tid", "run ms", "% of app", "slices"),
                [[c.cpu, t["comm"], t["pid"], t["tid"], num(t["run_ns"] / 1e6),
                  pct(kernel.share(c, t["run_ns"])), t["slices"]] for c, t in tasks],
                title=f"other tasks on the rank cores ({where}; sampled at both ends of the app)"))
    if parts and s.kernel_attrs:
        parts.append("\n".join(f"kernel {k}: {v}" for k, v in sorted(s.kernel_attrs.items())))
    return "\n\n".join(parts)


def datasets_table(s: RunSummary) -> str:
    return render(("dataset", "kind", "shape", "dtype", "units"), s.datasets, title="recorded data")


def render_summary(s: RunSummary) -> str:
    """The full text report of one summarised run."""
    parts = [
        header(s),
        ranks_table(s),
        fwq_table(s),
        ftq_table(s),
        detours_table(s),
        offload_table(s),
        counters_table(s),
        app_table(s),
        kernel_tables(s),
        datasets_table(s),
    ]
    return "\n\n".join(p for p in parts if p)


def text(run: Run) -> str:
    """The text report of an open run file."""
    return render_summary(summarize(run))
