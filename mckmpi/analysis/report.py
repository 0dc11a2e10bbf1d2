"""`mckmpi report`: what a run file holds, as text tables."""

from __future__ import annotations

from mckmpi.trace.reader import Run
from mckmpi.utility.table import render
from mckmpi.utility.units import format_size


def header(run: Run) -> str:
    a = run.attrs
    lines = [
        f"run file   {run.path}",
        f"app        {a.get('app')} {a.get('app_args', '')}".rstrip(),
        f"mode       {a.get('mode')}   ranks {a.get('world_size')}   nodes {a.get('nnodes')}"
        f"   launcher {a.get('launcher')}",
        f"created    {a.get('created')}   schema {a.get('schema')} v{a.get('schema_version')}"
        f"   complete {bool(a.get('complete'))}",
    ]
    if a.get("slurm_job_id"):
        lines.append(f"slurm      job {a['slurm_job_id']} on {a.get('slurm_nodelist')}")
    prov = run.provenance
    if prov:
        lines.append(f"versions   mckmpi {prov.get('mckmpi')}, Python {prov.get('python')}, "
                     f"numpy {prov.get('numpy')}, mpi4py {prov.get('mpi4py')}, HDF5 {prov.get('hdf5')}")
        lines.append(f"mpi        {prov.get('mpi_library')}")
        lines.append(f"kernel     {prov.get('kernel')}")
        for plan in prov.get("node_plans", []):
            lines.append(f"partition  {plan}")
    return "\n".join(lines)


def ranks_table(run: Run) -> str:
    rows = [
        (int(r["rank"]), int(r["node"]), int(r["local_rank"]), r["host"].decode(), int(r["pid"]),
         r["cpus"].decode(), r["linux_cpus"].decode(), int(r["numa_node"]),
         format_size(int(r["mem"])) if r["mem"] else "-", int(r["clock_offset_ns"]))
        for r in run.ranks
    ]
    return render(("rank", "node", "local", "host", "pid", "cpus", "linux cpus", "numa", "mem",
                   "clock offset ns"), rows, title="ranks")


def datasets_table(run: Run) -> str:
    rows = []
    for name in run.datasets():
        ds = run[name]
        rows.append((name, str(ds.attrs.get("kind", "")), "x".join(map(str, ds.shape)),
                     str(ds.dtype) if ds.dtype.names is None else "table", run.units(name)))
    return render(("dataset", "kind", "shape", "dtype", "units"), rows, title="recorded data")


def text(run: Run) -> str:
    return "\n\n".join((header(run), ranks_table(run), datasets_table(run)))
