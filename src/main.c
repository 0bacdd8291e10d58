/* moelab: the program. Runs Lua recipes and -e snippets, and opens an
 * interactive REPL with `moe` preloaded.
 *
 *   moelab [options] [script [args...]]
 *
 * Lua sources are found next to the executable (<dir>/lua/?.lua and
 * <dir>/lua/?/init.lua, after $MOELAB_LUA_PATH when set); the C module is
 * registered as package.preload["moelab.core"]; `moe = require "moelab"` is
 * set as a global before any user code runs.
 *
 * Process-wide mutable state, and why it cannot live in a context struct:
 *   sig_state     the Lua state a SIGINT handler must interrupt (a signal
 *                 handler receives no user pointer). Set only while Lua code
 *                 runs under run_protected().
 *   sig_pending   set by the prompt-time SIGINT handler so the REPL can tell
 *                 Ctrl-C from Ctrl-D when readline() returns NULL.
 *   Tab completion keeps its Lua state in repl_complete.c, for the same
 *   reason (libedit's completion callback receives no user pointer).
 * libedit itself keeps its history and terminal state globally.
 *
 * Ctrl-C: a SIGINT while Lua runs arms a hook that raises "interrupted" at
 * the next Lua call/return/instruction count. LuaJIT does not run hooks
 * inside JIT-compiled traces, so a pure-Lua loop that never leaves its
 * trace (`while true do x = x + 1 end`) is not interrupted by the first
 * Ctrl-C; the handler is one-shot, so a second Ctrl-C ends the process. A
 * long single C call is interrupted when it returns to Lua.
 *
 * The REPL defines a global exit([code]) (and, at a terminal, wraps
 * os.exit) so that leaving saves the history first. */
#include <lauxlib.h>
#include <lua.h>
#include <luajit.h>
#include <lualib.h>

#include <editline/readline.h>

#include "repl_complete.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef MOELAB_VERSION
#define MOELAB_VERSION "unknown"
#endif

int luaopen_moelab_core(lua_State *L);

#define PROMPT1 "moe> "
#define PROMPT2 "...> "
#define HISTORY_MAX 1000

/* ------------------------------------------------------------------ options */

typedef struct {
    int argc;
    char **argv;
    int script;          /* index of the script in argv, 0 when none */
    int interactive;     /* -i */
    int want_help, want_version;
    const char **exec;   /* -e chunks, in order */
    int nexec;
    const char *threads; /* --threads N */
    const char *device;  /* --device D */
    const char *nproc;   /* --nproc N: relaunch under mpirun with N local ranks */
    int nproc_at, nproc_len;   /* where --nproc sits in argv (1 or 2 entries) */
    int status;          /* exit status decided inside the protected main */
} options;

static const char *progname(const options *o) {
    return o->argc > 0 && o->argv[0] && o->argv[0][0] ? o->argv[0] : "moelab";
}

static void print_usage(FILE *f, const char *prog) {
    fprintf(f,
        "usage: %s [options] [script [args...]]\n"
        "       %s report RUN_DIR [-o OUT.pdf|.html|.png] [--format pdf,html,png]\n"
        "\n"
        "Runs a moelab recipe (a Lua script), or opens the REPL when no script is given.\n"
        "`moelab report` writes a routing report of a run directory (see 'moelab report --help';\n"
        "a script named report runs as ./report).\n"
        "The moelab API is preloaded as the global `moe`.\n"
        "\n"
        "options:\n"
        "  -e CODE        run the Lua CODE (repeatable; runs in order, before the script)\n"
        "  -i             enter the REPL after running the script and -e code\n"
        "  -              read the script from standard input\n"
        "  --threads N    use N CPU worker threads (sets MOELAB_NUM_THREADS)\n"
        "  --device D     default device hint, cpu or cuda[:N] (sets MOELAB_DEVICE)\n"
        "  --nproc N      run N local ranks: execs `mpirun --oversubscribe -np N moelab ...`\n"
        "                 (mpirun from PATH or $MOELAB_MPIRUN); see moe.distributed\n"
        "  -v, --version  print the version and exit\n"
        "  -h, --help     print this help and exit\n"
        "  --             stop handling options\n"
        "\n"
        "script arguments are in the global `arg` (arg[0] is the script) and in `...`.\n"
        "\n"
        "REPL:\n"
        "  =expr or expr  prints the value(s) (tab-separated; tensors via tostring)\n"
        "  statements     run as typed; incomplete input continues on a '...>' line\n"
        "  TAB            completes globals and fields: moe.ra<TAB>, t:<TAB> (methods)\n"
        "  history        kept in ~/.moelab_history ($MOELAB_HISTORY overrides, empty disables)\n"
        "  Ctrl-C         interrupts a running computation; at the prompt, drops the line\n"
        "  Ctrl-D, exit() leaves the REPL\n"
        "\n"
        "environment:\n"
        "  MOELAB_LUA_PATH    extra Lua search path, searched before the bundled lua/ directory\n"
        "  MOELAB_NUM_THREADS, MOELAB_DEVICE   as set by --threads and --device\n",
        prog, prog);
}

static int usage_error(const options *o, const char *fmt, const char *what) {
    fprintf(stderr, "%s: ", progname(o));
    fprintf(stderr, fmt, what);
    fprintf(stderr, "\nusage: %s [options] [script [args...]]  (try '%s --help')\n", progname(o),
            progname(o));
    return 2;
}

static int valid_threads(const char *s) {
    if (!*s) return 0;
    for (const char *p = s; *p; p++)
        if (*p < '0' || *p > '9') return 0;
    long v = strtol(s, NULL, 10);
    return v >= 1 && v <= 4096;
}

static int valid_device(const char *s) {
    if (!strcmp(s, "cpu") || !strcmp(s, "cuda")) return 1;
    if (strncmp(s, "cuda:", 5) || !s[5]) return 0;
    for (const char *p = s + 5; *p; p++)
        if (*p < '0' || *p > '9') return 0;
    return 1;
}

/* Returns 0, or the exit status for a usage error. */
static int parse_options(options *o) {
    int i;
    for (i = 1; i < o->argc; i++) {
        const char *a = o->argv[i];
        if (a[0] != '-' || !strcmp(a, "-")) break; /* the script */
        if (!strcmp(a, "--")) { i++; break; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) o->want_help = 1;
        else if (!strcmp(a, "-v") || !strcmp(a, "--version")) o->want_version = 1;
        else if (!strcmp(a, "-i")) o->interactive = 1;
        else if (!strncmp(a, "-e", 2)) {
            const char *code = a[2] ? a + 2 : (i + 1 < o->argc ? o->argv[++i] : NULL);
            if (!code) return usage_error(o, "option '%s' needs an argument", "-e");
            o->exec[o->nexec++] = code;
        } else if (!strcmp(a, "--threads") || !strncmp(a, "--threads=", 10)) {
            const char *v = a[9] == '=' ? a + 10 : (i + 1 < o->argc ? o->argv[++i] : NULL);
            if (!v) return usage_error(o, "option '%s' needs an argument", "--threads");
            if (!valid_threads(v)) return usage_error(o, "--threads wants a positive integer, got '%s'", v);
            o->threads = v;
        } else if (!strcmp(a, "--device") || !strncmp(a, "--device=", 9)) {
            const char *v = a[8] == '=' ? a + 9 : (i + 1 < o->argc ? o->argv[++i] : NULL);
            if (!v) return usage_error(o, "option '%s' needs an argument", "--device");
            if (!valid_device(v)) return usage_error(o, "--device wants cpu, cuda or cuda:N, got '%s'", v);
            o->device = v;
        } else if (!strcmp(a, "--nproc") || !strncmp(a, "--nproc=", 8)) {
            o->nproc_at = i;
            const char *v = a[7] == '=' ? a + 8 : (i + 1 < o->argc ? o->argv[++i] : NULL);
            if (!v) return usage_error(o, "option '%s' needs an argument", "--nproc");
            if (!valid_threads(v)) return usage_error(o, "--nproc wants a positive integer, got '%s'", v);
            o->nproc = v;
            o->nproc_len = i - o->nproc_at + 1;
        } else {
            return usage_error(o, "unknown option '%s'", a);
        }
    }
    o->script = i < o->argc ? i : 0;
    return 0;
}

/* ----------------------------------------------------------- --nproc N */

/* `moelab --nproc N ARGS` becomes `mpirun --oversubscribe -np N
 * [--allow-run-as-root] /path/to/moelab ARGS` (ARGS without --nproc): mpirun
 * starts the ranks, wires their stdio and ends the whole job when one rank
 * dies, and moe.dist.init() then finds OMPI_COMM_WORLD_SIZE set. mpirun is
 * $MOELAB_MPIRUN when set, else the first on PATH. Returns only on failure. */
static int find_on_path(const char *name, char *out, size_t n) {
    const char *path = getenv("PATH");
    if (!path || !*path) path = "/usr/local/bin:/usr/bin:/bin";
    while (*path) {
        const char *end = strchr(path, ':');
        size_t len = end ? (size_t)(end - path) : strlen(path);
        if (len > 0 && len + strlen(name) + 2 <= n) {
            memcpy(out, path, len);
            out[len] = '/';
            strcpy(out + len + 1, name);
            if (access(out, X_OK) == 0) return 0;
        }
        if (!end) break;
        path = end + 1;
    }
    return -1;
}

static int exec_nproc(options *o) {
    const char *env_run = getenv("MOELAB_MPIRUN");
    char mpirun[PATH_MAX], self[PATH_MAX];
    if (env_run && *env_run) {
        snprintf(mpirun, sizeof mpirun, "%s", env_run);
    } else if (find_on_path("mpirun", mpirun, sizeof mpirun) != 0) {
        fprintf(stderr, "%s: --nproc needs mpirun (OpenMPI) on PATH, and found none: install openmpi-bin "
                        "(Debian: apt-get install openmpi-bin libopenmpi-dev), or set MOELAB_MPIRUN\n",
                progname(o));
        return 1;
    }
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        if (!realpath(o->argv[0], self)) { fprintf(stderr, "%s: cannot find its own executable\n", progname(o)); return 1; }
    } else {
        self[n] = '\0';
    }
    char **av = calloc((size_t)o->argc + 8, sizeof *av);
    if (!av) { fprintf(stderr, "%s: out of memory\n", progname(o)); return 1; }
    int k = 0;
    av[k++] = mpirun;
    av[k++] = "--oversubscribe";
    av[k++] = "-np";
    av[k++] = (char *)o->nproc;
    if (geteuid() == 0) av[k++] = "--allow-run-as-root";
    av[k++] = self;
    for (int i = 1; i < o->argc; i++)
        if (i < o->nproc_at || i >= o->nproc_at + o->nproc_len) av[k++] = o->argv[i];
    av[k] = NULL;
    fflush(stdout);
    execv(mpirun, av);
    fprintf(stderr, "%s: cannot run %s: %s\n", progname(o), mpirun, strerror(errno));
    free(av);
    return 1;
}

/* ------------------------------------------------------- errors and signals */

static lua_State *volatile sig_state;
static volatile sig_atomic_t sig_pending;

static void interrupt_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    luaL_error(L, "interrupted");
}

/* Runs in signal context: arms a hook that raises the error at the next
 * Lua call, return or instruction count. The handler is installed with
 * SA_RESETHAND, so a second Ctrl-C (e.g. while a JIT-compiled loop never
 * reaches a hook) terminates the process as usual. */
static void on_sigint_running(int sig) {
    (void)sig;
    lua_State *L = sig_state;
    if (L) lua_sethook(L, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

static void on_sigint_prompt(int sig) {
    (void)sig;
    sig_pending = 1;
}

/* Message handler: turns the error object into a string with a traceback.
 * Upvalue 1 true = terse (REPL): no traceback when the error comes straight
 * from the entered chunk (at most one Lua frame on the stack). */
static int msghandler(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            msg = lua_tostring(L, -1);
        else
            msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    if (lua_toboolean(L, lua_upvalueindex(1))) {
        lua_Debug ar;
        int lua_frames = 0;
        for (int lvl = 1; lua_getstack(L, lvl, &ar); lvl++) {
            lua_getinfo(L, "S", &ar);
            if (ar.what[0] != 'C') lua_frames++;
        }
        if (lua_frames <= 1) {
            lua_pushstring(L, msg);
            return 1;
        }
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* Calls the function below nargs arguments on the stack, with the message
 * handler and the SIGINT hook armed. Leaves results (or the message). */
static int run_protected(lua_State *L, int nargs, int nresults, int terse) {
    int base = lua_gettop(L) - nargs;
    lua_pushboolean(L, terse);
    lua_pushcclosure(L, msghandler, 1);
    lua_insert(L, base);
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint_running;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    sig_state = L;
    sigaction(SIGINT, &sa, &old);
    int status = lua_pcall(L, nargs, nresults, base);
    sigaction(SIGINT, &old, NULL);
    sig_state = NULL;
    lua_sethook(L, NULL, 0, 0); /* a Ctrl-C that came too late to fire */
    lua_remove(L, base);
    return status;
}

/* Prints the error message on top of the stack and pops it. */
static void report(lua_State *L, const char *prefix) {
    const char *msg = lua_tostring(L, -1);
    fflush(stdout);
    fprintf(stderr, "%s%s\n", prefix, msg ? msg : "(error object is not a string)");
    fflush(stderr);
    lua_pop(L, 1);
}

/* --------------------------------------------------------------- setup */

/* The directory holding the executable, without a trailing slash. */
static int exe_dir(char *buf, size_t size, const char *argv0) {
    ssize_t n = readlink("/proc/self/exe", buf, size - 1);
    if (n > 0) {
        buf[n] = '\0';
    } else if (!argv0 || !realpath(argv0, buf)) {
        return -1;
    }
    char *slash = strrchr(buf, '/');
    if (!slash) return -1;
    if (slash == buf) slash[1] = '\0';
    else *slash = '\0';
    return 0;
}

static void set_package_path(lua_State *L, const char *argv0) {
    char dir[PATH_MAX];
    lua_getglobal(L, "package");
    int n = 0;
    const char *extra = getenv("MOELAB_LUA_PATH");
    if (extra && *extra) {
        lua_pushstring(L, extra);
        n++;
        if (extra[strlen(extra) - 1] != ';') { lua_pushliteral(L, ";"); n++; }
    }
    if (exe_dir(dir, sizeof dir, argv0) == 0) {
        lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua;", dir, dir);
        n++;
    }
    lua_getfield(L, -1 - n, "path");
    n++;
    lua_concat(L, n);
    lua_setfield(L, -2, "path");

    /* C modules shipped next to the program: lib/moelab/viz.so (moelab.viz,
     * built only where cairo is) is found as require "moelab.viz". */
    if (exe_dir(dir, sizeof dir, argv0) == 0) {
        lua_pushfstring(L, "%s/lib/?.so;", dir);
        lua_getfield(L, -2, "cpath");
        lua_concat(L, 2);
        lua_setfield(L, -2, "cpath");
    }

    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_moelab_core);
    lua_setfield(L, -2, "moelab.core");
    lua_pop(L, 2);
}

/* arg as the standalone interpreter builds it: the script at 0, its
 * arguments at 1.., the program and options at negative indices. */
static void set_arg_table(lua_State *L, const options *o) {
    int zero = o->script ? o->script : 0;
    lua_createtable(L, o->argc - zero, zero);
    for (int i = 0; i < o->argc; i++) {
        lua_pushstring(L, o->argv[i]);
        lua_rawseti(L, -2, i - zero);
    }
    lua_setglobal(L, "arg");
}

static int load_moelab(lua_State *L) {
    lua_getglobal(L, "require");
    lua_pushliteral(L, "moelab");
    int st = run_protected(L, 1, 1, 0);
    if (st != 0) {
        lua_pushfstring(L, "cannot load the moelab Lua API: %s", lua_tostring(L, -1));
        lua_remove(L, -2);
        return st;
    }
    lua_setglobal(L, "moe");
    return 0;
}

/* ---------------------------------------------------------------- REPL */

/* Replaces each value on the stack by tostring(value) and writes them
 * tab-separated on one line. Runs protected: __tostring may fail. */
static int print_values(lua_State *L) {
    int n = lua_gettop(L);
    if (n == 0) return 0;
    /* moe.repr when moelab loaded (tables print as constructors), else tostring */
    lua_getglobal(L, "moe");
    if (lua_istable(L, -1)) lua_getfield(L, -1, "repr");
    else lua_pushnil(L);
    lua_remove(L, -2);
    if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1);
        lua_getglobal(L, "tostring");
    }
    for (int i = 1; i <= n; i++) {
        lua_pushvalue(L, -1);
        lua_pushvalue(L, i);
        lua_call(L, 1, 1);
        if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
            return luaL_error(L, "printing a value must give a string");
        lua_replace(L, i);
    }
    lua_pop(L, 1);
    for (int i = 1; i <= n; i++) {
        size_t len;
        const char *s = lua_tolstring(L, i, &len);
        fwrite(s, 1, len, stdout);
        fputc(i < n ? '\t' : '\n', stdout);
    }
    fflush(stdout);
    return 0;
}

static int ends_with_eof(const char *msg) {
    static const char tail[] = "<eof>'";
    size_t n = strlen(msg), k = sizeof tail - 1;
    return n >= k && !memcmp(msg + n - k, tail, k);
}

typedef struct {
    int tty;
    FILE *in;
    char *getline_buf;
    size_t getline_cap;
} line_reader;

/* Returns a malloc'ed line without its newline, or NULL at end of input.
 * *cancelled is set when the user pressed Ctrl-C at the prompt. */
static char *read_line(line_reader *r, const char *prompt, int *cancelled) {
    *cancelled = 0;
    if (r->tty) {
        struct sigaction sa, old;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_sigint_prompt;
        sigemptyset(&sa.sa_mask);
        sig_pending = 0;
        sigaction(SIGINT, &sa, &old);
        char *line = readline(prompt);
        sigaction(SIGINT, &old, NULL);
        if (sig_pending) {
            sig_pending = 0;
            *cancelled = 1;
            free(line);
            return NULL;
        }
        return line;
    }
    ssize_t n = getline(&r->getline_buf, &r->getline_cap, r->in);
    if (n < 0) return NULL;
    while (n > 0 && (r->getline_buf[n - 1] == '\n' || r->getline_buf[n - 1] == '\r')) n--;
    r->getline_buf[n] = '\0';
    return strdup(r->getline_buf);
}

static int is_blank(const char *s) {
    for (; *s; s++)
        if (*s != ' ' && *s != '\t') return 0;
    return 1;
}

static int identity(lua_State *L) {
    return lua_gettop(L);
}

/* Reads one complete chunk and leaves its compiled function, followed by
 * its arguments, on the stack. Returns 1 + the number of arguments when a
 * chunk was loaded, 0 = nothing to run (blank line, Ctrl-C, or a syntax
 * error already reported), -1 = end of input. */
static int read_chunk(lua_State *L, line_reader *r) {
    int cancelled;
    char *line = read_line(r, PROMPT1, &cancelled);
    if (!line) {
        if (cancelled) { fputc('\n', stdout); fflush(stdout); return 0; }
        return -1;
    }
    if (is_blank(line)) { free(line); return 0; }
    int force_expr = line[0] == '=';
    lua_pushstring(L, line); /* the chunk so far, as typed */
    free(line);

    for (;;) {
        size_t len;
        const char *src = lua_tolstring(L, -1, &len);
        const char *body = src + force_expr;
        /* Expressions print their values: try the expression form first.
         * It is compiled as `return (...)(expr)` and run with an identity
         * function as its argument, so a call in expr is not a tail call and
         * error() still reports "stdin:N:". The newline ends a trailing
         * comment. */
        lua_pushliteral(L, "return (...)(");
        lua_pushstring(L, body);
        lua_pushliteral(L, "\n)");
        lua_concat(L, 3);
        if (luaL_loadbuffer(L, lua_tostring(L, -1), lua_objlen(L, -1), "=stdin") == 0) {
            if (r->tty) add_history(src); /* the whole chunk as one history entry */
            lua_remove(L, -2);
            lua_remove(L, -2);
            lua_pushcfunction(L, identity);
            return 2;
        }
        lua_pop(L, 2);

        /* Then as statements ("=expr" is "return expr", as in lua.c). */
        if (force_expr) lua_pushfstring(L, "return %s", body);
        else lua_pushvalue(L, -1);
        int st = luaL_loadbuffer(L, lua_tostring(L, -1), lua_objlen(L, -1), "=stdin");
        lua_remove(L, -2);
        int incomplete = st == LUA_ERRSYNTAX && ends_with_eof(lua_tostring(L, -1));
        if (st == LUA_ERRSYNTAX && !incomplete && !force_expr) {
            /* An unfinished expression ("{", "f(") is not a statement either. */
            lua_pushfstring(L, "return %s", body);
            int st2 = luaL_loadbuffer(L, lua_tostring(L, -1), lua_objlen(L, -1), "=stdin");
            incomplete = st2 == LUA_ERRSYNTAX && ends_with_eof(lua_tostring(L, -1));
            lua_pop(L, 2);
        }
        if (r->tty && !incomplete) add_history(src);
        if (st == 0) {
            lua_remove(L, -2);
            return 1;
        }
        if (!incomplete) {
            lua_remove(L, -2);
            report(L, "error: ");
            return 0;
        }
        char *more = read_line(r, PROMPT2, &cancelled);
        if (!more) {
            lua_remove(L, -2);
            if (cancelled) { lua_pop(L, 1); fputc('\n', stdout); fflush(stdout); return 0; }
            report(L, "error: "); /* end of input inside a chunk: say why it was incomplete */
            return -1;
        }
        lua_pop(L, 1);
        lua_pushliteral(L, "\n");
        lua_pushstring(L, more);
        free(more);
        lua_concat(L, 3);
    }
}

/* Tab completion lives in repl_complete.c. */

static int l_repl_exit(lua_State *L) {
    const char *hist = lua_tostring(L, lua_upvalueindex(2));
    if (hist) write_history(hist);
    fflush(stdout);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

static void repl(lua_State *L) {
    line_reader r = {0};
    r.tty = isatty(STDIN_FILENO);
    r.in = stdin;
    const char *hist = NULL;

    if (r.tty) {
        const char *env = getenv("MOELAB_HISTORY");
        if (env) {
            if (*env) { lua_pushstring(L, env); hist = lua_tostring(L, -1); }
        } else if (getenv("HOME")) {
            hist = lua_pushfstring(L, "%s/.moelab_history", getenv("HOME"));
        }
        if (!hist) lua_pushnil(L);
        int hist_idx = lua_gettop(L); /* keeps the path string alive */
        rl_readline_name = "moelab";
        moe_repl_completion_install(L);
        using_history();
        stifle_history(HISTORY_MAX);
        if (hist) read_history(hist);

        lua_getglobal(L, "os");
        lua_getfield(L, -1, "exit");
        lua_pushvalue(L, hist_idx);
        lua_pushcclosure(L, l_repl_exit, 2);
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, "exit");
        lua_setglobal(L, "exit");
        lua_pop(L, 1);
        lua_getglobal(L, "moe");
        printf("moelab %s (%s) -- %s; Ctrl-D or exit() to leave\n", MOELAB_VERSION, LUAJIT_VERSION,
               lua_isnil(L, -1) ? "`moe` failed to load" : "`moe` is loaded");
        lua_pop(L, 1);
        fflush(stdout);
    } else {
        lua_getglobal(L, "os");
        lua_getfield(L, -1, "exit");
        lua_setglobal(L, "exit");
        lua_pop(L, 1);
    }

    for (;;) {
        int st = read_chunk(L, &r);
        if (st < 0) break;
        if (st == 0) continue;
        int base = lua_gettop(L) - (st - 1);
        if (run_protected(L, st - 1, LUA_MULTRET, 1) != 0) {
            report(L, "error: ");
        } else if (lua_gettop(L) >= base) {
            int n = lua_gettop(L) - base + 1;
            lua_pushcfunction(L, print_values);
            lua_insert(L, base);
            if (run_protected(L, n, 0, 1) != 0) report(L, "error: ");
        }
        lua_settop(L, base - 1);
        fflush(stdout);
    }
    if (r.tty) {
        fputc('\n', stdout);
        moe_repl_completion_install(NULL);
        if (hist) write_history(hist); /* failure to save is not worth a message */
        lua_pop(L, 1);
    }
    free(r.getline_buf);
    fflush(stdout);
}

/* ------------------------------------------------------------ main */

static int run_chunk(lua_State *L, int st, int nargs) {
    if (st != 0) {
        lua_insert(L, -1 - nargs);
        lua_pop(L, nargs);
        return st;
    }
    return run_protected(L, nargs, 0, 0);
}

static int pmain(lua_State *L) {
    options *o = lua_touserdata(L, 1);
    lua_settop(L, 0);
    o->status = 1;

    lua_gc(L, LUA_GCSTOP, 0);
    luaL_openlibs(L);
    lua_gc(L, LUA_GCRESTART, 0);
    set_package_path(L, o->argv[0]);
    set_arg_table(L, o);

    int repl_only = !o->script && o->nexec == 0;
    if (load_moelab(L) != 0) {
        /* A bare REPL still starts, so a broken Lua API can be debugged in it. */
        report(L, repl_only ? "moelab: warning: " : "moelab: ");
        if (!repl_only) return 0;
    }

    for (int i = 0; i < o->nexec; i++) {
        const char *code = o->exec[i];
        int st = luaL_loadbuffer(L, code, strlen(code), "=(command line)");
        if (run_chunk(L, st, 0) != 0) { report(L, "moelab: "); return 0; }
    }

    /* `moelab report RUN_DIR ...`: the report subcommand. Only the bare word
     * dispatches; a script of that name still runs as `moelab ./report`. */
    if (o->script && !strcmp(o->argv[o->script], "report")) {
        lua_getglobal(L, "require");
        lua_pushliteral(L, "moelab.report");
        if (run_protected(L, 1, 1, 0) != 0) { report(L, "moelab: "); return 0; }
        lua_getfield(L, -1, "main");
        lua_remove(L, -2);
        lua_getglobal(L, "arg");
        if (run_protected(L, 1, 1, 0) != 0) { report(L, "moelab: "); return 0; }
        int code = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : 0;
        lua_pop(L, 1);
        if (o->interactive) repl(L);
        o->status = code;
        return 0;
    }

    if (o->script) {
        const char *path = o->argv[o->script];
        int st = luaL_loadfile(L, strcmp(path, "-") ? path : NULL);
        int nargs = 0;
        if (st == 0) {
            nargs = o->argc - o->script - 1;
            luaL_checkstack(L, nargs + 8, "too many script arguments");
            for (int i = o->script + 1; i < o->argc; i++) lua_pushstring(L, o->argv[i]);
        }
        if (run_chunk(L, st, nargs) != 0) { report(L, "moelab: "); return 0; }
    }

    if (o->interactive || repl_only) repl(L);
    o->status = 0;
    return 0;
}

int main(int argc, char **argv) {
    /* Training allocates and frees the same large activation buffers every
     * step. glibc would serve each from a fresh mmap (and zero its pages on
     * first touch); keeping freed blocks in the heap avoids that. This is the
     * program's policy; the library itself sets nothing process-wide here. */
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
    options o;
    memset(&o, 0, sizeof o);
    o.argc = argc;
    o.argv = argv;
    o.exec = calloc((size_t)argc + 1, sizeof *o.exec);
    if (!o.exec) { fprintf(stderr, "moelab: out of memory\n"); return 1; }
    int st = parse_options(&o);
    if (st) { free(o.exec); return st; }
    if (o.want_help) {
        print_usage(stdout, progname(&o));
        free(o.exec);
        return 0;
    }
    if (o.want_version) {
        const char *jit = LUAJIT_VERSION;
        if (!strncmp(jit, "LuaJIT ", 7)) jit += 7;
#ifdef MOELAB_CUDA
        const char *cuda = "yes";
#else
        const char *cuda = "no";
#endif
        printf("moelab %s (LuaJIT %s, CUDA %s)\n", MOELAB_VERSION, jit, cuda);
        free(o.exec);
        return 0;
    }
    if (o.nproc) {
        if (getenv("OMPI_COMM_WORLD_SIZE")) {
            fprintf(stderr, "%s: --nproc inside an mpirun job (OMPI_COMM_WORLD_SIZE is set): "
                            "use one or the other\n", progname(&o));
            free(o.exec);
            return 2;
        }
        int rc = exec_nproc(&o);
        free(o.exec);
        return rc;
    }
    /* Before the core loads: it reads these when it creates its context. */
    if (o.threads) setenv("MOELAB_NUM_THREADS", o.threads, 1);
    if (o.device) setenv("MOELAB_DEVICE", o.device, 1);

    lua_State *L = luaL_newstate();
    if (!L) { fprintf(stderr, "moelab: cannot create a Lua state (out of memory)\n"); free(o.exec); return 1; }
    if (lua_cpcall(L, pmain, &o) != 0) {
        const char *msg = lua_tostring(L, -1);
        fprintf(stderr, "moelab: %s\n", msg ? msg : "(error object is not a string)");
        o.status = 1;
    }
    fflush(stdout);
    lua_close(L);
    free(o.exec);
    return o.status;
}
