"""System-call offload: a per-node Linux proxy executes the I/O system calls of its ranks.

Modules, one job each, in three groups. The rank side never imports the proxy side (the
proxy is another process, started with `mckmpi proxy`); both import the shared modules.

Shared:

* `syscalls`   -- the one table: what is trapped, emulated or passed through;
* `seccomp`    -- kernel interface: structures, ioctls, the BPF filter, feature probe, pidfds;
* `protocol`   -- control messages between rank and proxy (SEQPACKET + SCM_RIGHTS);
* `policy`     -- which paths are offloaded (`--offload io|none`, include/exclude);
* `accounting` -- per-call records (`RECORD_DTYPE`);
* `ring`       -- layout of the asynchronous shared-memory request ring;
* `errors`     -- `OffloadError`.

Rank side:

* `session`    -- one rank's offload across a run, as the runner uses it;
* `client`     -- `attach` (registration, filter, proxy watcher), `OffloadSession.detach`,
                  `Channel` (the rank's end of the ring);
* `spawn`      -- start a node proxy, wait for its socket, sweep stale ones.

Proxy side (each module imports only those below it):

* `server`     -- the proxy process: accept, registration, lifetimes, `serve`;
* `ring_server`-- the proxy's end of the ring (a thread per ring);
* `loop`       -- `Emulator`: the notification loop of one rank and the dispatch;
* `_fastpath`  -- (C, built at install) the loop's hot path: receives and answers plain
                  read/write/pread64/pwrite64 on cached descriptors without the GIL and
                  hands every other call back to the loop;
* `paths`      -- handlers of path calls, opening and duplicating (ADDFD);
* `data`       -- handlers of data calls and descriptor-table bookkeeping;
* `kernel_abi` -- Linux x86-64 ABI facts those handlers share;
* `tracee`     -- the rank's processes (identity, descriptors, memory) as the proxy
                  tracks them;
* `failures`   -- the proxy's own failures while serving: counted, logged once per kind;
* `remote`     -- remote memory: the arena mapping, /proc/<pid>/mem, process_vm_writev.

How a runner uses it (lwk mode), after MPI init:

    from mckmpi.offload import client, seccomp, spawn
    from mckmpi.offload.policy import Policy

    seccomp.require()                                   # early: one clear line if missing
    if local_rank == 0:                                 # before this rank attaches
        handle = spawn.start_node_proxy(run_dir, linux_cpus, expected=local_size)
    node_comm.Barrier()
    session = client.attach(spawn.socket_path(run_dir), rank=rank,
                            arena_memfd=arena.memfd, arena_address=arena.address,
                            policy=Policy(mode, include, exclude),
                            on_proxy_death=lambda msg: (print(msg), world.Abort(70)))
    node_comm.Barrier()                                 # every rank registered
    ...                                                 # the app
    records = session.detach()                          # numpy, accounting.RECORD_DTYPE

(`session.start` and `OffloadRun` do exactly this for `mckmpi run`.)
"""
