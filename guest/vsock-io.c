/*
 * vsock-io: the test guest's AF_VSOCK endpoint (busybox has none).
 *
 *   vsock-io send CID PORT TEXT    connect, send TEXT and a newline, print
 *                                  the one line that comes back, exit
 *   vsock-io echo PORT             serve: answer each line with "echo: LINE"
 *                                  (forever, one connection at a time)
 *   vsock-io sink PORT             serve: count what each connection sends,
 *                                  answering "got N" (bytes so far) at every
 *                                  newline (throughput from the host)
 *   vsock-io source CID PORT MIB   connect, write MIB MiB of zeros, then a
 *                                  newline; print the one line that comes
 *                                  back (throughput to the host)
 *
 * Exit status 0 on success, 1 on any failure (with a message on stderr).
 * Half-close is not relied on: vhost-device-vsock does not pass it through.
 */
#include <errno.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int fail(const char *what) {
    fprintf(stderr, "vsock-io: %s: %s\n", what, strerror(errno));
    return 1;
}

static unsigned parse(const char *s) {
    char *end;
    unsigned long v = strtoul(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v > 0xffffffffUL) {
        fprintf(stderr, "vsock-io: not a number: %s\n", s);
        exit(2);
    }
    return (unsigned)v;
}

static int dial(unsigned cid, unsigned port) {
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        return -1;
    struct timeval tv = {.tv_sec = 20};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        close(s);
        return -1;
    }
    return s;
}

static int listener(unsigned port) {
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 8) < 0)
        return -1;
    return s;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reads one line (without its newline) into buf; -1 at the end or on error. */
static int read_line(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        if (c == '\n')
            break;
        buf[n++] = c;
    }
    buf[n] = '\0';
    return (int)n;
}

static int ask(int s, const char *text, size_t len) {
    char line[4096];
    if (write_all(s, text, len) < 0)
        return fail("write");
    if (read_line(s, line, sizeof line) < 0)
        return fail("no answer");
    printf("%s\n", line);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "send") == 0) {
        int s = dial(parse(argv[2]), parse(argv[3]));
        if (s < 0)
            return fail("connect");
        size_t len = strlen(argv[4]);
        char *msg = malloc(len + 2);
        if (!msg)
            return fail("malloc");
        memcpy(msg, argv[4], len);
        msg[len] = '\n';
        return ask(s, msg, len + 1);
    }
    if (argc == 5 && strcmp(argv[1], "source") == 0) {
        int s = dial(parse(argv[2]), parse(argv[3]));
        if (s < 0)
            return fail("connect");
        static char zeros[1 << 20];
        for (unsigned i = parse(argv[4]); i > 0; i--)
            if (write_all(s, zeros, sizeof zeros) < 0)
                return fail("write");
        return ask(s, "\n", 1);
    }
    if (argc == 3 && (strcmp(argv[1], "echo") == 0 || strcmp(argv[1], "sink") == 0)) {
        int echo = strcmp(argv[1], "echo") == 0;
        int l = listener(parse(argv[2]));
        if (l < 0)
            return fail("listen");
        for (;;) {
            int c = accept(l, NULL, NULL);
            if (c < 0) {
                if (errno == EINTR)
                    continue;
                return fail("accept");
            }
            char line[4096], reply[4200];
            if (echo) {
                while (read_line(c, line, sizeof line) >= 0) {
                    int n = snprintf(reply, sizeof reply, "echo: %s\n", line);
                    if (write_all(c, reply, (size_t)n) < 0)
                        break;
                }
            } else {
                static char buf[1 << 16];
                unsigned long long got = 0;
                for (;;) {
                    ssize_t r = read(c, buf, sizeof buf);
                    if (r < 0 && errno == EINTR)
                        continue;
                    if (r <= 0)
                        break;
                    got += (unsigned long long)r;
                    if (memchr(buf, '\n', (size_t)r) != NULL) {
                        int n = snprintf(reply, sizeof reply, "got %llu\n", got);
                        if (write_all(c, reply, (size_t)n) < 0)
                            break;
                    }
                }
            }
            close(c);
        }
    }
    fprintf(stderr,
            "usage: vsock-io send CID PORT TEXT | echo PORT | sink PORT | source CID PORT MIB\n");
    return 2;
}
