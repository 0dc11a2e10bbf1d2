/*
 * notif-floor-ranks: the floor of one offload supervisor serving many ranks.
 *
 * N child processes trap pwrite64() (64 bytes) with SECCOMP_RET_USER_NOTIF and call it
 * back to back for a fixed time; the supervisor serves each child's listener from a
 * thread of its own (as mckmpi's proxy does): receive, process_vm_readv of the buffer,
 * validate the notification, pwrite on its own descriptor of the file, answer. The
 * supervisor runs on one CPU and the children on another, as a node proxy on a Linux core
 * and ranks on LWK cores. This is the least work such a supervisor can do, so it is the
 * baseline of the proxy's throughput with N ranks (`mckmpi bench offload`).
 *
 * Build: cc -O2 -pthread -o notif-floor-ranks notif-floor-ranks.c
 * Run:   ./notif-floor-ranks RANKS SECONDS FILE SUPERVISOR_CPU RANK_CPU
 * Prints: calls_per_s, supervisor_cpu_per_call_us, errors, and the round trip of one call:
 * p50_us (the median of the ranks' medians) and p99_us (the worst rank's 99th percentile),
 * one "name value" a line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_RANKS 1024
#define MAX_SAMPLES (1 << 20)  /* per rank: the first calls of the window are timed */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s)) { perror("sched_setaffinity"); exit(1); }
}

static void send_fd(int sock, int fd) {
    char byte = 'f', ctl[CMSG_SPACE(sizeof(int))];
    struct iovec io = {&byte, 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (sendmsg(sock, &m, 0) < 0) { perror("sendmsg"); exit(1); }
}

static int recv_fd(int sock) {
    char byte, ctl[CMSG_SPACE(sizeof(int))];
    struct iovec io = {&byte, 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl};
    if (recvmsg(sock, &m, 0) <= 0) { perror("recvmsg"); exit(1); }
    int fd;
    memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof fd);
    return fd;
}

static int out_fd;

struct report {
    long calls, bad;
    float p50_us, p99_us;
};

/* serve one listener (until the process exits) */
static void *serve(void *arg) {
    int nfd = (int)(long)arg;
    struct seccomp_notif req;
    struct seccomp_notif_resp resp;
    char data[64];
    for (;;) {
        memset(&req, 0, sizeof req);
        if (ioctl(nfd, SECCOMP_IOCTL_NOTIF_RECV, &req)) {
            struct pollfd p = {.fd = nfd, .events = POLLIN};
            if (errno == ENOENT && poll(&p, 1, 0) > 0 && p.revents & POLLHUP)
                return NULL;  /* its child has exited */
            if (errno == EINTR || errno == ENOENT)  /* ENOENT: a caller died meanwhile */
                continue;
            return NULL;
        }
        size_t len = req.data.args[2] < sizeof data ? req.data.args[2] : sizeof data;
        struct iovec local = {data, len}, remote = {(void *)req.data.args[1], len};
        ssize_t got = process_vm_readv(req.pid, &local, 1, &remote, 1, 0);
        memset(&resp, 0, sizeof resp);
        resp.id = req.id;
        if (got < 0 || ioctl(nfd, SECCOMP_IOCTL_NOTIF_ID_VALID, &req.id)) {
            resp.error = -EFAULT;
        } else {
            ssize_t r = pwrite(out_fd, data, got, (off_t)req.data.args[3]);
            if (r < 0) resp.error = -errno; else resp.val = r;
        }
        ioctl(nfd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
    }
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s RANKS SECONDS FILE SUPERVISOR_CPU RANK_CPU\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]);
    double seconds = atof(argv[2]);
    const char *path = argv[3];
    int sup_cpu = atoi(argv[4]), rank_cpu = atoi(argv[5]);
    if (n < 1 || n > MAX_RANKS) { fprintf(stderr, "RANKS must be 1..%d\n", MAX_RANKS); return 2; }
    int sv[2], go[2], counts[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || pipe(go) || pipe(counts)) { perror("pipe"); return 1; }
    for (int i = 0; i < n; i++) {
        if (fork() == 0) {
            pin(rank_cpu);
            int fd = open(path, O_CREAT | O_RDWR, 0600);
            char buf[64] = "notif-floor-ranks";
            struct sock_filter f[] = {
                BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
                BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_pwrite64, 0, 1),
                BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
                BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
            };
            struct sock_fprog prog = {sizeof f / sizeof f[0], f};
            prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            int nfd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
            if (nfd < 0) { perror("seccomp user notification"); _exit(2); }
            send_fd(sv[1], nfd);
            close(nfd);
            char g;
            if (read(go[0], &g, 1) != 1) _exit(1);
            float *lat = malloc(sizeof(float) * MAX_SAMPLES);
            if (lat == NULL) _exit(1);
            long calls = 0, bad = 0;
            double end = now() + seconds, t = now();
            while (t < end) {
                if (pwrite(fd, buf, sizeof buf, 0) != sizeof buf) bad++;
                double t2 = now();
                if (calls < MAX_SAMPLES) lat[calls] = (float)((t2 - t) * 1e6);
                t = t2;
                calls++;
            }
            long timed = calls < MAX_SAMPLES ? calls : MAX_SAMPLES;
            qsort(lat, timed, sizeof *lat, cmp);
            struct report r = {calls, bad, timed ? lat[timed / 2] : 0, timed ? lat[(long)(timed * 0.99)] : 0};
            if (write(counts[1], &r, sizeof r) != sizeof r) _exit(1);
            _exit(0);
        }
    }
    pin(sup_cpu);
    out_fd = open(path, O_RDWR | O_CREAT, 0600);
    pthread_t threads[MAX_RANKS];
    for (int i = 0; i < n; i++) {
        int nfd = recv_fd(sv[0]);
        if (pthread_create(&threads[i], NULL, serve, (void *)(long)nfd)) { perror("pthread_create"); return 1; }
    }
    struct timespec c0, c1;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    for (int i = 0; i < n; i++)
        if (write(go[1], "g", 1) != 1) { perror("write"); return 1; }
    long calls = 0, bad = 0;
    float p50[MAX_RANKS], p99 = 0;
    for (int i = 0; i < n; i++) {
        struct report r;
        if (read(counts[0], &r, sizeof r) != sizeof r) { perror("read"); return 1; }
        calls += r.calls;
        bad += r.bad;
        p50[i] = r.p50_us;
        if (r.p99_us > p99) p99 = r.p99_us;
    }
    qsort(p50, n, sizeof *p50, cmp);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
    double cpu = (c1.tv_sec - c0.tv_sec) + (c1.tv_nsec - c0.tv_nsec) * 1e-9;
    while (wait(NULL) > 0)
        ;
    unlink(path);  /* the serving threads may wait in RECV for good: exit ends them */
    printf("calls_per_s %.1f\nsupervisor_cpu_per_call_us %.3f\nerrors %ld\np50_us %.3f\np99_us %.3f\n",
           calls / seconds, calls ? cpu / calls * 1e6 : 0.0, bad, p50[n / 2], p99);
    return bad != 0;
}
