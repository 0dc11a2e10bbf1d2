"""Schema v3 of the run file: names, versions and layout rules shared by writer and reader.

Layout (see results/README.md for the full description):

    /                  attrs: schema, schema_version, complete, created, command, app,
                              app_args, mode, world_size, nnodes, slurm_job_id, slurm_nodelist,
                              ending, exit_status, signal, ending_rank, error
    /provenance        attrs: versions, kernel, hosts, partition plan
    /ranks             table, one row per rank (rank, node, local_rank, host, cpus, ...)
    /<group>/<name>    per-concern data recorded through the Tracer:
                         scalar -> [ranks], array -> [ranks, ...], table -> rows + 'rank' column
                       records with fields (tables, /ranks) are a group of the same name with
                       one 1-D dataset per field (attrs kind, columns: the field order)

Times are int64 nanoseconds of each rank's CLOCK_MONOTONIC; /ranks.clock_offset_ns maps
them onto rank 0's clock (t_rank0 = t + offset).

Version 2 labels every dataset for netCDF readers (`mckmpi.trace.labels`): HDF5 dimension
scales name each axis (``rank`` first for per-rank data, a row dimension for tables, named
by `DIMENSIONS` below) and every numeric value has units (`UNITS`, else inferred).

Version 3 stores nothing netCDF-C cannot show: records with fields, which v2 stored as one
HDF5 compound dataset, are one dataset per field sharing the row dimension (a flat table
with its rank column), and booleans, which v2 stored as HDF5 enums, are int8 with CF's
``flag_values``/``flag_meanings``. Boolean attributes (``complete``, ``app.verified``, an
app's own) are int8 0/1 too, and every object that has any names them in its
``boolean_attributes`` attribute, so the reader gives them back as `bool`. Versions 1
(unlabelled) and 2 are read as before: the reader gives every version's records the same
structured arrays and its enum attributes the same `bool`s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCHEMA = "mckmpi.run"
SCHEMA_VERSION = 3
#: Oldest version the reader still opens.
OLDEST_SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"

#: How a job ended (root attribute `ending`), one word each:
#: normal     every rank's app returned (exit status 0);
#: exit       a rank's app exited with a non-zero status (`exit_status`);
#: exception  an uncaught exception in a rank (`error` is its first line);
#: signal     a rank received a terminating signal (`signal`: SIGTERM from scancel or a time
#:            limit, SIGINT, SIGHUP, or a signal named with `mckmpi run --signal`);
#: io-error   the run's data could not be written (`error` names the path and the errno);
#: proxy      the node's offload proxy died (the rank cannot do I/O any more);
#: aborted    a rank's app called MPI_Abort (`exit_status` is its errorcode);
#: killed     a rank vanished without a word (kill -9, a lost node, an MPI_Abort that
#:            the wrapper could not see); only a partial file can say this.
ENDINGS = ("normal", "exit", "exception", "signal", "io-error", "proxy", "aborted", "killed")

#: Kinds of recorded data and how they are laid out across ranks.
SCALAR, ARRAY, TABLE = "scalar", "array", "table"

#: Width of per-rank string scalars (reasons, policy names): one dtype on every rank.
STRING_BYTES = 128

RANKS_DTYPE = np.dtype([
    ("rank", "i4"),
    ("node", "i4"),
    ("local_rank", "i4"),
    ("vnode", "i4"),
    ("host", "S64"),
    ("pid", "i8"),
    ("cpus", "S64"),          # the rank's cores (LWK cores in lwk mode)
    ("linux_cpus", "S64"),    # the node's Linux (service) cores
    ("numa_node", "i4"),
    ("mem", "i8"),            # arena bytes (0 in linux mode)
    ("clock_offset_ns", "i8"),
    ("clock_rtt_ns", "i8"),
])


def job_ending(endings: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The job's ending from the ranks' own (None: the rank recorded none). The cause is
    preferred to its consequences: the earliest exit, exception, I/O error or lost proxy
    (times on rank 0's clock); else a rank that vanished without a word (`killed`: the
    launcher then signals the others); else the earliest signal; else normal."""
    missing = [r for r, e in enumerate(endings) if not e]
    bad = [e for e in endings if e and e.get("ending") != "normal"]
    causes = [e for e in bad if e.get("ending") != "signal"]
    if causes:
        first = min(causes, key=lambda e: e.get("time_ns", 0))
    elif missing:
        error = "no rank recorded an ending" if len(missing) == len(endings) \
            else f"rank {missing[0]} recorded no ending"
        first = {"ending": "killed", "rank": missing[0], "exit_status": -1, "signal": "",
                 "error": error}
    elif bad:
        first = min(bad, key=lambda e: e.get("time_ns", 0))
    else:
        return {"ending": "normal", "exit_status": 0, "signal": "", "ending_rank": -1,
                "error": "", "ending_time_ns": max(int(e.get("time_ns", 0)) for e in endings)}
    return {"ending": first["ending"], "exit_status": int(first.get("exit_status", -1)),
            "signal": first.get("signal", ""), "ending_rank": int(first.get("rank", -1)),
            "error": first.get("error", ""), "ending_time_ns": int(first.get("time_ns", 0))}


#: Name of the per-rank dimension (and of its coordinate in every group with per-rank data).
RANK_DIM = "rank"

#: Axis names of recorded data after the rank axis (arrays) or of the rows (tables). Data
#: not listed gets ``NAME_dimI`` (arrays) or ``NAME_row`` (tables).
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "noise/fwq_ns": ("sample",),
    "noise/ftq_counts": ("interval",),
    "noise/ftq_start_ns": ("interval",),
    "noise/detours": ("detour",),
    "app/iter_ns": ("iteration",),
    "app/compute_ns": ("iteration",),
    "app/comm_ns": ("iteration",),
    "app/halo_ns": ("iteration",),
    "app/ckpt_ns": ("iteration",),
    "app/base_iter_ns": ("base_iteration",),
    "app/allreduce": ("allreduce_call",),
    "app/checkpoints": ("checkpoint",),
    "offload/calls": ("offload_call",),
}

#: Booleans as netCDF reads them (CF flags): int8 0/1 with these attributes.
BOOL_STORED = np.dtype("i1")
FLAG_MEANINGS = "false true"
#: The attribute that names an object's boolean attributes (stored as int8 0/1: netCDF-C
#: leaves HDF5 enum attributes out), so readers give them back as booleans.
BOOL_ATTRS = "boolean_attributes"

#: Units of data recorded without them (UDUNITS spelling; "1" is a pure number). Table
#: fields are ``KEY:FIELD``. Anything else numeric: "ns" for names ending in ``_ns``, "B" for
#: ``bytes``, else "1"; strings and booleans carry no units.
UNITS: dict[str, str] = {
    "memory/size": "B",
    "memory/alignment": "B",
    "memory/in_use": "B",
    "memory/peak": "B",
    "memory/largest_free": "B",
    "memory/fallback_bytes": "B",
    "memory/numa_node": "1",
    "scheduler/switch_interval_before": "s",
    "scheduler/switch_interval_after": "s",
    "ranks:mem": "B",
    "offload/calls:how": "1",
}


def default_units(key: str, field: str, dtype: np.dtype) -> str:
    """The units of `key` (or of its table `field`) when the recording gave none; "" for
    values that have none (strings, booleans)."""
    if dtype.kind in "bSUOV":
        return ""
    listed = UNITS.get(f"{key}:{field}" if field else key)
    if listed is not None:
        return listed
    name = field or key.rsplit("/", 1)[-1]
    if name.endswith("_ns"):
        return "ns"
    if name == "bytes" or name.endswith("_bytes"):
        return "B"
    return "1"


#: Types of the attributes the readers interpret, per group ("" is the root). A file whose
#: attribute has another type was not written by mckmpi (or was edited): the reader refuses
#: it with one line instead of failing somewhere in the analysis. Attributes not listed
#: here are free-form (apps record what they like) and only ever printed.
ATTR_TYPES: dict[str, dict[str, type]] = {
    "": {
        "schema": str, "schema_version": int, "complete": bool, "created": str,
        "command": str, "app": str, "app_args": str, "mode": str, "world_size": int,
        "nnodes": int, "vnodes": int, "launcher": str, "slurm_job_id": str,
        "slurm_nodelist": str,
    },
    "noise": {
        "fwq_quantum_ns": int, "fwq_reps": int, "ftq_interval_ns": int,
    },
    "app": {"name": str, "scaling": str, "verified": bool},
    "provenance": {"hosts": list, "node_hostname": list, "node_plans": list, "settings": list},
}

#: More ranks (or nodes) than any job runs: a larger world_size is a damaged or crafted
#: file, whose reading would take memory and time in proportion.
MAX_RANKS = 1 << 24

#: Types of the attributes of every dataset ("units:FIELD" is checked as "units").
DATASET_ATTR_TYPES: dict[str, type] = {"kind": str, "units": str}

_INT = "iu"
#: Layout of the datasets the readers interpret: the numpy dtype kinds of its values (or,
#: for a table, of each of these columns it has) and its number of dimensions. The reader
#: checks these when a dataset is opened, so the analysis meets only well-formed data.
DATASET_LAYOUTS: dict[str, tuple[str | dict[str, str], int]] = {
    "ranks": ({"rank": _INT}, 1),
    "noise/fwq_ns": (_INT, 2),
    "noise/ftq_counts": (_INT, 2),
    "noise/detours": ({"rank": _INT, "start_ns": _INT, "duration_ns": _INT}, 1),
    "noise/detour_span_ns": (_INT, 1),
    "noise/detour_threshold_ns": (_INT, 1),
    "offload/calls": ({"rank": _INT, "call": "SU", "bytes": _INT, "result": _INT,
                       "errno": _INT, "trap_ns": _INT, "done_ns": _INT}, 1),
    "app/wall_ns": (_INT, 1),
    "app/iter_ns": (_INT, 2),
    "app/compute_ns": (_INT, 2),
    "app/comm_ns": (_INT, 2),
    "app/allreduce": ({"rank": _INT, "bytes": _INT, "ns": _INT}, 1),
}
