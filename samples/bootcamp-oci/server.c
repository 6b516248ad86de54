// The kubernetes-bootcamp app as a native Linux program, for the OCI image of the same app.
// Every request to port 8080 (or $PORT) gets the answer the wasm build gives:
//   Hello Kubernetes bootcamp! | Running on: <HOSTNAME> | v=<BOOTCAMP_VERSION>
// It handles SIGTERM (exits at once, as a container's PID 1 must for a quick stop), serves
// keep-alive connections, and forks per connection. Built static: the image has no libc.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef BOOTCAMP_VERSION
#define BOOTCAMP_VERSION "1"
#endif

static void on_term(int sig) { (void)sig; _exit(0); }

// Serves one connection: answers each request read until the client closes.
static void serve(int fd, const char *response, size_t len) {
    char buf[8192];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, buf + have, sizeof buf - have - 1);
        if (n <= 0) return;
        have += (size_t)n;
        buf[have] = 0;
        char *end;
        // One answer per complete request head; bodies are not expected.
        while ((end = strstr(buf, "\r\n\r\n")) != NULL) {
            int close_after = strstr(buf, "Connection: close") != NULL && strstr(buf, "Connection: close") < end;
            if (write(fd, response, len) != (ssize_t)len) return;
            if (close_after) return;
            size_t used = (size_t)(end + 4 - buf);
            memmove(buf, end + 4, have - used);
            have -= used;
            buf[have] = 0;
        }
        if (have >= sizeof buf - 1) return;
    }
}

int main(void) {
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    signal(SIGCHLD, SIG_IGN);
    const char *host = getenv("HOSTNAME");
    if (!host) host = "unknown";
    const char *port_s = getenv("PORT");
    int port = port_s ? atoi(port_s) : 8080;

    char body[512];
    int blen = snprintf(body, sizeof body, "Hello Kubernetes bootcamp! | Running on: %s | v=%s\n", host, BOOTCAMP_VERSION);
    static char response[1024];
    int len = snprintf(response, sizeof response,
                       "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s", blen, body);

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(s, 1024) != 0) {
        perror("listen");
        return 1;
    }
    printf("Kubernetes Bootcamp App Started At: port %d | Running On: %s | v=%s\n", port, host, BOOTCAMP_VERSION);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pid_t pid = fork();
        if (pid == 0) {
            close(s);
            serve(c, response, (size_t)len);
            _exit(0);
        }
        close(c);
    }
}
