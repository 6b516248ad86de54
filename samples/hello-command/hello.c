// A WASI command for run-to-completion pods: prints its arguments and the HOSTNAME (pod name)
// it was given, the content of the file named by CAT_FILE if set (a volume), then exits with
// the code in EXIT_CODE (default 0).
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    const char *pod = getenv("HOSTNAME");
    printf("hello from %s\n", pod ? pod : "(no HOSTNAME)");
    for (int i = 1; i < argc; i++) {
        printf("arg %d: %s\n", i, argv[i]);
    }
    const char *cat = getenv("CAT_FILE");
    if (cat) {
        FILE *f = fopen(cat, "r");
        if (!f) {
            fprintf(stderr, "cannot open %s\n", cat);
            return 2;
        }
        char buf[512];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
            fwrite(buf, 1, n, stdout);
        }
        fclose(f);
    }
    fflush(stdout);
    const char *code = getenv("EXIT_CODE");
    if (code) {
        fprintf(stderr, "exiting with %s\n", code);
    }
    return code ? atoi(code) : 0;
}
