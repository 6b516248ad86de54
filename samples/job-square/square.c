// A Job's worker, the same source as a WASI command and as a static Linux binary: prints the
// square of its completion index (JOB_COMPLETION_INDEX, 0 when unset) and that many digits of
// pi after "3." (a spigot, so each index does a little real work). SLEEP_SECONDS makes it
// wait first; EXIT_CODE makes it exit with that code.
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void pi_digits(int n, char *out) {
    // Rabinowitz–Wagon spigot: n + 1 digits of pi ("3" and n decimals).
    int len = (n + 2) * 10 / 3 + 2;
    int *a = malloc(sizeof(int) * len);
    for (int i = 0; i < len; i++) a[i] = 2;
    int nines = 0, predigit = 0, pos = 0;
    for (int j = 0; j < n + 2; j++) {
        int q = 0;
        for (int i = len - 1; i > 0; i--) {
            int x = 10 * a[i] + q * (i + 1);
            a[i] = x % (2 * i + 1);
            q = x / (2 * i + 1);
        }
        int x = 10 * a[0] + q;
        a[0] = x % 10;
        q = x / 10;
        if (q == 9) {
            nines++;
        } else if (q == 10) {
            out[pos++] = '0' + predigit + 1;
            for (; nines > 0; nines--) out[pos++] = '0';
            predigit = 0;
        } else {
            if (j > 0) out[pos++] = '0' + predigit;
            predigit = q;
            for (; nines > 0; nines--) out[pos++] = '9';
        }
    }
    out[pos] = 0;
    free(a);
}

int main(void) {
    const char *s = getenv("SLEEP_SECONDS");
    if (s) sleep((unsigned)atoi(s));
    const char *ix = getenv("JOB_COMPLETION_INDEX");
    long i = ix ? atol(ix) : 0;
    int n = (int)(i < 0 ? 0 : i > 2000 ? 2000 : i);
    char *digits = malloc(n + 8);
    pi_digits(n, digits);
    printf("index %ld square %ld pi 3.%s\n", i, i * i, digits + 1);
    fflush(stdout);
    free(digits);
    const char *code = getenv("EXIT_CODE");
    return code ? atoi(code) : 0;
}
