/* lfbench: the timed inner loops of bench/run.sh, in C so that the loop
 * overhead is far below one system call (a Python loop would swamp 128-byte
 * appends at 300k writes/s).  Every subcommand prints one line of
 * "key=value" pairs; times are wall-clock seconds (CLOCK_MONOTONIC) around
 * the measured part only.  Any failing system call exits 1 with a message
 * naming the call, the path and errno.
 *
 *   read PATH                    sequential read, 1 MiB buffer
 *   write PATH BYTES             sequential write, 1 MiB buffer, then fsync
 *   append1 PATH                 open(O_APPEND), write 1 byte, close
 *   walk DIR                     recursive readdir + fstatat of every entry
 *   readdir DIR REPS             list DIR REPS times (opendir..closedir)
 *   create DIR N BYTES           create N files of BYTES, then unlink them
 *   rewrite ROOT LIST            dpkg-style: write P.dpkg-new, rename to P
 *   append PREFIX N BYTES JOBS   JOBS processes, each N writes to PREFIX.J
 *   getattr PATH N               N statx(AT_STATX_FORCE_SYNC) of PATH: on a
 *                                FUSE mount each one is a GETATTR round trip
 *                                to the daemon (the floor of any request)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *fmt, ...) {
  int e = errno;
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "lfbench: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, ": %s (errno %d)\n", strerror(e), e);
  va_end(ap);
  exit(1);
}

static void fill(char *buf, size_t n, unsigned seed) {
  unsigned x = seed * 2654435761u + 12345u;
  for (size_t i = 0; i < n; i++) {
    x = x * 1103515245u + 12345u;
    buf[i] = 'a' + (x >> 16) % 26;
  }
}

static void write_all(int fd, const char *buf, size_t n, const char *what) {
  while (n > 0) {
    ssize_t w = write(fd, buf, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      die("write %s", what);
    }
    if (w == 0) { errno = EIO; die("write %s returned 0", what); }
    buf += w;
    n -= (size_t)w;
  }
}

#define MIB (1024 * 1024)

static char *buffer(size_t n) {
  /* Page-aligned and touched: an unaligned malloc'd buffer halves copy speed. */
  char *b = aligned_alloc(4096, n);
  if (!b) die("aligned_alloc");
  memset(b, 0, n);
  return b;
}

static int cmd_read(const char *path) {
  char *buf = buffer(MIB);
  double t0 = now();
  int fd = open(path, O_RDONLY);
  if (fd < 0) die("open %s", path);
  long long total = 0;
  for (;;) {
    ssize_t r = read(fd, buf, MIB);
    if (r < 0) { if (errno == EINTR) continue; die("read %s", path); }
    if (r == 0) break;
    total += r;
  }
  close(fd);
  double t = now() - t0;
  printf("bytes=%lld secs=%.6f\n", total, t);
  return 0;
}

static int cmd_write(const char *path, long long bytes) {
  char *buf = buffer(MIB);
  fill(buf, MIB, 7);
  double t0 = now();
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) die("open %s", path);
  long long left = bytes;
  while (left > 0) {
    size_t n = left > MIB ? MIB : (size_t)left;
    write_all(fd, buf, n, path);
    left -= (long long)n;
  }
  if (fsync(fd) < 0) die("fsync %s", path);
  if (close(fd) < 0) die("close %s", path);
  double t = now() - t0;
  printf("bytes=%lld secs=%.6f\n", bytes, t);
  return 0;
}

static int cmd_append1(const char *path) {
  double t0 = now();
  int fd = open(path, O_WRONLY | O_APPEND);
  if (fd < 0) die("open(O_WRONLY|O_APPEND) %s", path);
  write_all(fd, "x", 1, path);
  if (close(fd) < 0) die("close %s", path);
  double t = now() - t0;
  printf("secs=%.6f\n", t);
  return 0;
}

static long long walk_entries, walk_dirs;

static void walk(int dirfd, const char *name, const char *shown) {
  int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) die("openat %s", shown);
  DIR *d = fdopendir(fd);
  if (!d) die("fdopendir %s", shown);
  walk_dirs++;
  struct dirent *de;
  errno = 0;
  while ((de = readdir(d)) != NULL) {
    if (de->d_name[0] == '.' &&
        (de->d_name[1] == 0 || (de->d_name[1] == '.' && de->d_name[2] == 0)))
      continue;
    struct stat st;
    if (fstatat(fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
      die("fstatat %s/%s", shown, de->d_name);
    walk_entries++;
    if (S_ISDIR(st.st_mode)) {
      char sub[4096];
      snprintf(sub, sizeof sub, "%s/%s", shown, de->d_name);
      walk(fd, de->d_name, sub);
    }
    errno = 0;
  }
  if (errno) die("readdir %s", shown);
  closedir(d);
}

static int cmd_walk(const char *dir) {
  double t0 = now();
  walk(AT_FDCWD, dir, dir);
  double t = now() - t0;
  printf("entries=%lld dirs=%lld secs=%.6f\n", walk_entries, walk_dirs, t);
  return 0;
}

static int cmd_readdir(const char *dir, int reps) {
  long long total = 0;
  double t0 = now();
  for (int i = 0; i < reps; i++) {
    DIR *d = opendir(dir);
    if (!d) die("opendir %s", dir);
    struct dirent *de;
    errno = 0;
    while ((de = readdir(d)) != NULL) {
      if (de->d_name[0] == '.' &&
          (de->d_name[1] == 0 || (de->d_name[1] == '.' && de->d_name[2] == 0)))
        continue;
      total++;
    }
    if (errno) die("readdir %s", dir);
    closedir(d);
  }
  double t = now() - t0;
  printf("entries=%lld secs=%.6f\n", total, t);
  return 0;
}

static int cmd_create(const char *dir, int n, int bytes) {
  char buf[65536], path[4096];
  if (bytes > (int)sizeof buf) bytes = sizeof buf;
  fill(buf, (size_t)bytes, 3);
  if (mkdir(dir, 0755) < 0 && errno != EEXIST) die("mkdir %s", dir);
  double t0 = now();
  for (int i = 0; i < n; i++) {
    snprintf(path, sizeof path, "%s/f%06d.txt", dir, i);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) die("open(O_CREAT|O_EXCL) %s", path);
    write_all(fd, buf, (size_t)bytes, path);
    if (close(fd) < 0) die("close %s", path);
  }
  double t1 = now();
  for (int i = 0; i < n; i++) {
    snprintf(path, sizeof path, "%s/f%06d.txt", dir, i);
    if (unlink(path) < 0) die("unlink %s", path);
  }
  double t2 = now();
  printf("files=%d create_secs=%.6f delete_secs=%.6f\n", n, t1 - t0, t2 - t1);
  return 0;
}

/* LIST lines: "SIZE<TAB>RELPATH".  Like dpkg unpacking an upgrade (with
 * --force-unsafe-io): write every new file as RELPATH.dpkg-new, then rename
 * each over the old one. */
static int cmd_rewrite(const char *root, const char *list) {
  FILE *f = fopen(list, "r");
  if (!f) die("fopen %s", list);
  int cap = 1024, n = 0;
  char **paths = malloc(sizeof(char *) * cap);
  long *sizes = malloc(sizeof(long) * cap);
  char line[4096];
  while (fgets(line, sizeof line, f)) {
    char *tab = strchr(line, '\t');
    if (!tab) continue;
    line[strcspn(line, "\n")] = 0;
    if (n == cap) {
      cap *= 2;
      paths = realloc(paths, sizeof(char *) * cap);
      sizes = realloc(sizes, sizeof(long) * cap);
    }
    sizes[n] = atol(line);
    char full[4096];
    snprintf(full, sizeof full, "%s/%s", root, tab + 1);
    paths[n++] = strdup(full);
  }
  fclose(f);
  long maxsz = 0;
  for (int i = 0; i < n; i++) if (sizes[i] > maxsz) maxsz = sizes[i];
  char *buf = malloc((size_t)maxsz + 16);
  fill(buf, (size_t)maxsz + 16, 11);
  char tmp[4200];
  double t0 = now();
  for (int i = 0; i < n; i++) {
    snprintf(tmp, sizeof tmp, "%s.dpkg-new", paths[i]);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) die("open(O_CREAT) %s", tmp);
    write_all(fd, buf + (i % 16), (size_t)sizes[i] + 1, tmp);
    if (close(fd) < 0) die("close %s", tmp);
  }
  for (int i = 0; i < n; i++) {
    snprintf(tmp, sizeof tmp, "%s.dpkg-new", paths[i]);
    if (rename(tmp, paths[i]) < 0) die("rename %s -> %s", tmp, paths[i]);
  }
  double t = now() - t0;
  printf("files=%d secs=%.6f\n", n, t);
  return 0;
}

static void append_job(const char *path, long n, int bytes, int gate) {
  char buf[4096];
  if (bytes > (int)sizeof buf) bytes = sizeof buf;
  fill(buf, (size_t)bytes, 5);
  buf[bytes - 1] = '\n';
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) die("open(O_APPEND|O_CREAT) %s", path);
  char c;
  if (read(gate, &c, 1) < 0) die("read gate");
  for (long i = 0; i < n; i++) {
    ssize_t w = write(fd, buf, (size_t)bytes);
    if (w != bytes) {
      if (w >= 0) errno = EIO;
      die("write #%ld to %s", i, path);
    }
  }
  if (close(fd) < 0) die("close %s", path);
}

static int cmd_append(const char *prefix, long n, int bytes, int jobs) {
  int gate[2], ready[2];
  if (pipe(gate) < 0 || pipe(ready) < 0) die("pipe");
  pid_t pids[64];
  if (jobs > 64) jobs = 64;
  for (int j = 0; j < jobs; j++) {
    pid_t p = fork();
    if (p < 0) die("fork");
    if (p == 0) {
      close(gate[1]);
      char path[4096];
      snprintf(path, sizeof path, "%s.%d", prefix, j);
      append_job(path, n, bytes, gate[0]);
      _exit(0);
    }
    pids[j] = p;
  }
  close(gate[0]);
  /* Give the children time to open their files; they then block on the gate. */
  usleep(200000);
  double t0 = now();
  close(gate[1]); /* EOF releases every child at once */
  int failed = 0;
  for (int j = 0; j < jobs; j++) {
    int st;
    if (waitpid(pids[j], &st, 0) < 0) die("waitpid");
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) failed = 1;
  }
  double t = now() - t0;
  if (failed) { fprintf(stderr, "lfbench: an append job failed\n"); return 1; }
  printf("writes=%ld secs=%.6f\n", n * jobs, t);
  return 0;
}

static int cmd_getattr(const char *path, long n) {
  struct statx stx;
  double t0 = now();
  for (long i = 0; i < n; i++)
    if (statx(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW | AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, &stx) < 0)
      die("statx %s", path);
  double t = now() - t0;
  printf("calls=%ld secs=%.6f\n", n, t);
  return 0;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc >= 3 && !strcmp(argv[1], "read")) return cmd_read(argv[2]);
  if (argc >= 4 && !strcmp(argv[1], "write")) return cmd_write(argv[2], atoll(argv[3]));
  if (argc >= 3 && !strcmp(argv[1], "append1")) return cmd_append1(argv[2]);
  if (argc >= 3 && !strcmp(argv[1], "walk")) return cmd_walk(argv[2]);
  if (argc >= 4 && !strcmp(argv[1], "readdir")) return cmd_readdir(argv[2], atoi(argv[3]));
  if (argc >= 5 && !strcmp(argv[1], "create")) return cmd_create(argv[2], atoi(argv[3]), atoi(argv[4]));
  if (argc >= 4 && !strcmp(argv[1], "rewrite")) return cmd_rewrite(argv[2], argv[3]);
  if (argc >= 6 && !strcmp(argv[1], "append"))
    return cmd_append(argv[2], atol(argv[3]), atoi(argv[4]), atoi(argv[5]));
  if (argc >= 4 && !strcmp(argv[1], "getattr")) return cmd_getattr(argv[2], atol(argv[3]));
  fprintf(stderr, "usage: see the comment at the top of lfbench.c\n");
  return 2;
}
