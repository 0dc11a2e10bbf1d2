"""Path calls in the proxy: resolving a rank's path, opening, and the *at family.

A relative path is resolved against the calling task's cwd (an O_PATH handle on
/proc/<tid>/cwd) or its dirfd (the proxy's duplicate of an offloaded one, or one fetched
with pidfd_getfd), so the kernel walks exactly the tree the rank would. The policy sees
the path as the rank named it, made absolute lexically. A file the proxy opens reaches the
rank through SECCOMP_IOCTL_NOTIF_ADDFD at the lowest free number >= fd_base; the proxy
keeps its descriptor, so both share one open file description. FIFOs, sockets, devices
and procfs files are left to the rank (CONTINUE): opening them has effects, or they
describe the opener.
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
from mckmpi.offload import syscalls
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
PROC_DEV = os.stat("/proc").st_dev


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
            return run(handle, path)
        finally:
            if owned:
                os.close(handle)

    # --- opening -------------------------------------------------------------------------

    def _open(self, nid: int, tid: int, dirfd: int, addr: int, flags: int, mode: int,
              how: bytes | None = None) -> int:
        proc = self._proc(nid, tid)
        flags = i32(flags)

        def run(handle: int, path: bytes) -> int:
            if flags & (os.O_CREAT | O_TMPFILE):
                self._umask_for(proc)
            if _special(path, handle, flags):
                return CONTINUE  # opening a FIFO or device has effects; only the rank may
            # O_NONBLOCK: should the file become special meanwhile, or carry a lease, the
            # proxy still never blocks in open
            extra = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            if how is None:
                try:
                    fd = os.open(path, flags | extra, mode & 0o7777,
                                 dir_fd=None if handle == AT_FDCWD else handle)
                except OSError as e:
                    fd = -e.errno
            else:
                local = bytearray(how)
                struct.pack_into("<Q", local, 0, (flags | extra) & 0xFFFFFFFF)
                buf = ctypes.create_string_buffer(bytes(local), len(local))
                fd = raw(SYS["openat2"], handle, path, ctypes.addressof(buf), len(local))
            if fd in (-errno.ENXIO, -errno.EAGAIN) and not flags & os.O_NONBLOCK:
                return CONTINUE  # a writer-less FIFO or a lease: the rank waits natively
            if fd < 0:
                return fd
            return self._opened(proc, nid, fd, flags)

        return self._path_call(proc, nid, tid, dirfd, addr, run)

    def _opened(self, proc: Proc, nid: int, fd: int, flags: int) -> int:
        """Hand a file the proxy just opened to the rank, unless it must be opened natively."""
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) or st.st_dev == PROC_DEV:
                os.close(fd)  # special files and procfs behave per opener: open natively
                return CONTINUE
            if not flags & (os.O_NONBLOCK | os.O_PATH):  # undo the proxy's O_NONBLOCK
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & SETFL_KEEP)
        except BaseException:
            os.close(fd)
            raise
        return self._install(proc, nid, fd, self.fd_base, bool(flags & os.O_CLOEXEC))

    def _install(self, proc: Proc, nid: int, fd: int, minimum: int, cloexec: bool) -> int:
        """Give the rank file `fd` at the lowest free number >= minimum (ADDFD), keep `fd`."""
        try:
            with self.lock:
                slot = proc.free_slot(minimum)
        except BaseException:
            os.close(fd)
            raise
        cloexec = os.O_CLOEXEC if cloexec else 0
        try:  # installed now, answered (with `slot`) by the loop after the record is made
            fcntl.ioctl(self.listener, IOCTL_NOTIF_ADDFD, bytearray(NOTIF_ADDFD.pack(
                nid, ADDFD_FLAG_SETFD, fd, slot, cloexec)))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOENT, errno.EINTR):
                raise Gone(f"notification {nid}") from None
            return -errno.EMFILE if e.errno in (errno.EBADF, errno.EMFILE) else -e.errno
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
        return self._install(proc, nid, os.dup(entry[0]), max(minimum, self.fd_base), cloexec)

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

        def run(handle: int, path: bytes) -> int:
            r = call(handle, path, flags)
            if r < 0:
                return r
            return r if self._poke(proc, nid, out, self._laddr, size) else -errno.EFAULT

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

    def _sys_access(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._simple(nid, tid, AT_FDCWD, a0,
                            lambda h, p: raw(SYS["faccessat"], h, p, a1))

    def _sys_faccessat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._simple(nid, tid, a0, a1, lambda h, p: raw(SYS["faccessat"], h, p, a2))

    def _sys_faccessat2(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._simple(nid, tid, a0, a1, lambda h, p: raw(SYS["faccessat2"], h, p, a2, a3),
                            empty_ok=bool(i32(a3) & AT_EMPTY_PATH))

    def _sys_unlink(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._simple(nid, tid, AT_FDCWD, a0, lambda h, p: raw(SYS["unlinkat"], h, p, 0))

    def _sys_rmdir(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._simple(nid, tid, AT_FDCWD, a0,
                            lambda h, p: raw(SYS["unlinkat"], h, p, AT_REMOVEDIR))

    def _sys_unlinkat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._simple(nid, tid, a0, a1, lambda h, p: raw(SYS["unlinkat"], h, p, a2))

    def _sys_mkdir(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._simple(nid, tid, AT_FDCWD, a0, lambda h, p: raw(SYS["mkdirat"], h, p, a1),
                            creates=True)

    def _sys_mkdirat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._simple(nid, tid, a0, a1, lambda h, p: raw(SYS["mkdirat"], h, p, a2),
                            creates=True)

    def _rename(self, nid, tid, olddir, oldaddr, newdir, newaddr, flags) -> int:
        proc = self._proc(nid, tid)
        first = self._at(proc, nid, tid, olddir, oldaddr)
        if isinstance(first, int):
            return first
        try:
            return self._path_call(
                proc, nid, tid, newdir, newaddr,
                lambda h, p: raw(SYS["renameat2"], first[0], first[2], h, p, flags))
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

        def run(handle: int, path: bytes) -> int:
            n = raw(SYS["readlinkat"], handle, path, self._laddr, size)
            if n < 0:
                return n
            return n if self._poke(proc, nid, buf, self._laddr, n) else -errno.EFAULT

        return self._path_call(proc, nid, tid, dirfd, addr, run, empty_ok=True)

    def _sys_readlink(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._readlink(nid, tid, AT_FDCWD, a0, a1, a2)

    def _sys_readlinkat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._readlink(nid, tid, a0, a1, a2, a3)

    def _sys_truncate(self, nid, tid, a0, a1, a2, a3, a4, a5):
        def run(handle: int, path: bytes) -> int:
            if handle != AT_FDCWD:
                os.fchdir(handle)  # this thread has its own cwd (unshare(CLONE_FS))
            os.truncate(path, i64(a1))
            return 0

        return self._simple(nid, tid, AT_FDCWD, a0, run)


def _special(path: bytes, handle: int, flags: int) -> bool:
    """Whether `path` names an existing FIFO, socket or device (O_NOFOLLOW honoured)."""
    try:
        st = os.stat(path, dir_fd=None if handle == AT_FDCWD else handle,
                     follow_symlinks=not flags & os.O_NOFOLLOW)
    except OSError:
        return False  # missing or unreachable: the open itself gives the right error
    return not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode))
