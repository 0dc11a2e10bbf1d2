/* An MPI executable's own MPI_Abort, recorded for the harness that runs it.
 *
 * An MPI executable under `mckmpi run` is the rank's child (mckmpi/external.py); its
 * MPI_Abort ends it inside the MPI library, which then exits with the errorcode, so from
 * outside an abort looks like any non-zero exit. The harness preloads this library into
 * the program only (LD_PRELOAD, ahead of the user's) with MCKMPI_ABORT_RECORD naming a
 * private directory; its MPI_Abort writes the errorcode there, then lets the abort proceed.
 *
 * The record: a file named by the aborting process's pid, holding the errorcode in decimal
 * and a newline, written to a temporary name and renamed, so a reader sees all of it or
 * nothing. A pid, not a fixed name, because processes the program starts inherit the
 * preload: the harness reads only its child's record.
 *
 * Not linked to libmpi, so every process that inherits the preload loads it: the next
 * MPI_Abort (a profiling tool the user preloaded, else the MPI library's) is found with
 * dlsym(RTLD_NEXT) when it is called. mpi.h gives the types of the MPI mckmpi is built
 * against (compile flags only). The Python path records an abort through
 * mckmpi/_mpiabort.c instead, which needs the interpreter to flush the rank's data.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <mpi.h>

typedef int (*abort_fn)(MPI_Comm, int);

/* write(2) all of `len` bytes, retried on EINTR and short writes. */
static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* DIR/PID <- "ERRORCODE\n", through DIR/.PID.tmp. Failures are silent: the abort must
 * happen whatever becomes of the record (the harness then records a plain exit). */
static void record(const char *dir, int errorcode)
{
    char tmp[PATH_MAX], final[PATH_MAX], line[32];
    long pid = (long)getpid();
    int n_tmp = snprintf(tmp, sizeof tmp, "%s/.%ld.tmp", dir, pid);
    int n_final = snprintf(final, sizeof final, "%s/%ld", dir, pid);
    int n_line = snprintf(line, sizeof line, "%d\n", errorcode);
    if (n_tmp < 0 || (size_t)n_tmp >= sizeof tmp || n_final < 0
        || (size_t)n_final >= sizeof final)
        return;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    int failed = write_all(fd, line, (size_t)n_line);
    if (close(fd) != 0 || failed || rename(tmp, final) != 0)
        unlink(tmp);
}

int MPI_Abort(MPI_Comm comm, int errorcode)
{
    const char *dir = getenv("MCKMPI_ABORT_RECORD");
    if (dir != NULL && dir[0] != '\0')
        record(dir, errorcode);
    abort_fn next = (abort_fn)dlsym(RTLD_NEXT, "MPI_Abort");
    if (next != NULL)
        return next(comm, errorcode);
    /* No MPI library after this one (a program that resolved MPI_Abort here is linked to
     * one, so only a broken installation gets here): end as MPI_Abort would. */
    static const char msg[] = "mckmpi: error: MPI_Abort called, but no MPI library found\n";
    if (write(STDERR_FILENO, msg, sizeof msg - 1) < 0) { /* nothing more to do */ }
    _exit(errorcode & 0xff ? errorcode : 1);
}
