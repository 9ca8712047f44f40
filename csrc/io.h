/* The engine's system-call layer: every call by which the engine changes or syncs a file goes
 * through here, so that tests can fail the Nth one (RELIABILITY R7) and record them all to build
 * the states a power cut could leave (R2-R4), as LevelDB's fault-injection Env does.
 *
 * Notes on the design:
 *  - Production never sets a fault or a recorder: each wrapper is then the plain call plus one
 *    load of a global and a branch.
 *  - The settings are process-wide (one engine per process in tests), guarded by io_lock; the
 *    counter is atomic, so concurrent callers (the checkpoint beside requests) each count once.
 *  - A recorded call names files by inode number (st_ino), not by descriptor, so the recorder
 *    needs no descriptor bookkeeping: IO_OPENAT reports the directory's inode, the name and the
 *    new file's inode; IO_RENAMEAT and IO_UNLINKAT the directory and the names.
 *  - Every wrapper returns what the system call returns and sets errno the same way; an
 *    injected failure does nothing and returns -1 with the injected errno.
 */
#ifndef BLOCKREP_IO_H
#define BLOCKREP_IO_H
#include <stdint.h>
#include <sys/types.h>

enum {
    IO_PWRITE = 1,
    IO_FDATASYNC = 2, /* fdatasync and fsync of a file */
    IO_FSYNCDIR = 4,  /* fsync of a directory (makes names durable) */
    IO_OPENAT = 8,    /* openat with O_CREAT */
    IO_RENAMEAT = 16,
    IO_UNLINKAT = 32,
    IO_FTRUNCATE = 64,
    IO_MKDIRAT = 128,
    IO_PUNCH = 256,   /* fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros */
    IO_ALL = 511,
};

/* Fail the nth call (1-based) whose op is in mask with errno err; persistent: every matching
 * call from then on fails too. nth = 0 turns injection off. The count starts at 0. */
void vol_io_fault(unsigned mask, uint64_t nth, int err, int persistent);
/* Matching calls seen since the last vol_io_fault (how many ops a workload makes). */
uint64_t vol_io_calls(void);
/* Injected failures so far. */
uint64_t vol_io_failures(void);

/* Called after each call in IO_ALL (result: its return value, or -errno). dir/ino: inode numbers
 * (see the notes), buf/len/off: the bytes of a pwrite or the length of a ftruncate. */
typedef void (*vol_io_recorder)(int op, uint64_t ino, uint64_t dir, const char *name, const char *name2,
                                const void *buf, uint64_t len, uint64_t off, int64_t result);
void vol_io_record(vol_io_recorder fn); /* NULL stops recording */

ssize_t io_pwrite(int fd, const void *buf, size_t len, uint64_t off);
int io_fdatasync(int fd);
int io_fsync(int fd);     /* a file */
int io_fsyncdir(int fd);  /* a directory */
int io_openat(int dirfd, const char *name, int flags, mode_t mode);
int io_renameat(int dirfd, const char *from, const char *to);
int io_unlinkat(int dirfd, const char *name);
int io_ftruncate(int fd, uint64_t len);
int io_mkdirat(int dirfd, const char *name, mode_t mode);
int io_punch(int fd, uint64_t len, uint64_t off); /* recorded with len and off */

#endif
