"""What interrupted each core of a job: the `kernel/*` tables of a run file, per node and core.

The runtime counted, per CPU of every node, the interrupt lines, softirqs, CPU time split and
other tasks between the start and the end of the app (mckmpi/node/kernelnoise.py). Here they
become rates per second of the window, so runs of different lengths compare, and the "rank
cores" (the CPUs ranks ran on: LWK cores in lwk mode, every core in linux mode) are told
apart from the service cores that are meant to absorb the noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mckmpi.trace.reader import Run

GROUP = "kernel"
#: The windows a file may hold: the whole app, and its measured phases (the steady state).
WINDOWS = ("app", "measured")
#: The per-CPU lines of /proc/interrupts that are inter-processor interrupts another CPU sent.
IPI_SOURCES = ("RES", "CAL", "TLB")
#: CPU time fields of kernel/cpus, in the order reports show them.
TIME_FIELDS = ("user", "system", "irq", "softirq", "steal", "idle", "iowait")


@dataclass
class Core:
    """One CPU of one node over the recorded window."""

    host: str
    node: int
    cpu: int
    side: str
    ranks: int
    window_ns: int
    times_ns: dict[str, int]
    switches: int  # -1: not countable
    sources: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, source) -> count
    descriptions: dict[tuple[str, str], str] = field(default_factory=dict)
    tasks: list[dict[str, Any]] = field(default_factory=list)  # other tasks, most run time first
    senders: list[dict[str, Any]] = field(default_factory=list)  # traced IPIs, most first
    tasks_sampled: bool = False  # tasks are sampled over the whole app only

    @property
    def seconds(self) -> float:
        return self.window_ns / 1e9

    @property
    def label(self) -> str:
        return f"cpu{self.cpu} {self.side}" + (f" ({self.ranks} rank{'s' * (self.ranks != 1)})"
                                              if self.ranks else "")

    def rate(self, kind: str, source: str) -> float:
        """Events of one source per second of the window."""
        return self.sources.get((kind, source), 0) / self.seconds if self.window_ns else 0.0

    def total(self, kind: str) -> int:
        return sum(c for (k, _), c in self.sources.items() if k == kind)

    @property
    def ipis(self) -> int:
        return sum(self.sources.get(("arch", s), 0) for s in IPI_SOURCES)

    def job_ipis(self) -> int:
        """Traced IPIs the job's own threads sent to this core (reschedules and function
        calls; csd_queue_cpu events only name the function of an IPI already counted)."""
        return sum(t["count"] for t in self.senders
                   if t["owner"] == "job" and t["event"] != "csd_queue_cpu")

    def other_run_ns(self) -> int:
        """CPU time of tasks that are not the job's, on this core."""
        return sum(t["run_ns"] for t in self.tasks if t["owner"] != "job")

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host, "node": self.node, "cpu": self.cpu, "side": self.side,
            "ranks": self.ranks, "window_ns": self.window_ns, "times_ns": self.times_ns,
            "switches": None if self.switches < 0 else self.switches,
            "sources": [{"kind": k, "source": s, "description": self.descriptions.get((k, s), ""),
                         "count": c} for (k, s), c in sorted(self.sources.items())],
            "tasks": self.tasks, "ipi_senders": self.senders,
        }


def _s(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def windows(run: Run) -> list[str]:
    """The windows recorded in `run`, in `WINDOWS` order ([] without kernel counters)."""
    if f"{GROUP}/cpus" not in run:
        return []
    present = {_s(w) for w in run.read(f"{GROUP}/cpus", "window")} if len(run[f"{GROUP}/cpus"]) else set()
    return [w for w in WINDOWS if w in present]


def steady_window(run: Run) -> str:
    """The measured phases when the app marked them, else the whole app."""
    return "measured" if "measured" in windows(run) else "app"


def cores(run: Run, window: str = "app") -> list[Core]:
    """Every recorded core in one window, ordered by node and CPU ([] for a file without
    kernel counters or without that window)."""
    if f"{GROUP}/cpus" not in run:
        return []
    ranks = run.ranks if "ranks" in run else None
    tag = window.encode()
    out: dict[tuple[int, int], Core] = {}
    for row in run.table(f"{GROUP}/cpus"):
        if row["window"] != tag:
            continue
        rank = int(row["rank"])
        host = _s(ranks[rank]["host"]) if ranks is not None and rank < len(ranks) else ""
        node = int(ranks[rank]["node"]) if ranks is not None and rank < len(ranks) else rank
        out[(rank, int(row["cpu"]))] = Core(
            host, node, int(row["cpu"]), _s(row["side"]), int(row["ranks"]), int(row["window_ns"]),
            {f: int(row[f"{f}_ns"]) for f in TIME_FIELDS}, int(row["switches"]))
    for row in run.table(f"{GROUP}/interrupts"):
        core = out.get((int(row["rank"]), int(row["cpu"])))
        if core is not None and row["window"] == tag:
            key = (_s(row["kind"]), _s(row["source"]))
            core.sources[key] = core.sources.get(key, 0) + int(row["count"])
            core.descriptions[key] = _s(row["description"])
    if window == "app":  # tasks are sampled over the whole app only
        for core in out.values():
            core.tasks_sampled = True
        for row in run.table(f"{GROUP}/tasks"):
            core = out.get((int(row["rank"]), int(row["cpu"])))
            if core is not None:
                core.tasks.append({"comm": _s(row["comm"]), "pid": int(row["pid"]),
                                   "tid": int(row["tid"]), "owner": _s(row["owner"]),
                                   "run_ns": int(row["run_ns"]), "wait_ns": int(row["wait_ns"]),
                                   "slices": int(row["slices"])})
    if f"{GROUP}/ipis" in run:
        for row in run.table(f"{GROUP}/ipis"):
            core = out.get((int(row["rank"]), int(row["cpu"])))
            if core is not None and row["window"] == tag:
                core.senders.append({"event": _s(row["event"]), "sender": _s(row["sender"]),
                                     "tid": int(row["tid"]), "owner": _s(row["owner"]),
                                     "callsite": _s(row["callsite"]),
                                     "function": _s(row["function"]), "count": int(row["count"])})
    for core in out.values():
        core.tasks.sort(key=lambda t: -t["run_ns"])
        core.senders.sort(key=lambda t: -t["count"])
    return [out[k] for k in sorted(out, key=lambda k: (out[k].node, k[1]))]


def rank_cores(all_cores: list[Core]) -> list[Core]:
    """The cores ranks ran on."""
    return [c for c in all_cores if c.ranks > 0]


def per_rank_core(all_cores: list[Core]) -> dict[str, tuple[str, float]]:
    """Rates averaged over the rank cores, keyed by a readable name -> (unit, value): what
    `compare` puts side by side. Empty when no rank core was recorded."""
    rc = rank_cores(all_cores)
    seconds = sum(c.seconds for c in rc)
    if not rc or seconds <= 0:
        return {}
    out: dict[str, tuple[str, float]] = {
        "IPIs (RES+CAL+TLB)": ("1/s", sum(c.ipis for c in rc) / seconds),
        "device interrupts": ("1/s", sum(c.total("device") for c in rc) / seconds),
        "softirqs": ("1/s", sum(c.total("softirq") for c in rc) / seconds),
    }
    if all(c.tasks_sampled for c in rc):
        out["other tasks' CPU time"] = ("ms/s", sum(c.other_run_ns() for c in rc) / 1e6 / seconds)
    for f in ("irq", "softirq", "steal"):
        out[f"{f} time"] = ("ms/s", sum(c.times_ns[f] for c in rc) / 1e6 / seconds)
    if any(c.senders for c in rc):
        out["IPIs sent by the job's own threads"] = ("1/s", sum(c.job_ipis() for c in rc) / seconds)
    if all(c.switches >= 0 for c in rc):
        out["context switches"] = ("1/s", sum(c.switches for c in rc) / seconds)
    for name in sorted({s for c in rc for (k, s) in c.sources if k == "arch"}):
        out[name] = ("1/s", sum(c.sources.get(("arch", name), 0) for c in rc) / seconds)
    return out


def source_rows(node_cores: list[Core], limit: int = 24) -> list[tuple[str, str, str, list[float]]]:
    """(kind, source, description, rate per core) of one node's sources, the ones that hit the
    rank cores hardest first; at most `limit` rows."""
    keys = {k for c in node_cores for k in c.sources}
    weight = {k: (max((c.rate(*k) for c in node_cores if c.ranks), default=0.0),
                  max(c.rate(*k) for c in node_cores)) for k in keys}
    ordered = sorted(keys, key=lambda k: (-weight[k][0], -weight[k][1], k))[:limit]
    desc = {k: d for c in node_cores for k, d in c.descriptions.items()}
    return [(k[0], k[1], desc.get(k, ""), [c.rate(*k) for c in node_cores]) for k in ordered]


def by_node(all_cores: list[Core]) -> list[list[Core]]:
    """The cores grouped per recording node, in node order."""
    groups: dict[tuple[str, int], list[Core]] = {}
    for c in all_cores:
        groups.setdefault((c.host, c.node), []).append(c)
    return list(groups.values())


def attrs(run: Run) -> dict[str, Any]:
    """How the counters were taken (switch counter, task sampling, osnoise), as recorded."""
    return run.group_attrs(GROUP)


def sender_rows(node_cores: list[Core], limit: int = 12) -> list[tuple[Core, dict[str, Any]]]:
    """Traced IPI senders to the node's rank cores, most IPIs first."""
    rows = [(c, t) for c in node_cores if c.ranks for t in c.senders]
    rows.sort(key=lambda ct: -ct[1]["count"])
    return rows[:limit]


def task_rows(node_cores: list[Core], limit: int = 12) -> list[tuple[Core, dict[str, Any]]]:
    """Tasks that were not the job's and ran on the node's rank cores, most CPU time first."""
    rows = [(c, t) for c in node_cores if c.ranks for t in c.tasks if t["owner"] != "job"]
    rows.sort(key=lambda ct: -ct[1]["run_ns"])
    return rows[:limit]


def share(core: Core, ns: int) -> float:
    """`ns` as a fraction of the core's window."""
    return ns / core.window_ns if core.window_ns else float(np.nan)
