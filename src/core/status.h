/* Status codes and the thread-local error message.
 * Library functions never exit or abort on bad input: they return a status
 * (or NULL) after recording a human-readable message with moe_error(). */
#ifndef MOE_STATUS_H
#define MOE_STATUS_H

typedef enum {
    MOE_OK = 0,
    MOE_ERR_ARG,      /* bad argument value */
    MOE_ERR_SHAPE,    /* shapes do not agree */
    MOE_ERR_DTYPE,    /* unsupported or mismatched dtype */
    MOE_ERR_DEVICE,   /* device mismatch or unavailable backend */
    MOE_ERR_RANGE,    /* index out of range */
    MOE_ERR_OOM,      /* allocation failed */
    MOE_ERR_IO,       /* file or stream error */
    MOE_ERR_STATE,    /* call made in the wrong state (e.g. backward without forward) */
    MOE_ERR_INTERNAL
} moe_status;

/* Record a message for the calling thread and return `code`, so callers write
 * `return moe_error(MOE_ERR_SHAPE, "expected %d dims, got %d", a, b);`. */
moe_status moe_error(moe_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Prefix the current message with context ("linear.forward: ...") and pass the
 * status through; a no-op for MOE_OK. */
moe_status moe_error_context(moe_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

const char *moe_last_error(void);
moe_status moe_last_status(void);
void moe_clear_error(void);
const char *moe_status_name(moe_status s);

#define MOE_TRY(expr) do { moe_status _s = (expr); if (_s != MOE_OK) return _s; } while (0)

#endif
