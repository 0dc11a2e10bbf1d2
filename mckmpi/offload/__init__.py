"""System-call offload: a per-node Linux proxy executes the I/O system calls of its ranks.

Modules, one job each:

* `syscalls`   -- the one table: what is trapped, emulated or passed through;
* `seccomp`    -- kernel interface: structures, ioctls, the BPF filter, feature probe;
* `policy`     -- which paths are offloaded (`--offload io|none`, include/exclude);
* `protocol`   -- control messages between rank and proxy (SEQPACKET + SCM_RIGHTS);
* `remote`     -- the proxy's handle on a process under a rank's filter (memory, fds);
* `emulate`    -- the serving loop of one rank: dispatch, answers, records;
* `paths`      -- path calls, opening and duplicating (ADDFD);
* `data`       -- data calls and descriptor-table bookkeeping;
* `abi`        -- constants and helpers those handlers share;
* `proxy`      -- the node proxy process: registration, lifetimes, `start_node_proxy`;
* `client`     -- the rank's side: `attach`, `OffloadSession.detach`;
* `channel`    -- asynchronous requests through a shared-memory ring;
* `accounting` -- per-call records (`RECORD_DTYPE`).

How a runner uses it (lwk mode), after MPI init:

    from mckmpi.offload import client, proxy, seccomp
    from mckmpi.offload.policy import Policy

    seccomp.require()                                   # early: one clear line if missing
    if local_rank == 0:                                 # before this rank attaches
        handle = proxy.start_node_proxy(run_dir, linux_cpus, expected=local_size)
    node_comm.Barrier()
    session = client.attach(proxy.socket_path(run_dir), rank=rank,
                            arena_memfd=arena.memfd, arena_address=arena.address,
                            policy=Policy(mode, include, exclude),
                            on_proxy_death=lambda msg: (print(msg), world.Abort(70)))
    node_comm.Barrier()                                 # every rank registered
    ...                                                 # the app
    records = session.detach()                          # numpy, accounting.RECORD_DTYPE
"""
