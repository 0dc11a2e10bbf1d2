"""The node: host facts, rank placement, the partition plan and cpuset reservations.

`host` reads every fact of the running host (CPUs, cgroups, NUMA, memory, huge pages);
`placement` says where a rank is (launcher environment, checked against MPI); `partition`
computes a node's Linux/LWK split from facts passed in (pure, testable without MPI or
root); `cpuset` turns a plan into cpuset cgroups and restores what it changed.
Nothing here imports the LWK runtime or the offload.
"""
