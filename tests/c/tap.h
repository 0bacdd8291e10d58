/* TAP output shared by the C tests: report() prints "ok N - name" or
 * "not ok N - name: why"; tap_done() prints the plan and gives main's exit
 * status. Each test is one translation unit, so the counters are its own. */
#ifndef MOE_TESTS_TAP_H
#define MOE_TESTS_TAP_H

#include <stdarg.h>
#include <stdio.h>

static int n_test, n_fail;

__attribute__((format(printf, 3, 4))) static void report(int ok, const char *name, const char *fmt, ...) {
    n_test++;
    if (ok) { printf("ok %d - %s\n", n_test, name); return; }
    n_fail++;
    char buf[1024] = "";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    printf("not ok %d - %s: %s\n", n_test, name, buf);
}

static int tap_done(void) {
    printf("1..%d\n", n_test);
    return n_fail ? 1 : 0;
}

#endif
