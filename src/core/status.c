#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define MOE_ERRBUF 1024

static _Thread_local char err_msg[MOE_ERRBUF];
static _Thread_local moe_status err_code;

moe_status moe_error(moe_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    err_code = code;
    return code;
}

moe_status moe_error_context(moe_status code, const char *fmt, ...) {
    if (code == MOE_OK) return code;
    char prefix[256], old[MOE_ERRBUF];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err_msg, sizeof old);
    /* truncation of very long chains is fine: the innermost message comes last */
    size_t n = strlen(prefix);
    if (n > sizeof err_msg - 3) n = sizeof err_msg - 3;
    memcpy(err_msg, prefix, n);
    memcpy(err_msg + n, ": ", 2);
    size_t rest = sizeof err_msg - n - 3;
    size_t m = strnlen(old, rest);
    memcpy(err_msg + n + 2, old, m);
    err_msg[n + 2 + m] = 0;
    err_code = code;
    return code;
}

const char *moe_last_error(void) { return err_msg[0] ? err_msg : "no error"; }
moe_status moe_last_status(void) { return err_code; }
void moe_clear_error(void) { err_msg[0] = 0; err_code = MOE_OK; }

const char *moe_status_name(moe_status s) {
    switch (s) {
    case MOE_OK: return "ok";
    case MOE_ERR_ARG: return "bad argument";
    case MOE_ERR_SHAPE: return "shape mismatch";
    case MOE_ERR_DTYPE: return "dtype error";
    case MOE_ERR_DEVICE: return "device error";
    case MOE_ERR_RANGE: return "out of range";
    case MOE_ERR_OOM: return "out of memory";
    case MOE_ERR_IO: return "i/o error";
    case MOE_ERR_STATE: return "invalid state";
    case MOE_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}
