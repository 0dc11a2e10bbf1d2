/*
 * mckmpi.offload._fastpath -- the proxy's per-call hot path in compiled code.
 *
 * serve(emulator, buf, consts) receives notifications on one rank's seccomp listener
 * and answers the plain hot calls itself: read, write, pread64 and pwrite64 on a
 * descriptor the rank's process already has in the proxy's cache as emulated, with a
 * non-negative offset and a count that is not zero, the buffer in the arena (zero copy)
 * or in ordinary memory that reads whole (one bounce copy); and the vectored calls
 * (see vector_call) with every segment in the arena, or writes gathered in one copy. Every system call (receive,
 * the memory copy, the validation, the I/O, the answer) runs without the GIL, so serving
 * threads on several Linux cores run in parallel; the GIL is held only to look the
 * descriptor up in the Python-side cache and to append the record.
 *
 * Anything else -- a call it does not know, a descriptor not (yet) in the cache, a
 * buffer that does not read whole, a task the proxy has not seen or runs natively (a
 * true `native` attribute of its process) -- is left in `buf`
 * and serve() returns 0: the Python loop dispatches it to the handlers, which decide
 * everything about it (so their semantics stay the only semantics). A failed receive
 * returns its errno (EINTR: a stop request; ENOENT: the caller died). Every call it
 * receives is answered here or left in `buf`; when it raises (the record could not be
 * appended) after answering a call, it zeroes the id in `buf`, so the loop, which answers a
 * call left there with CONTINUE, never answers one twice.
 *
 * The steps and results are those of `data.DataCalls._write_from/_read_to` for such a
 * call; tests compare the two paths call by call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* accounting.RECORD_DTYPE / accounting._LAYOUT ("<qqqqiiiihBx") */
struct __attribute__((packed)) record {
    int64_t trap_ns, done_ns, bytes, result;
    int32_t rank, pid, fd, err;
    int16_t call;
    uint8_t how, pad;
};

#define EMULATED 1
#define ZERO_COPY 4
#define MAX_RW 0x7FFFF000L
#define TASK_SIZE 0x7FFFFFFFF000ULL

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* constants of one rank, unpacked once per serve() call */
struct rank_consts {
    int listener;
    PyObject *tids;      /* dict: tid -> Proc (borrowed from consts) */
    PyObject *records;   /* accounting.Records */
    int32_t rank;
    uint64_t arena_addr, arena_end;
    char *arena_local;   /* the proxy's mapping of the arena, or NULL */
    char *bounce;
    uint64_t bounce_size;
};

static PyObject *s_fds, *s_mem, *s_native, *s_passthrough, *s_closing, *s_spin_ns, *s_buf, *s_n;

/* int attribute of obj, or -1 (with no exception left set) */
static long long int_attr(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) {
        PyErr_Clear();
        return -1;
    }
    long long r = PyLong_Check(v) ? PyLong_AsLongLong(v) : -1;
    Py_DECREF(v);
    if (r == -1 && PyErr_Occurred())
        PyErr_Clear();
    return r;
}

/* The proxy's duplicate of the rank's fd `fd` of task `tid`, and the process's memory
 * descriptor; 0 if the call is not a hot one (then Python handles it). GIL held. */
static int lookup(struct rank_consts *c, uint32_t tid, uint32_t fd, int *pfd, int *mem) {
    PyObject *key = PyLong_FromUnsignedLong(tid);
    if (key == NULL)
        goto fail;
    PyObject *proc = PyDict_GetItemWithError(c->tids, key); /* borrowed */
    Py_DECREF(key);
    if (proc == NULL)
        goto fail;
    PyObject *native = PyObject_GetAttr(proc, s_native);  /* a process the kernel serves */
    int own = native == NULL || PyObject_IsTrue(native) == 0;
    Py_XDECREF(native);
    PyErr_Clear();  /* no such attribute: every process is served */
    if (!own)
        goto fail;
    PyObject *fds = PyObject_GetAttr(proc, s_fds);
    if (fds == NULL || !PyDict_Check(fds)) {
        Py_XDECREF(fds);
        goto fail;
    }
    key = PyLong_FromUnsignedLong(fd);
    PyObject *entry = key ? PyDict_GetItemWithError(fds, key) : NULL; /* borrowed */
    Py_XDECREF(key);
    int ok = entry != NULL && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 2
             && PyLong_Check(PyTuple_GET_ITEM(entry, 0))
             && PyTuple_GET_ITEM(entry, 1) == Py_True;
    long long p = ok ? PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 0)) : -1;
    Py_DECREF(fds);
    if (!ok || p < 0)
        goto fail;
    long long m = int_attr(proc, s_mem);
    if (m < 0)
        goto fail;
    *pfd = (int)p;
    *mem = (int)m;
    return 1;
fail:
    PyErr_Clear();
    return 0;
}

/* Append a row to the Records buffer in place (GIL held); grow it through Records.add. */
static int add_record(struct rank_consts *c, const struct record *r) {
    PyObject *buf = PyObject_GetAttr(c->records, s_buf);
    long long n = int_attr(c->records, s_n);
    if (buf == NULL || !PyByteArray_Check(buf) || n < 0) {
        Py_XDECREF(buf);
        PyErr_Clear();
        PyErr_SetString(PyExc_RuntimeError, "records is not an accounting.Records buffer");
        return -1;
    }
    if ((n + 1) * (long long)sizeof *r <= PyByteArray_GET_SIZE(buf)) {
        memcpy(PyByteArray_AS_STRING(buf) + n * sizeof *r, r, sizeof *r);
        Py_DECREF(buf);
        PyObject *next = PyLong_FromLongLong(n + 1);
        int rc = next ? PyObject_SetAttr(c->records, s_n, next) : -1;
        Py_XDECREF(next);
        return rc;
    }
    Py_DECREF(buf);
    PyObject *res = PyObject_CallMethod(c->records, "add", "LLLLiiiii", (long long)r->trap_ns,
                                        (long long)r->done_ns, (long long)r->bytes,
                                        (long long)r->result, (int)r->pid, (int)r->fd,
                                        (int)r->err, (int)r->call, (int)r->how);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

static void answer(int listener, uint64_t id, int64_t val, int32_t error, uint32_t flags) {
    struct seccomp_notif_resp resp = {.id = id, .val = val, .error = error, .flags = flags};
    ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &resp); /* ENOENT: the caller was killed */
}

/* (listener, tids, records, rank, arena address, arena end, arena mapping or None,
 * bounce buffer): the buffers stay exported while serve() runs, so neither can be unmapped
 * or resized under it. */
static int unpack_consts(PyObject *t, struct rank_consts *c, Py_buffer *arena, Py_buffer *bounce) {
    unsigned long long arena_addr, arena_end;
    PyObject *arena_obj;
    if (!PyArg_ParseTuple(t, "iO!OiKKOw*", &c->listener, &PyDict_Type, &c->tids, &c->records,
                          &c->rank, &arena_addr, &arena_end, &arena_obj, bounce))
        return -1;
    arena->obj = NULL;
    c->arena_local = NULL;
    if (arena_obj != Py_None) {
        if (PyObject_GetBuffer(arena_obj, arena, PyBUF_WRITABLE)) {
            PyBuffer_Release(bounce);
            return -1;
        }
        if ((unsigned long long)arena->len < arena_end - arena_addr) {
            PyBuffer_Release(arena);
            PyBuffer_Release(bounce);
            PyErr_SetString(PyExc_ValueError, "the arena mapping is smaller than the arena");
            return -1;
        }
        c->arena_local = arena->buf;
    }
    c->arena_addr = arena_addr;
    c->arena_end = arena_end;
    c->bounce = bounce->buf;
    c->bounce_size = (uint64_t)bounce->len;
    return 0;
}

/* readv/writev/preadv/pwritev/preadv2/pwritev2 (no flags): every segment in the arena goes
 * to the kernel as one iovec array over the proxy's mapping (zero copy); a write from
 * ordinary memory is gathered with one process_vm_readv into the bounce buffer and written
 * with one call. Returns 0 to defer (nothing done), 1 when answered. GIL held on entry. */
static int vector_call(struct rank_consts *c, struct seccomp_notif *req, int nr, int64_t t0) {
    struct iovec remote[UIO_MAXIOV], local[UIO_MAXIOV];
    __u64 *a = req->data.args;
    int is_write = nr == SYS_writev || nr == SYS_pwritev || nr == SYS_pwritev2;
    int positioned = 1;
    int64_t off = (int64_t)a[3];
    if (nr == SYS_readv || nr == SYS_writev) {
        positioned = 0;
    } else if (nr == SYS_preadv2 || nr == SYS_pwritev2) {
        if ((uint32_t)a[5])
            return 0;  /* RWF_* flags: the handlers let the kernel honour them */
        positioned = off != -1;
    }
    if (positioned && off < 0)
        return 0;
    uint64_t vlen = a[2], iov_addr = a[1];
    if (vlen == 0 || vlen > UIO_MAXIOV)
        return 0;
    uint32_t fd = (uint32_t)a[0];
    int pfd, mem;
    if (!lookup(c, req->pid, fd, &pfd, &mem))
        return 0;
    size_t bytes = 16 * vlen;
    int iov_in_arena = c->arena_local != NULL && c->arena_addr <= iov_addr
                       && iov_addr + bytes <= c->arena_end;
    int defer = 0, gone = 0;
    Py_BEGIN_ALLOW_THREADS
    if (iov_in_arena) {
        memcpy(remote, c->arena_local + (iov_addr - c->arena_addr), bytes);
    } else {
        struct iovec into = {remote, bytes};
        if (iov_addr + bytes > TASK_SIZE || preadv(mem, &into, 1, (off_t)iov_addr) != (ssize_t)bytes)
            defer = 1;
        else if (ioctl(c->listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id))
            gone = 1;
    }
    Py_END_ALLOW_THREADS
    if (defer)
        return 0;
    if (gone) {
        answer(c->listener, req->id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
        return 1;
    }
    uint64_t total = 0;
    int all_arena = c->arena_local != NULL, any_arena = 0;
    for (uint64_t i = 0; i < vlen; i++) {
        uint64_t base = (uint64_t)(uintptr_t)remote[i].iov_base, len = remote[i].iov_len;
        if (len >> 63)
            return 0;
        if (len > (uint64_t)MAX_RW - total)
            len = (uint64_t)MAX_RW - total;
        if (base + len > TASK_SIZE)
            return 0;
        remote[i].iov_len = len;
        total += len;
        int in = c->arena_local != NULL && c->arena_addr <= base && base + len <= c->arena_end;
        all_arena &= in;
        any_arena |= in;
        if (in)
            local[i] = (struct iovec){c->arena_local + (base - c->arena_addr), len};
    }
    if (total == 0 || (!all_arena && (!is_write || total > c->bounce_size)))
        return 0;  /* reads into ordinary memory, oversized gathers: the handlers */
    int64_t res = 0;
    Py_BEGIN_ALLOW_THREADS
    struct iovec *iov = local;
    int n = (int)vlen;
    if (!all_arena) {
        struct iovec one = {c->bounce, total};
        if (process_vm_readv((pid_t)req->pid, &one, 1, remote, vlen, 0) != (ssize_t)total)
            defer = 1;
        else if (ioctl(c->listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id))
            gone = 1;
        local[0] = one;
        n = 1;
    }
    if (!defer && !gone) {
        ssize_t r;
        if (is_write)
            r = positioned ? pwritev(pfd, iov, n, off) : writev(pfd, iov, n);
        else
            r = positioned ? preadv(pfd, iov, n, off) : readv(pfd, iov, n);
        res = r < 0 ? -errno : r;
    }
    Py_END_ALLOW_THREADS
    if (defer)
        return 0;
    if (gone) {
        answer(c->listener, req->id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
        return 1;
    }
    struct record row = {
        .trap_ns = t0, .done_ns = now_ns(), .bytes = res >= 0 ? res : 0,
        .result = res >= 0 ? res : -1, .rank = c->rank, .pid = (int32_t)req->pid,
        .fd = (int32_t)fd, .err = res >= 0 ? 0 : (int32_t)-res, .call = (int16_t)nr,
        .how = EMULATED | (iov_in_arena || any_arena ? ZERO_COPY : 0), .pad = 0};
    int failed = add_record(c, &row);
    Py_BEGIN_ALLOW_THREADS
    answer(c->listener, req->id, res >= 0 ? res : 0, res >= 0 ? 0 : (int32_t)res, 0);
    Py_END_ALLOW_THREADS
    if (failed)
        req->id = 0;  /* answered: the caller's rescue must not answer it again */
    return failed ? -1 : 1;
}

static PyObject *serve(PyObject *self, PyObject *args) {
    PyObject *emulator, *consts;
    Py_buffer view, arena, bounce;
    struct rank_consts c;
    if (!PyArg_ParseTuple(args, "Ow*O!", &emulator, &view, &PyTuple_Type, &consts))
        return NULL;
    if (view.len < (Py_ssize_t)sizeof(struct seccomp_notif) || view.readonly) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "buf must be a writable seccomp_notif");
        return NULL;
    }
    if (unpack_consts(consts, &c, &arena, &bounce)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *out = NULL;
    struct seccomp_notif *req = view.buf;
    int result_errno = 0;
    for (;;) {
        long long spin = int_attr(emulator, s_spin_ns);
        int passthrough = 1;
        PyObject *pt = PyObject_GetAttr(emulator, s_passthrough);
        if (pt != NULL) {
            passthrough = PyObject_IsTrue(pt);
            Py_DECREF(pt);
        }
        PyObject *closing = PyObject_GetAttr(emulator, s_closing);
        int stop = closing == NULL || PyObject_IsTrue(closing) != 0;
        Py_XDECREF(closing);
        PyErr_Clear();
        if (stop) {  /* a stop request between calls: the loop sees `closing` and ends */
            result_errno = EINTR;
            break;
        }
        int rc, err = 0;
        memset(req, 0, sizeof *req);
        Py_BEGIN_ALLOW_THREADS
        if (spin > 0) {
            struct pollfd p = {.fd = c.listener, .events = POLLIN};
            int64_t until = now_ns() + spin;
            while (poll(&p, 1, 0) == 0 && now_ns() < until)
                ;
        }
        rc = ioctl(c.listener, SECCOMP_IOCTL_NOTIF_RECV, req);
        if (rc)
            err = errno;
        Py_END_ALLOW_THREADS
        if (rc) {
            result_errno = err;
            break;
        }
        int64_t t0 = now_ns();
        int nr = req->data.nr;
        __u64 *a = req->data.args;
        int is_write = nr == SYS_write || nr == SYS_pwrite64;
        int positioned = nr == SYS_pread64 || nr == SYS_pwrite64;
        if (passthrough)
            break;
        if (nr == SYS_readv || nr == SYS_writev || nr == SYS_preadv || nr == SYS_pwritev
            || nr == SYS_preadv2 || nr == SYS_pwritev2) {
            int done = vector_call(&c, req, nr, t0);
            if (done < 0)
                goto done;
            if (done == 0)
                break;
            continue;
        }
        if (!(is_write || nr == SYS_read || nr == SYS_pread64))
            break;
        uint32_t fd = (uint32_t)a[0];
        uint64_t addr = a[1], count = a[2];
        int64_t off = (int64_t)a[3];
        if (count == 0 || count > MAX_RW || (positioned && off < 0))
            break;
        int in_arena = c.arena_local != NULL && c.arena_addr <= addr && addr + count <= c.arena_end;
        if (!in_arena && (count > c.bounce_size || addr + count > TASK_SIZE))
            break;
        int pfd, mem;
        if (!lookup(&c, req->pid, fd, &pfd, &mem))
            break;

        int64_t res;
        int defer = 0, gone = 0;
        Py_BEGIN_ALLOW_THREADS
        char *local = in_arena ? c.arena_local + (addr - c.arena_addr) : c.bounce;
        if (is_write) {
            if (!in_arena) {
                struct iovec iov = {c.bounce, count};
                ssize_t got = preadv(mem, &iov, 1, (off_t)addr);
                if (got != (ssize_t)count)
                    defer = 1;  /* short or unreadable: the handler decides */
                else if (ioctl(c.listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id))
                    gone = 1;   /* the data must come from the task that trapped */
            }
            if (!defer && !gone) {
                ssize_t r = positioned ? pwrite(pfd, local, count, off) : write(pfd, local, count);
                res = r < 0 ? -errno : r;
            }
        } else {
            ssize_t r = positioned ? pread(pfd, local, count, off) : read(pfd, local, count);
            res = r < 0 ? -errno : r;
            if (r > 0 && !in_arena) {
                if (ioctl(c.listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id)) {
                    gone = 1;
                } else {
                    struct iovec l = {c.bounce, (size_t)r}, rem = {(void *)(uintptr_t)addr, (size_t)r};
                    if (process_vm_writev((pid_t)req->pid, &l, 1, &rem, 1, 0) != r) {
                        if (!positioned)  /* give back what could not be delivered */
                            lseek(pfd, -r, SEEK_CUR);
                        res = -EFAULT;
                    }
                }
            }
        }
        Py_END_ALLOW_THREADS
        if (defer)
            break;
        if (gone) {  /* the caller is gone (or let the kernel try): as the handlers do */
            answer(c.listener, req->id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
            continue;
        }
        /* the record goes in before the answer: once answered, the rank may detach */
        struct record row = {
            .trap_ns = t0, .done_ns = now_ns(), .bytes = res >= 0 ? res : 0,
            .result = res >= 0 ? res : -1, .rank = c.rank, .pid = (int32_t)req->pid,
            .fd = (int32_t)fd, .err = res >= 0 ? 0 : (int32_t)-res, .call = (int16_t)nr,
            .how = EMULATED | (in_arena ? ZERO_COPY : 0), .pad = 0};
        int failed = add_record(&c, &row);
        Py_BEGIN_ALLOW_THREADS
        answer(c.listener, req->id, res >= 0 ? res : 0, res >= 0 ? 0 : (int32_t)res, 0);
        Py_END_ALLOW_THREADS
        if (failed) {  /* answered (zeroed id: the loop knows); the exception tells the loop */
            req->id = 0;  /* to stop using this path */
            goto done;
        }
    }
    out = PyLong_FromLong(result_errno);
done:
    if (arena.obj != NULL)
        PyBuffer_Release(&arena);
    PyBuffer_Release(&bounce);
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"serve", serve, METH_VARARGS,
     "serve(emulator, buf, consts) -> errno: answer hot calls until one needs Python "
     "(left in buf; returns 0) or the receive fails (returns its errno)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastpath(void) {
    s_fds = PyUnicode_InternFromString("fds");
    s_mem = PyUnicode_InternFromString("mem");
    s_native = PyUnicode_InternFromString("native");
    s_passthrough = PyUnicode_InternFromString("passthrough");
    s_closing = PyUnicode_InternFromString("closing");
    s_spin_ns = PyUnicode_InternFromString("spin_ns");
    s_buf = PyUnicode_InternFromString("_buf");
    s_n = PyUnicode_InternFromString("_n");
    PyObject *m = PyModule_Create(&module);
    if (m != NULL)
        PyModule_AddIntConstant(m, "RECORD_SIZE", (long)sizeof(struct record));
    return m;
}
