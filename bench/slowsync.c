#define _GNU_SOURCE
#include <dlfcn.h>
#include <time.h>
#include <stdlib.h>
/* bench/ingest --db-sync-delay-ms: the gateway's queue database on slower storage. Loaded with LD_PRELOAD into the
   gateway process only, every fdatasync (SQLite's WAL commit with synchronous=FULL; the spool's files use fsync,
   which is left alone) returns SLOWSYNC_US microseconds later. Lab only. */
static void pause_us(void) {
    const char *v = getenv("SLOWSYNC_US");
    long us = v ? atol(v) : 3000;
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    nanosleep(&ts, 0);
}
int fdatasync(int fd) {
    static int (*real)(int) = 0;
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    int r = real(fd);
    pause_us();
    return r;
}
