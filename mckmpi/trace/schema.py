"""Schema v1 of the run file: names, versions and layout rules shared by writer and reader.

Layout (see results/README.md for the full description):

    /                  attrs: schema, schema_version, complete, created, command, app,
                              app_args, mode, world_size, nnodes, slurm_job_id, slurm_nodelist
    /provenance        attrs: versions, kernel, hosts, partition plan
    /ranks             table, one row per rank (rank, node, local_rank, host, cpus, ...)
    /<group>/<name>    per-concern data recorded through the Tracer:
                         scalar -> [ranks], array -> [ranks, ...], table -> rows + 'rank' column

Times are int64 nanoseconds of each rank's CLOCK_MONOTONIC; /ranks.clock_offset_ns maps
them onto rank 0's clock (t_rank0 = t + offset).
"""

from __future__ import annotations

import numpy as np

SCHEMA = "mckmpi.run"
SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"

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
