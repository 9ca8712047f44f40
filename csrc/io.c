/* The engine's system-call layer with fault injection and recording. See io.h. */
#define _GNU_SOURCE
#include "io.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

static pthread_mutex_t io_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_uint fault_mask;          /* 0: no injection (the production fast path) */
static atomic_uint_fast64_t fault_nth, fault_calls, fault_failures;
static atomic_int fault_err, fault_persistent; /* set before fault_mask publishes them */
static _Atomic(vol_io_recorder) recorder;

void vol_io_fault(unsigned mask, uint64_t nth, int err, int persistent)
{
    pthread_mutex_lock(&io_lock);
    atomic_store(&fault_mask, 0);
    fault_err = err ? err : EIO;
    fault_persistent = persistent;
    atomic_store(&fault_calls, 0);
    atomic_store(&fault_failures, 0);
    atomic_store(&fault_nth, nth);
    atomic_store(&fault_mask, nth ? mask : 0);
    pthread_mutex_unlock(&io_lock);
}

uint64_t vol_io_calls(void) { return atomic_load(&fault_calls); }
uint64_t vol_io_failures(void) { return atomic_load(&fault_failures); }
void vol_io_record(vol_io_recorder fn) { atomic_store(&recorder, fn); }

/* 1 if this call must fail (errno set). */
static int injected(unsigned op)
{
    if (!(atomic_load(&fault_mask) & op)) /* a plain load on x86; orders the reads below */
        return 0;
    uint64_t n = atomic_fetch_add(&fault_calls, 1) + 1, nth = atomic_load(&fault_nth);
    if (n == nth || (fault_persistent && n > nth)) {
        atomic_fetch_add(&fault_failures, 1);
        errno = fault_err;
        return 1;
    }
    return 0;
}

static uint64_t ino_of(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 ? (uint64_t)st.st_ino : 0;
}

static void record(int op, uint64_t ino, uint64_t dir, const char *name, const char *name2, const void *buf,
                   uint64_t len, uint64_t off, int64_t result)
{
    vol_io_recorder fn = atomic_load(&recorder);
    if (fn)
        fn(op, ino, dir, name, name2, buf, len, off, result);
}

#define RECORDING() (atomic_load_explicit(&recorder, memory_order_relaxed) != NULL)
#define RES(r) ((r) < 0 ? -(int64_t)errno : (int64_t)(r))

ssize_t io_pwrite(int fd, const void *buf, size_t len, uint64_t off)
{
    if (injected(IO_PWRITE))
        return -1;
    ssize_t r = pwrite(fd, buf, len, (off_t)off);
    if (RECORDING()) {
        int e = errno;
        record(IO_PWRITE, ino_of(fd), 0, NULL, NULL, buf, r > 0 ? (uint64_t)r : 0, off, RES(r));
        errno = e;
    }
    return r;
}

static int sync_common(int fd, int op, int data_only)
{
    if (injected((unsigned)op))
        return -1;
    int r = data_only ? fdatasync(fd) : fsync(fd);
    if (RECORDING()) {
        int e = errno;
        record(op, ino_of(fd), 0, NULL, NULL, NULL, 0, 0, RES(r));
        errno = e;
    }
    return r;
}

int io_fdatasync(int fd) { return sync_common(fd, IO_FDATASYNC, 1); }
int io_fsync(int fd) { return sync_common(fd, IO_FDATASYNC, 0); }
int io_fsyncdir(int fd) { return sync_common(fd, IO_FSYNCDIR, 0); }

int io_openat(int dirfd, const char *name, int flags, mode_t mode)
{
    if (injected(IO_OPENAT))
        return -1;
    int fd = openat(dirfd, name, flags, mode);
    if (RECORDING() && (flags & O_CREAT)) {
        int e = errno;
        record(IO_OPENAT, fd >= 0 ? ino_of(fd) : 0, ino_of(dirfd), name, NULL, NULL, (flags & O_TRUNC) != 0, 0,
               RES(fd));
        errno = e;
    }
    return fd;
}

int io_renameat(int dirfd, const char *from, const char *to)
{
    if (injected(IO_RENAMEAT))
        return -1;
    int r = renameat(dirfd, from, dirfd, to);
    if (RECORDING()) {
        int e = errno;
        record(IO_RENAMEAT, 0, ino_of(dirfd), from, to, NULL, 0, 0, RES(r));
        errno = e;
    }
    return r;
}

int io_unlinkat(int dirfd, const char *name)
{
    if (injected(IO_UNLINKAT))
        return -1;
    int r = unlinkat(dirfd, name, 0);
    if (RECORDING()) {
        int e = errno;
        record(IO_UNLINKAT, 0, ino_of(dirfd), name, NULL, NULL, 0, 0, RES(r));
        errno = e;
    }
    return r;
}

int io_ftruncate(int fd, uint64_t len)
{
    if (injected(IO_FTRUNCATE))
        return -1;
    int r = ftruncate(fd, (off_t)len);
    if (RECORDING()) {
        int e = errno;
        record(IO_FTRUNCATE, ino_of(fd), 0, NULL, NULL, NULL, len, 0, RES(r));
        errno = e;
    }
    return r;
}

int io_mkdirat(int dirfd, const char *name, mode_t mode)
{
    if (injected(IO_MKDIRAT))
        return -1;
    int r = mkdirat(dirfd, name, mode);
    if (RECORDING()) {
        int e = errno;
        record(IO_MKDIRAT, 0, ino_of(dirfd), name, NULL, NULL, 0, 0, RES(r));
        errno = e;
    }
    return r;
}

int io_punch(int fd, uint64_t len, uint64_t off)
{
    if (injected(IO_PUNCH))
        return -1;
    int r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len);
    if (RECORDING()) {
        int e = errno;
        record(IO_PUNCH, ino_of(fd), 0, NULL, NULL, NULL, len, off, RES(r));
        errno = e;
    }
    return r;
}
