"""Path calls in the proxy: resolving a rank's path, opening, and the *at family.

A relative path is resolved against the calling task's cwd (an O_PATH handle on
/proc/<tid>/cwd) or its dirfd (the proxy's duplicate of an offloaded one, or one fetched
with pidfd_getfd), so the kernel walks exactly the tree the rank would. The policy sees
the path as the rank named it, made absolute lexically. A file the proxy opens reaches the
rank through SECCOMP_IOCTL_NOTIF_ADDFD; the proxy keeps its descriptor, so both share one
open file description. FIFOs, sockets, devices and procfs files are left to the rank
(CONTINUE): opening them has effects, or they describe the opener.

Paths that name the caller: /proc/self, /proc/thread-self, /dev/fd/N, /dev/std*, and any
symlink into them, at any depth, would name the proxy here. Every walk the proxy makes is
an openat2 with RESOLVE_NO_MAGICLINKS (a /proc/<pid>/fd/N, cwd, root or exe link fails
with ELOOP) and ends with a check that the object is not on procfs; the other calls act
on an O_PATH descriptor of the object (stat, access, readlink, truncate) or of its parent
directory (mkdir, unlink, rmdir, rename) obtained that way, so what is checked is what is
used. A path call that fails here is CONTINUEd: the kernel repeats it in the caller, whose
own walk gives the caller's own answer (a path through /proc/self/fd/N fails here only
because the proxy is not the caller). A failed call has no effect, so repeating it is safe.

Descriptor numbers: a new descriptor gets the number POSIX gives when that number is a
standard stream's (0-2, free: close(1); dup(f) redirects output), else the lowest free
number of the offload range (>= fd_base); see `tracee.Proc.std_hole`. A descriptor below
the range is not trapped: the kernel serves it in the rank, on the same open file
description (correct, only not offloaded); its record carries `accounting.LEFT`. O_PATH
opens and files ADDFD refuses are CONTINUEd: the kernel opens them natively.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable

from mckmpi.linux import syscall as raw
from mckmpi.offload import accounting, syscalls
from mckmpi.offload.kernel_abi import STAT_SIZE, SYS, i32, i64
from mckmpi.offload.policy import absolute
from mckmpi.offload.seccomp import (
    ADDFD_FLAG_SETFD,
    IOCTL_NOTIF_ADDFD,
    NOTIF_ADDFD,
    pidfd_getfd,
)
from mckmpi.offload.tracee import CONTINUE, Gone, Proc, Tracee

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_REMOVEDIR = 0x200
AT_SYMLINK_NOFOLLOW = 0x100
O_TMPFILE = 0o20200000
STATX_SIZE = 256              # struct statx
#: the open flags F_SETFL can restore after the proxy opened with O_NONBLOCK
SETFL_KEEP = os.O_APPEND | os.O_DIRECT | os.O_NOATIME
PROC_SUPER_MAGIC = 0x9FA0
#: openat2's resolve flag: no procfs magic link (/proc/*/fd/N, cwd, root, exe) is followed
RESOLVE_NO_MAGICLINKS = 0x02
#: struct open_how { u64 flags; u64 mode; u64 resolve; }
OPEN_HOW = struct.Struct("<QQQ")


class PathCalls(Tracee):
    """Handlers of path calls and descriptor creation (a base of `loop.Emulator`)."""

    # --- path resolution -----------------------------------------------------------------

    def _at(self, proc: Proc, nid: int, tid: int, dirfd: int, addr: int,
            empty_ok: bool = False) -> tuple[int, bool, bytes] | int:
        """(directory handle, owned?, path) to run a path call, CONTINUE, or -errno.

        The handle is AT_FDCWD for absolute paths, the rank's cwd (via /proc/<tid>/cwd) or
        its dirfd (the proxy's duplicate, or one fetched with pidfd_getfd).
        """
        dirfd = i32(dirfd)
        if addr == 0 and empty_ok:
            path = b""
        else:
            got = self._cstring(proc, nid, addr)
            if isinstance(got, int):
                return got
            path = got
        if path.startswith(b"/"):
            if not self.policy.offloads(absolute("/", os.fsdecode(path))):
                return CONTINUE
            return AT_FDCWD, False, path
        if not path and empty_ok and dirfd != AT_FDCWD:
            # the call is about the descriptor itself: ours if offloaded, else native
            if not self.fd_base <= dirfd:
                return CONTINUE
            entry = self._entry(proc, dirfd)
            if entry is None or not entry[1]:
                return CONTINUE
            self._fd = dirfd
            return entry[0], False, path
        if dirfd == AT_FDCWD:
            handle = os.open(f"/proc/{tid}/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            owned = True
        elif dirfd >= self.fd_base and (entry := self._entry(proc, dirfd)) is not None:
            handle, owned = entry[0], False
        else:
            try:
                handle, owned = pidfd_getfd(proc.pidfd, dirfd & 0xFFFFFFFF), True
            except OSError as e:
                return -e.errno
        base = os.readlink(f"/proc/self/fd/{handle}")
        if not self.policy.offloads(absolute(base, os.fsdecode(path))):
            if owned:
                os.close(handle)
            return CONTINUE
        return handle, owned, path

    def _path_call(self, proc: Proc, nid: int, tid: int, dirfd: int, addr: int,
                   run: Callable[[int, bytes], int], empty_ok: bool = False) -> int:
        at = self._at(proc, nid, tid, dirfd, addr, empty_ok)
        if isinstance(at, int):
            return at
        handle, owned, path = at
        try:
            res = run(handle, path)
        finally:
            if owned:
                os.close(handle)
        return CONTINUE if res < 0 else res  # the caller's own walk gives the caller's errno

    def _walk(self, handle: int, path: bytes, follow: bool = True, directory: bool = False) -> int:
        """An O_PATH descriptor of what `path` names from `handle`, walked without procfs
        magic links and not on procfs; -1 if there is none (the call then CONTINUEs)."""
        flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        if directory:
            flags |= os.O_DIRECTORY
        OPEN_HOW.pack_into(self._openhow, 0, flags, 0, RESOLVE_NO_MAGICLINKS)
        fd = raw(SYS["openat2"], handle, path, self._openhow_addr, OPEN_HOW.size)
        if fd < 0:
            return -1
        if self._on_procfs(fd):
            os.close(fd)
            return -1
        return fd

    def _on_procfs(self, fd: int) -> bool:
        if raw(SYS["fstatfs"], fd, self._statfs_addr) < 0:
            return True  # unknown: let the kernel decide in the caller
        return struct.unpack_from("<q", self._statfs)[0] == PROC_SUPER_MAGIC

    def _on_object(self, handle: int, path: bytes, follow: bool,
                   call: Callable[[int], int]) -> int:
        """call(O_PATH descriptor of the object `path` names), or CONTINUE."""
        if not path:
            return call(handle)  # AT_EMPTY_PATH on a descriptor the proxy already holds
        fd = self._walk(handle, path, follow)
        if fd < 0:
            return CONTINUE
        try:
            return call(fd)
        finally:
            os.close(fd)

    def _in_parent(self, handle: int, path: bytes, call: Callable[[int, bytes], int]) -> int:
        """call(O_PATH descriptor of the directory holding the last name, that name), or
        CONTINUE (also for a last name "." or "..": the kernel knows its own errors)."""
        stripped = path.rstrip(b"/")
        cut = stripped.rfind(b"/")
        name = path[cut + 1:]
        if name.rstrip(b"/") in (b"", b".", b".."):
            return CONTINUE
        if cut < 0:
            parent = self._walk(handle, b".", True, True)
        else:
            parent = self._walk(handle, stripped[:cut] or b"/", True, True)
        if parent < 0:
            return CONTINUE
        try:
            return call(parent, name)
        finally:
            os.close(parent)

    # --- opening -------------------------------------------------------------------------

    def _open(self, nid: int, tid: int, dirfd: int, addr: int, flags: int, mode: int,
              how: bytes | None = None) -> int:
        proc = self._proc(nid, tid)
        flags = i32(flags)

        def run(handle: int, path: bytes) -> int:
            if flags & os.O_PATH:
                return CONTINUE  # ADDFD cannot install O_PATH files; the kernel opens it
            if flags & (os.O_CREAT | O_TMPFILE):
                self._umask_for(proc)
            if _special(path, handle, flags):
                return CONTINUE  # opening a FIFO or device has effects; only the rank may
            # O_NONBLOCK: should the file become special meanwhile, or carry a lease, the
            # proxy still never blocks in open. Never through a procfs magic link.
            extra = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            if how is None:
                OPEN_HOW.pack_into(self._openhow, 0, (flags | extra) & 0xFFFFFFFF,
                                   mode & 0o7777, RESOLVE_NO_MAGICLINKS)
                fd = raw(SYS["openat2"], handle, path, self._openhow_addr, OPEN_HOW.size)
            else:  # the caller's own open_how, extended: keep its size and other fields
                local = bytearray(how)
                _, mode_, resolve = OPEN_HOW.unpack_from(local)
                OPEN_HOW.pack_into(local, 0, (flags | extra) & 0xFFFFFFFF, mode_,
                                   resolve | RESOLVE_NO_MAGICLINKS)
                buf = ctypes.create_string_buffer(bytes(local), len(local))
                fd = raw(SYS["openat2"], handle, path, ctypes.addressof(buf), len(local))
            if fd < 0:
                return CONTINUE  # also a writer-less FIFO or a lease: the rank waits natively
            res = self._opened(proc, nid, fd, flags)
            if res == CONTINUE and flags & os.O_CREAT and flags & os.O_EXCL:
                raw(SYS["unlinkat"], handle, path, 0)  # the repeat must find the name free
            return res

        return self._path_call(proc, nid, tid, dirfd, addr, run)

    def _opened(self, proc: Proc, nid: int, fd: int, flags: int) -> int:
        """Hand a file the proxy just opened to the rank, unless it must be opened natively."""
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) or self._on_procfs(fd):
                os.close(fd)  # special files and procfs behave per opener: open natively
                return CONTINUE
            if not flags & (os.O_NONBLOCK | os.O_PATH):  # undo the proxy's O_NONBLOCK
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & SETFL_KEEP)
        except BaseException:
            os.close(fd)
            raise
        return self._install(proc, nid, fd, 0, bool(flags & os.O_CLOEXEC))

    def _install(self, proc: Proc, nid: int, fd: int, minimum: int, cloexec: bool) -> int:
        """Give the rank file `fd` at a free standard stream number POSIX would give (see
        `Proc.std_hole`), else at the lowest free one >= max(minimum, fd_base), keeping `fd`.
        If the kernel refuses it (O_PATH, RLIMIT_NOFILE), the call is CONTINUEd."""
        try:
            hole = proc.std_hole(minimum)
            if hole is None:
                with self.lock:
                    slot = proc.free_slot(max(minimum, self.fd_base))
        except BaseException:
            os.close(fd)
            raise
        cloexec = os.O_CLOEXEC if cloexec else 0
        if hole is None:
            addfd = NOTIF_ADDFD.pack(nid, ADDFD_FLAG_SETFD, fd, slot, cloexec)
        elif minimum == 0:  # the lowest free number: the kernel picks it, atomically
            addfd = NOTIF_ADDFD.pack(nid, 0, fd, 0, cloexec)
        else:
            addfd = NOTIF_ADDFD.pack(nid, ADDFD_FLAG_SETFD, fd, hole, cloexec)
        try:  # installed now, answered (with the number) by the loop after the record is made
            got = fcntl.ioctl(self.listener, IOCTL_NOTIF_ADDFD, bytearray(addfd))
        except OSError as e:
            os.close(fd)
            if hole is None:
                with self.lock:
                    proc.release(slot)
            if e.errno in (errno.ENOENT, errno.EINTR):
                raise Gone(f"notification {nid}") from None
            return CONTINUE
        if hole is not None:
            os.close(fd)  # below the range the kernel serves it: the proxy keeps no copy
            self._how |= accounting.LEFT
            self._fd = got
            return got
        with self.lock:
            proc.fds[slot] = (fd, True)
        self._fd = slot
        return slot

    def _sys_open(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._open(nid, tid, AT_FDCWD, a0, a1, a2)

    def _sys_openat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._open(nid, tid, a0, a1, a2, a3)

    def _sys_creat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._open(nid, tid, AT_FDCWD, a0, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, a1)

    def _sys_openat2(self, nid, tid, a0, a1, a2, a3, a4, a5):
        proc = self._proc(nid, tid)
        size = a3
        if size < 24:
            return -errno.EINVAL
        if size > 4096:
            return -errno.E2BIG
        view = self._peek(proc, nid, a2, size)
        if view is None or len(view) < size:
            return -errno.EFAULT
        how = bytes(view)
        flags, mode = struct.unpack_from("<QQ", how)
        if flags >> 32:  # the kernel rejects unknown upper flag bits
            return -errno.EINVAL
        return self._open(nid, tid, a0, a1, flags, mode, how)

    def _dup(self, nid: int, tid: int, fd: int, minimum: int, cloexec: bool) -> int:
        proc = self.tids.get(tid) or self._proc(nid, tid)
        fd &= 0xFFFFFFFF
        entry = self._entry(proc, fd)
        if entry is None or not entry[1]:
            return CONTINUE
        self._fd = fd
        return self._install(proc, nid, os.dup(entry[0]), minimum, cloexec)

    def _sys_dup(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._dup(nid, tid, a0, 0, False)

    def _sys_fcntl(self, nid, tid, a0, a1, a2, a3, a4, a5):
        # the filter only traps F_DUPFD and F_DUPFD_CLOEXEC
        minimum = i32(a2)
        if minimum < 0:
            return -errno.EINVAL
        return self._dup(nid, tid, a0, minimum, (a1 & 0xFFFFFFFF) == syscalls.F_DUPFD_CLOEXEC)

    # --- path calls ----------------------------------------------------------------------

    def _stat_common(self, nid, tid, dirfd, addr, flags, out, size, call) -> int:
        proc = self._proc(nid, tid)
        flags = i32(flags)

        def on(fd: int) -> int:
            r = call(fd, b"", flags | AT_EMPTY_PATH)
            if r < 0:
                return r
            return r if self._poke(proc, nid, out, self._laddr, size) else -errno.EFAULT

        def run(handle: int, path: bytes) -> int:
            return self._on_object(handle, path, not flags & AT_SYMLINK_NOFOLLOW, on)

        return self._path_call(proc, nid, tid, dirfd, addr, run, bool(flags & AT_EMPTY_PATH))

    def _newfstatat(self, handle: int, path: bytes, flags: int) -> int:
        return raw(SYS["newfstatat"], handle, path, self._laddr, flags)

    def _sys_stat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._stat_common(nid, tid, AT_FDCWD, a0, 0, a1, STAT_SIZE, self._newfstatat)

    def _sys_lstat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._stat_common(nid, tid, AT_FDCWD, a0, AT_SYMLINK_NOFOLLOW, a1, STAT_SIZE,
                                 self._newfstatat)

    def _sys_newfstatat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._stat_common(nid, tid, a0, a1, a3, a2, STAT_SIZE, self._newfstatat)

    def _sys_statx(self, nid, tid, a0, a1, a2, a3, a4, a5):
        mask = a3 & 0xFFFFFFFF
        return self._stat_common(
            nid, tid, a0, a1, a2, a4, STATX_SIZE,
            lambda h, p, f: raw(SYS["statx"], h, p, f, mask, self._laddr))

    def _simple(self, nid, tid, dirfd, addr, call, empty_ok=False, creates=False) -> int:
        proc = self._proc(nid, tid)
        if creates:
            self._umask_for(proc)
        return self._path_call(proc, nid, tid, dirfd, addr, call, empty_ok)

    def _access(self, nid, tid, dirfd, addr, mode, flags) -> int:
        flags = i32(flags)
        access = (lambda fd: raw(SYS["faccessat2"], fd, b"", mode, flags | AT_EMPTY_PATH))
        return self._simple(
            nid, tid, dirfd, addr,
            lambda h, p: self._on_object(h, p, not flags & AT_SYMLINK_NOFOLLOW, access),
            empty_ok=bool(flags & AT_EMPTY_PATH))

    def _sys_access(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._access(nid, tid, AT_FDCWD, a0, a1, 0)

    def _sys_faccessat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._access(nid, tid, a0, a1, a2, 0)

    def _sys_faccessat2(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._access(nid, tid, a0, a1, a2, a3)

    def _in_parent_call(self, nid, tid, dirfd, addr, nr, *args, creates=False) -> int:
        """A call on (directory, last name) -- unlinkat, mkdirat -- made in the parent."""
        return self._simple(
            nid, tid, dirfd, addr,
            lambda h, p: self._in_parent(h, p, lambda d, name: raw(nr, d, name, *args)),
            creates=creates)

    def _sys_unlink(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._in_parent_call(nid, tid, AT_FDCWD, a0, SYS["unlinkat"], 0)

    def _sys_rmdir(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._in_parent_call(nid, tid, AT_FDCWD, a0, SYS["unlinkat"], AT_REMOVEDIR)

    def _sys_unlinkat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._in_parent_call(nid, tid, a0, a1, SYS["unlinkat"], i32(a2))

    def _sys_mkdir(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._in_parent_call(nid, tid, AT_FDCWD, a0, SYS["mkdirat"], a1, creates=True)

    def _sys_mkdirat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._in_parent_call(nid, tid, a0, a1, SYS["mkdirat"], a2, creates=True)

    def _rename(self, nid, tid, olddir, oldaddr, newdir, newaddr, flags) -> int:
        proc = self._proc(nid, tid)
        first = self._at(proc, nid, tid, olddir, oldaddr)
        if isinstance(first, int):
            return CONTINUE if first < 0 else first
        flags = i32(flags)

        def run(h: int, p: bytes) -> int:
            return self._in_parent(first[0], first[2], lambda od, on: self._in_parent(
                h, p, lambda nd, nn: raw(SYS["renameat2"], od, on, nd, nn, flags)))

        try:
            return self._path_call(proc, nid, tid, newdir, newaddr, run)
        finally:
            if first[1]:
                os.close(first[0])

    def _sys_rename(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._rename(nid, tid, AT_FDCWD, a0, AT_FDCWD, a1, 0)

    def _sys_renameat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._rename(nid, tid, a0, a1, a2, a3, 0)

    def _sys_renameat2(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._rename(nid, tid, a0, a1, a2, a3, a4)

    def _readlink(self, nid, tid, dirfd, addr, buf, bufsiz) -> int:
        proc = self._proc(nid, tid)
        bufsiz = i32(bufsiz)
        size = min(bufsiz, len(self._local)) if bufsiz > 0 else bufsiz

        def on(fd: int) -> int:
            n = raw(SYS["readlinkat"], fd, b"", self._laddr, size)
            if n < 0:
                return n
            return n if self._poke(proc, nid, buf, self._laddr, n) else -errno.EFAULT

        def run(handle: int, path: bytes) -> int:
            return self._on_object(handle, path, False, on)

        return self._path_call(proc, nid, tid, dirfd, addr, run, empty_ok=True)

    def _sys_readlink(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._readlink(nid, tid, AT_FDCWD, a0, a1, a2)

    def _sys_readlinkat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._readlink(nid, tid, a0, a1, a2, a3)

    def _sys_truncate(self, nid, tid, a0, a1, a2, a3, a4, a5):
        def on(fd: int) -> int:  # the proxy's own magic link to the very object it checked
            return raw(SYS["truncate"], f"/proc/self/fd/{fd}".encode(), i64(a1))

        return self._simple(nid, tid, AT_FDCWD, a0, lambda h, p: self._on_object(h, p, True, on))


def _special(path: bytes, handle: int, flags: int) -> bool:
    """Whether `path` names an existing FIFO, socket or device (O_NOFOLLOW honoured)."""
    try:
        st = os.stat(path, dir_fd=None if handle == AT_FDCWD else handle,
                     follow_symlinks=not flags & os.O_NOFOLLOW)
    except OSError:
        return False  # missing or unreachable: the open itself gives the right error
    return not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode))
