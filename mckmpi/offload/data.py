"""Data and descriptor-table calls in the proxy, on descriptors it emulates.

Data moves straight through the proxy's mapping of the rank's arena when the buffer lies in
it (the kernel copies once, as natively), otherwise through a bounce buffer: read from
/proc/<pid>/mem (one preadv, then SECCOMP_IOCTL_NOTIF_ID_VALID) or written with
process_vm_writev. close, dup2/dup3, close_range, execve and umask only update the proxy's
view of the rank and are answered with CONTINUE.
"""

from __future__ import annotations

import errno
import os
import struct

from mckmpi.linux import syscall as raw
from mckmpi.offload import accounting, syscalls
from mckmpi.offload.kernel_abi import MAX_RW, STAT_SIZE, SYS, TASK_SIZE, i32, i64
from mckmpi.offload.tracee import BOUNCE, CONTINUE, Proc, Tracee

UIO_MAXIOV = 1024
CLOSE_RANGE_CLOEXEC = 4
q = struct.Struct("<q")


class DataCalls(Tracee):
    """Handlers of data and bookkeeping calls (a base of `loop.Emulator`)."""

    # --- data calls ----------------------------------------------------------------------

    def _file(self, nid: int, tid: int, fd: int) -> tuple[Proc, int] | None:
        """(process, proxy descriptor) for an offloaded fd we emulate, else None."""
        proc = self.tids.get(tid) or self._proc(nid, tid)
        fd &= 0xFFFFFFFF
        entry = self._entry(proc, fd)
        if entry is None or not entry[1]:
            return None
        self._fd = fd
        return proc, entry[0]

    def _write_from(self, proc: Proc, nid: int, pfd: int, addr: int, count: int,
                    off: int | None) -> int:
        self._moved = True
        arena = self.arena
        if arena is not None and arena.address <= addr and addr + count <= arena.end:
            self._how |= accounting.ZERO_COPY
            a = addr - arena.address
            view = arena.view[a:a + min(count, MAX_RW)]
            return os.write(pfd, view) if off is None else os.pwrite(pfd, view, off)
        count = min(count, MAX_RW)
        if count == 0:
            return os.write(pfd, b"") if off is None else os.pwrite(pfd, b"", off)
        done = 0
        while done < count:
            chunk = min(count - done, BOUNCE)
            data = self._peek(proc, nid, addr + done, chunk)
            if data is None:
                if done:
                    break
                return self._mode_error(pfd, off, write=True) or -errno.EFAULT
            n = os.write(pfd, data) if off is None else os.pwrite(pfd, data, off + done)
            done += n
            if n < len(data) or len(data) < chunk:
                break
        return done

    def _read_to(self, proc: Proc, nid: int, pfd: int, addr: int, count: int,
                 off: int | None) -> int:
        self._moved = True
        count = min(count, MAX_RW)
        if count == 0:
            return len(os.read(pfd, 0) if off is None else os.pread(pfd, 0, off))
        arena = self.arena
        if arena is not None and arena.address <= addr and addr + count <= arena.end:
            self._how |= accounting.ZERO_COPY
            a = addr - arena.address
            view = arena.view[a:a + count]
            return os.readv(pfd, [view]) if off is None else os.preadv(pfd, [view], off)
        if addr + count > TASK_SIZE:
            return self._mode_error(pfd, off, write=False) or -errno.EFAULT
        done = 0
        while done < count:
            chunk = min(count - done, BOUNCE)
            view = self._bview[:chunk]
            n = os.readv(pfd, [view]) if off is None else os.preadv(pfd, [view], off + done)
            if n == 0:
                break
            put = n if self._poke(proc, nid, addr + done, self._baddr, n) else 0
            if put < n:
                if off is None:  # give back what could not be delivered
                    os.lseek(pfd, -n, os.SEEK_CUR)
                return done or -errno.EFAULT
            done += n
            if n < chunk:
                break
        return done

    @staticmethod
    def _mode_error(pfd: int, off: int | None, write: bool) -> int:
        """The error the kernel checks before touching the buffer (EBADF, EINVAL...), or 0."""
        try:
            if write:
                os.write(pfd, b"") if off is None else os.pwrite(pfd, b"", off)
            else:
                os.read(pfd, 0) if off is None else os.pread(pfd, 0, off)
        except OSError as e:
            return -e.errno
        return 0

    # (the commonest call, a small write, is answered inline by `loop.Emulator.serve`)

    def _sys_read(self, nid, tid, a0, a1, a2, a3, a4, a5):
        f = self._file(nid, tid, a0)
        return CONTINUE if f is None else self._read_to(f[0], nid, f[1], a1, a2, None)

    def _sys_write(self, nid, tid, a0, a1, a2, a3, a4, a5):
        f = self._file(nid, tid, a0)
        return CONTINUE if f is None else self._write_from(f[0], nid, f[1], a1, a2, None)

    def _sys_pread64(self, nid, tid, a0, a1, a2, a3, a4, a5):
        f = self._file(nid, tid, a0)
        if f is None:
            return CONTINUE
        if a3 >> 63:  # a negative position: checked first by the kernel, too
            return -errno.EINVAL
        return self._read_to(f[0], nid, f[1], a1, a2, a3)

    def _sys_pwrite64(self, nid, tid, a0, a1, a2, a3, a4, a5):
        f = self._file(nid, tid, a0)
        if f is None:
            return CONTINUE
        if a3 >> 63:
            return -errno.EINVAL
        return self._write_from(f[0], nid, f[1], a1, a2, a3)

    def _vector(self, nid, tid, fd, iov, vlen, off, write: bool) -> int:
        f = self._file(nid, tid, fd)
        if f is None:
            return CONTINUE
        proc, pfd = f
        self._moved = True
        if off is not None and off < 0:
            return -errno.EINVAL
        if vlen > UIO_MAXIOV:
            return self._mode_error(pfd, off, write) or -errno.EINVAL
        if vlen == 0:
            if write:
                return os.writev(pfd, []) if off is None else os.pwritev(pfd, [], off)
            return os.readv(pfd, []) if off is None else os.preadv(pfd, [], off)
        raw = self._peek(proc, nid, iov, 16 * vlen)
        if raw is None or len(raw) < 16 * vlen:
            return self._mode_error(pfd, off, write) or -errno.EFAULT
        segs = []
        total = 0
        for base, length in struct.iter_unpack("<QQ", raw):
            if length >> 63:
                return self._mode_error(pfd, off, write) or -errno.EINVAL
            length = min(length, MAX_RW - total)
            if base + length > TASK_SIZE:
                return self._mode_error(pfd, off, write) or -errno.EFAULT
            segs.append((base, length))
            total += length
        arena = self.arena
        if arena is not None and all(arena.address <= b and b + n <= arena.end for b, n in segs):
            self._how |= accounting.ZERO_COPY
            views = [arena.view[b - arena.address:b - arena.address + n] for b, n in segs]
            if write:
                return os.writev(pfd, views) if off is None else os.pwritev(pfd, views, off)
            return os.readv(pfd, views) if off is None else os.preadv(pfd, views, off)
        done = 0
        for base, length in segs:  # segment by segment through the bounce buffer
            pos = None if off is None else off + done
            n = (self._write_from if write else self._read_to)(proc, nid, pfd, base, length, pos)
            if n < 0:
                return done or n
            done += n
            if n < length:
                break
        return done

    def _sys_readv(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._vector(nid, tid, a0, a1, a2, None, write=False)

    def _sys_writev(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._vector(nid, tid, a0, a1, a2, None, write=True)

    def _sys_preadv(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._vector(nid, tid, a0, a1, a2, i64(a3), write=False)

    def _sys_pwritev(self, nid, tid, a0, a1, a2, a3, a4, a5):
        return self._vector(nid, tid, a0, a1, a2, i64(a3), write=True)

    def _sys_preadv2(self, nid, tid, a0, a1, a2, a3, a4, a5):
        if a5 & 0xFFFFFFFF:
            return CONTINUE  # RWF_* flags: let the kernel honour them
        pos = i64(a3)
        return self._vector(nid, tid, a0, a1, a2, None if pos == -1 else pos, write=False)

    def _sys_pwritev2(self, nid, tid, a0, a1, a2, a3, a4, a5):
        if a5 & 0xFFFFFFFF:
            return CONTINUE
        pos = i64(a3)
        return self._vector(nid, tid, a0, a1, a2, None if pos == -1 else pos, write=True)

    def _sys_lseek(self, nid, tid, a0, a1, a2, a3, a4, a5):
        f = self._file(nid, tid, a0)
        if f is None:
            return CONTINUE
        whence = a2 & 0xFFFFFFFF
        return os.lseek(f[1], i64(a1), min(whence, 0x7FFFFFFF))

    def _sys_fsync(self, nid, tid, a0, a1, a2, a3, a4, a5):
        f = self._file(nid, tid, a0)
        if f is None:
            return CONTINUE
        os.fsync(f[1])
        return 0

    def _sys_fdatasync(self, nid, tid, a0, a1, a2, a3, a4, a5):
        f = self._file(nid, tid, a0)
        if f is None:
            return CONTINUE
        os.fdatasync(f[1])
        return 0

    def _sys_ftruncate(self, nid, tid, a0, a1, a2, a3, a4, a5):
        f = self._file(nid, tid, a0)
        if f is None:
            return CONTINUE
        os.ftruncate(f[1], i64(a1))
        return 0

    def _sys_fallocate(self, nid, tid, a0, a1, a2, a3, a4, a5):
        f = self._file(nid, tid, a0)
        return CONTINUE if f is None else raw(SYS["fallocate"], f[1], i32(a1), i64(a2), i64(a3))

    def _sys_fstat(self, nid, tid, a0, a1, a2, a3, a4, a5):
        f = self._file(nid, tid, a0)
        if f is None:
            return CONTINUE
        r = raw(SYS["fstat"], f[1], self._laddr)
        if r < 0:
            return r
        return 0 if self._poke(f[0], nid, a1, self._laddr, STAT_SIZE) else -errno.EFAULT

    def _sys_getdents64(self, nid, tid, a0, a1, a2, a3, a4, a5):
        f = self._file(nid, tid, a0)
        if f is None:
            return CONTINUE
        proc, pfd = f
        count = a2 & 0xFFFFFFFF
        before = os.lseek(pfd, 0, os.SEEK_CUR)
        n = raw(SYS["getdents64"], pfd, self._laddr, min(count, len(self._local)))
        if n <= 0:
            return n
        if self._poke(proc, nid, a1, self._laddr, n):
            return n
        os.lseek(pfd, before, os.SEEK_SET)  # the kernel would not have moved on
        return -errno.EFAULT

    def _copy_args(self, nid, tid, fds: tuple[int, int]) -> tuple[Proc, list[int], list[int]] | None:
        """Proxy descriptors for a file-to-file copy; None to run it natively."""
        proc = self.tids.get(tid) or self._proc(nid, tid)
        pfds, owned = [], []
        for fd in fds:
            fd &= 0xFFFFFFFF
            if self.fd_base <= fd < syscalls.FD_LIMIT:
                entry = self._entry(proc, fd)
            else:
                entry = proc.fetch(fd)
                if entry is not None:
                    owned.append(entry[0])
            if entry is None or not entry[1]:
                for o in owned:
                    os.close(o)
                return None
            pfds.append(entry[0])
        self._fd = fds[0] & 0xFFFFFFFF
        return proc, pfds, owned

    def _offset_in(self, proc: Proc, nid: int, addr: int) -> int | None:
        data = self._peek(proc, nid, addr, 8)
        return None if data is None or len(data) < 8 else q.unpack(data)[0]

    def _offset_out(self, proc: Proc, nid: int, addr: int, value: int) -> bool:
        q.pack_into(self._local, 0, value)
        return self._poke(proc, nid, addr, self._laddr, 8)

    def _sys_copy_file_range(self, nid, tid, a0, a1, a2, a3, a4, a5):
        args = self._copy_args(nid, tid, (a0, a2))
        if args is None:
            return CONTINUE
        proc, (src, dst), owned = args
        self._moved = True
        try:
            if a5:
                return -errno.EINVAL
            offs = []
            for ptr in (a1, a3):
                if ptr:
                    off = self._offset_in(proc, nid, ptr)
                    if off is None:
                        return -errno.EFAULT
                    offs.append(off)
                else:
                    offs.append(None)
            n = os.copy_file_range(src, dst, min(a4, (1 << 63) - 1), offs[0], offs[1])
            for ptr, off in zip((a1, a3), offs):
                if ptr and n > 0 and not self._offset_out(proc, nid, ptr, off + n):
                    return -errno.EFAULT
            return n
        finally:
            for o in owned:
                os.close(o)

    def _sys_sendfile(self, nid, tid, a0, a1, a2, a3, a4, a5):
        args = self._copy_args(nid, tid, (a0, a1))
        if args is None:
            return CONTINUE
        proc, (out, src), owned = args
        self._moved = True
        try:
            off = None
            if a2:
                off = self._offset_in(proc, nid, a2)
                if off is None:
                    return -errno.EFAULT
            n = os.sendfile(out, src, off, min(a3, MAX_RW))
            if a2 and n > 0 and not self._offset_out(proc, nid, a2, off + n):
                return -errno.EFAULT
            return n
        finally:
            for o in owned:
                os.close(o)

    # --- bookkeeping calls (answered with CONTINUE) --------------------------------------

    def _forget(self, nid: int, tid: int, fds: range) -> int:
        proc = self.tids.get(tid) or self._proc(nid, tid)
        with self.lock:
            if len(fds) > len(proc.fds):
                for fd in [f for f in proc.fds if f in fds]:
                    proc.forget(fd)
            else:
                for fd in fds:
                    proc.forget(fd)
        return CONTINUE

    def _sys_close(self, nid, tid, a0, a1, a2, a3, a4, a5):
        self._fd = a0 & 0xFFFFFFFF
        if self._fd < 3:  # a standard stream: the next new descriptor may need its number
            (self.tids.get(tid) or self._proc(nid, tid)).std_gap = True
            return CONTINUE
        return self._forget(nid, tid, range(self._fd, self._fd + 1))

    def _sys_dup2(self, nid, tid, a0, a1, a2, a3, a4, a5):
        old, self._fd = a0 & 0xFFFFFFFF, a1 & 0xFFFFFFFF
        if self._fd < self.fd_base <= old < syscalls.FD_LIMIT:
            self._how |= accounting.LEFT  # the copy at a low number is served by the kernel
        return self._forget(nid, tid, range(self._fd, self._fd + 1))

    _sys_dup3 = _sys_dup2

    def _sys_close_range(self, nid, tid, a0, a1, a2, a3, a4, a5):
        first, last = a0 & 0xFFFFFFFF, a1 & 0xFFFFFFFF
        if first < 3:  # standard streams close now, or at the next exec
            (self.tids.get(tid) or self._proc(nid, tid)).std_gap = True
        if a2 & CLOSE_RANGE_CLOEXEC or last < self.fd_base or first > last:
            return CONTINUE  # nothing offloaded closes now (exec will drop the cache)
        return self._forget(nid, tid, range(max(first, self.fd_base), last + 1))

    def _sys_execve(self, nid, tid, a0, a1, a2, a3, a4, a5):
        proc = self.tids.get(tid) or self._proc(nid, tid)
        with self.lock:
            proc.forget_all()  # close-on-exec descriptors vanish; refetch lazily
        return CONTINUE

    _sys_execveat = _sys_execve

    def _sys_umask(self, nid, tid, a0, a1, a2, a3, a4, a5):
        proc = self.tids.get(tid) or self._proc(nid, tid)
        proc.umask = a0 & 0o777
        return CONTINUE
