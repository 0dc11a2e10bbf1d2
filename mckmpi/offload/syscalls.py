"""The one syscall table: what the rank's filter traps and what the proxy does with it.

Every decision about a system call lives here, so the BPF filter (`seccomp.build_filter`),
the proxy's dispatcher and the documentation cannot disagree. Each entry says

* ``kind`` -- when the filter hands the call to the proxy:
  ``path``    always (the call names a file by path);
  ``fd``      only when one of ``fd_args`` is an offloaded descriptor, i.e. its low 32 bits,
              read as a C int, are >= the rank's ``fd_base`` (and, with ``arg_in``, only
              for the listed values of one more argument, e.g. fcntl's F_DUPFD; with
              ``also_below``, also when the first one is below that number: the close of a
              standard stream, whose number the next new descriptor may have to take);
  ``observe`` always, but only so the proxy can keep its descriptor cache true (exec drops
              close-on-exec descriptors, close_range closes many, umask changes creation
              modes); the proxy answers CONTINUE;
  ``identity`` always (or, with ``arg_in``, for the listed values of one argument): the
              call changes what the task may do with files (credentials, capabilities, fs
              root, namespaces, RLIMIT_FSIZE, Landlock). The proxy cannot act with that
              context, so the task's process runs natively from then on (the proxy's
              `tracee.identity`); the call itself is answered with CONTINUE;
  ``native``  never: the kernel runs it in the rank. Listed so the table documents why e.g.
              ``mmap`` or ``fcntl`` on an offloaded descriptor needs no proxy: the rank's
              descriptor shares the proxy's open file description, so running them natively
              is what SECCOMP_USER_NOTIF_FLAG_CONTINUE would do, minus a round trip.
* ``action`` -- ``emulate`` (the proxy executes it and returns the result) or ``continue``
  (the kernel executes it in the rank, after the proxy's bookkeeping for ``fd``/``observe``).

Only x86_64 has a table; other machines are refused with a clear error rather than trapped
with wrong numbers.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache

from mckmpi.errors import FeatureUnavailable

#: First descriptor number the proxy installs into a rank. Low enough to fit under common
#: hard RLIMIT_NOFILE values (4096 is the usual soft limit; hard limits are far higher),
#: high enough that the rank's own descriptors (MPI sockets, shared memory, stdio) stay below.
FD_BASE = 4096

#: Offloaded descriptors a rank can hold at once: the rank's soft RLIMIT_NOFILE is raised to
#: fd_base + FD_SPAN (capped by the hard limit).
FD_SPAN = 4096

#: The offloaded range ends where a C int turns negative; the filter checks both bounds.
FD_LIMIT = 1 << 31

AUDIT_ARCH_X86_64 = 0xC000003E
F_DUPFD = 0
F_DUPFD_CLOEXEC = 1030
RLIMIT_FSIZE, RLIMIT_NOFILE = 1, 7
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT = 24, 28, 47

KINDS = ("path", "fd", "observe", "identity", "native")
ACTIONS = ("emulate", "continue")


@dataclass(frozen=True)
class Syscall:
    """One row of the table."""

    name: str
    nr: int
    kind: str
    action: str
    fd_args: tuple[int, ...] = ()
    #: for ``fd`` and ``identity`` calls: trap only when args[i] (low 32 bits) is one of
    #: the given values
    arg_in: tuple[int, tuple[int, ...]] | None = None
    #: for ``fd`` calls: trap also when the first fd argument is below this number
    also_below: int = 0


def _rows() -> list[Syscall]:
    p, f, o, i, n = "path", "fd", "observe", "identity", "native"
    e, c = "emulate", "continue"
    rows = [
        # path calls: the proxy resolves the path against the rank's cwd or dirfd
        Syscall("open", 2, p, e), Syscall("openat", 257, p, e), Syscall("openat2", 437, p, e),
        Syscall("creat", 85, p, e),
        Syscall("stat", 4, p, e), Syscall("lstat", 6, p, e), Syscall("newfstatat", 262, p, e),
        Syscall("statx", 332, p, e),
        Syscall("access", 21, p, e), Syscall("faccessat", 269, p, e),
        Syscall("faccessat2", 439, p, e),
        Syscall("unlink", 87, p, e), Syscall("unlinkat", 263, p, e), Syscall("rmdir", 84, p, e),
        Syscall("mkdir", 83, p, e), Syscall("mkdirat", 258, p, e),
        Syscall("rename", 82, p, e), Syscall("renameat", 264, p, e),
        Syscall("renameat2", 316, p, e),
        Syscall("readlink", 89, p, e), Syscall("readlinkat", 267, p, e),
        Syscall("truncate", 76, p, e),
        # data and metadata calls on offloaded descriptors
        Syscall("read", 0, f, e, (0,)), Syscall("write", 1, f, e, (0,)),
        Syscall("pread64", 17, f, e, (0,)), Syscall("pwrite64", 18, f, e, (0,)),
        Syscall("readv", 19, f, e, (0,)), Syscall("writev", 20, f, e, (0,)),
        Syscall("preadv", 295, f, e, (0,)), Syscall("pwritev", 296, f, e, (0,)),
        # glibc implements preadv/pwritev with these (flags 0); with RWF_* flags: CONTINUE
        Syscall("preadv2", 327, f, e, (0,)), Syscall("pwritev2", 328, f, e, (0,)),
        Syscall("lseek", 8, f, e, (0,)), Syscall("fsync", 74, f, e, (0,)),
        Syscall("fdatasync", 75, f, e, (0,)), Syscall("ftruncate", 77, f, e, (0,)),
        Syscall("fallocate", 285, f, e, (0,)), Syscall("fstat", 5, f, e, (0,)),
        Syscall("getdents64", 217, f, e, (0,)),
        # file-to-file copies (cp uses copy_file_range, shutil.copyfile uses sendfile)
        Syscall("copy_file_range", 326, f, e, (0, 2)), Syscall("sendfile", 40, f, e, (0, 1)),
        # duplicates: emulated so the copy is offloaded too (numpy's tofile writes through
        # os.dup(), which is fcntl(F_DUPFD_CLOEXEC)); other fcntl commands stay native
        Syscall("dup", 32, f, e, (0,)),
        Syscall("fcntl", 72, f, e, (0,), (1, (F_DUPFD, F_DUPFD_CLOEXEC))),
        # descriptor-table changes the proxy must see; the kernel performs them in the rank
        # (dup2/dup3 of an offloaded descriptor onto a low number: it leaves the offload)
        # (close of a standard stream: the next new descriptor may have to take its number)
        Syscall("close", 3, f, c, (0,), also_below=3), Syscall("dup2", 33, f, c, (0, 1)),
        Syscall("dup3", 292, f, c, (0, 1)),
        Syscall("close_range", 436, o, c), Syscall("execve", 59, o, c),
        Syscall("execveat", 322, o, c), Syscall("umask", 95, o, c),
        # identity changes: the task's process continues natively from then on
        Syscall("setuid", 105, i, c), Syscall("setgid", 106, i, c),
        Syscall("setreuid", 113, i, c), Syscall("setregid", 114, i, c),
        Syscall("setgroups", 116, i, c), Syscall("setresuid", 117, i, c),
        Syscall("setresgid", 119, i, c), Syscall("setfsuid", 122, i, c),
        Syscall("setfsgid", 123, i, c), Syscall("capset", 126, i, c),
        Syscall("chroot", 161, i, c), Syscall("pivot_root", 155, i, c),
        Syscall("unshare", 272, i, c), Syscall("setns", 308, i, c),
        Syscall("landlock_restrict_self", 446, i, c),
        # RLIMIT_FSIZE: the proxy's writes do not honour the caller's; RLIMIT_NOFILE: the
        # offload range must stay under it
        Syscall("setrlimit", 160, i, c, arg_in=(0, (RLIMIT_FSIZE, RLIMIT_NOFILE))),
        Syscall("prlimit64", 302, i, c, arg_in=(1, (RLIMIT_FSIZE, RLIMIT_NOFILE))),
        Syscall("prctl", 157, i, c,
                arg_in=(0, (PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT))),
        # run natively on the shared open file description (same effect as CONTINUE)
        Syscall("mmap", 9, n, c), Syscall("ioctl", 16, n, c),
        Syscall("flock", 73, n, c), Syscall("poll", 7, n, c), Syscall("ppoll", 271, n, c),
        Syscall("fchdir", 81, n, c), Syscall("fchmod", 91, n, c),
        Syscall("fchown", 93, n, c), Syscall("fstatfs", 138, n, c),
        Syscall("fadvise64", 221, n, c), Syscall("sync_file_range", 277, n, c),
        Syscall("fgetxattr", 193, n, c), Syscall("fsetxattr", 190, n, c),
    ]
    for row in rows:
        assert row.kind in KINDS and row.action in ACTIONS, row
        assert (row.kind == "fd") == bool(row.fd_args), row
        assert row.arg_in is None or row.kind in ("fd", "identity"), row
    return rows


@cache
def table(machine: str | None = None) -> dict[str, Syscall]:
    """The table for `machine` (default: this one), by name; other arches are refused."""
    machine = machine or platform.machine()
    if machine != "x86_64":
        raise FeatureUnavailable(
            f"syscall offload has no syscall table for {machine}: only x86_64 is supported")
    return {row.name: row for row in _rows()}


@cache
def by_number(machine: str | None = None) -> dict[int, Syscall]:
    """The table by syscall number, as the proxy sees notifications."""
    return {row.nr: row for row in table(machine).values()}


def audit_arch(machine: str | None = None) -> int:
    """AUDIT_ARCH value the filter checks in seccomp_data.arch."""
    table(machine)
    return AUDIT_ARCH_X86_64


def name_of(nr: int) -> str:
    """Name of syscall `nr` (for reports of offload records); unknown numbers as 'sys_<nr>'."""
    row = by_number().get(nr)
    return row.name if row else f"sys_{nr}"


def trapped() -> list[Syscall]:
    """The calls the filter hands to the proxy (every kind but native)."""
    return [row for row in table().values() if row.kind != "native"]
