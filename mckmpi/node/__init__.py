"""The node: host facts, rank placement, the partition plan, reservations and isolation.

`host` reads every fact of the running host (CPUs, cgroups, NUMA, memory, huge pages);
`placement` says where a rank is (launcher environment, checked against MPI); `partition`
computes a node's Linux/LWK split from facts passed in (pure, testable without MPI or
root); `cpuset` turns a plan into cpuset cgroups and restores what it changed; `isolation`
takes IRQs, workqueues, kernel threads, load balancing and deep idle away from the LWK
cores and restores them; `reservation` makes, shows and undoes both together.
`kernelnoise` counts what the kernel did on a job's CPUs (interrupts, softirqs, CPU time,
switches, other tasks) and `ipitrace` who sent their IPIs, for the run file.
Nothing here imports the LWK runtime or the offload.
"""
