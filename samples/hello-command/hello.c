// A WASI command for run-to-completion pods: prints its arguments and the POD_NAME it was
// given, then exits with the code in EXIT_CODE (default 0).
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    const char *pod = getenv("HOSTNAME");
    printf("hello from %s\n", pod ? pod : "(no HOSTNAME)");
    for (int i = 1; i < argc; i++) {
        printf("arg %d: %s\n", i, argv[i]);
    }
    fflush(stdout);
    const char *code = getenv("EXIT_CODE");
    if (code) {
        fprintf(stderr, "exiting with %s\n", code);
    }
    return code ? atoi(code) : 0;
}
