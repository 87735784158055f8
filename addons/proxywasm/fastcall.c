/* fastcall.c: the host's guest calls and host calls without ctypes (CPython extension).
 *
 * The Proxy-Wasm host (addons/proxywasm/_wasmtime.py) crosses between Python and wasm about a
 * dozen times per request. Through ctypes each crossing costs 1-1.5 us; this module makes
 * them plain C calls:
 *
 * - checked(meter, on_failed, ctx, func, *params) / checked_nogil(...): a guest call through
 *   wasmtime_func_call_unchecked, with the i32/i64 params in a raw value array on the C
 *   stack; returns the i32 result. Then it ends the call's meter (meter[0] = None), and a
 *   failed call raises what on_failed(error, trap) raises, given the addresses of the
 *   wasmtime_error_t / wasm_trap_t, which it owns (it turns them into GuestTrap). checked
 *   keeps the GIL (the native epoch ticker needs none), checked_nogil releases it around the
 *   call, as ctypes' CDLL does. An outermost guest call sets the store's epoch deadline to
 *   the next tick first (wasmtime_context_set_epoch_deadline), so that only a tick during the
 *   call prompts it (see _wasmtime.py's deadlines). The host binds it to each instance with
 *   functools.partial, so that a guest call runs no Python frame of its own.
 * - define(...): defines a host function on a linker with a C trampoline as its
 *   wasmtime_func_unchecked_callback_t: it takes the GIL (a no-op when the guest call kept
 *   it), converts the raw arguments to ints (i32 unsigned, i64 signed), calls
 *   impl(active[0], *ints) through vectorcall, writes the i32 result in place, and turns an
 *   exception into a trap whose message fail(exception) gives (the same function the ctypes
 *   callback uses). While the guest call is measured (meter[0] is not None) or no VM is
 *   active, it calls the Python callback `fallback` instead, which does the bookkeeping.
 *   The env (impl, active, meter, fallback, fail) is released by wasmtime's finalizer.
 * - native forms: proxy_get_header_map_value and proxy_get_current_time_nanoseconds, defined
 *   with define(..., native), do their common case in C (a cache hit's header reads and clock
 *   reads) and leave every other case to impl, before any effect (see "Native forms" below).
 * - memory_size(ctx, memory) / memory_pages(ctx, memory): the linear memory's size.
 * - parse_map(data): the pairs of a serialized map (headers.py's decoder, for the maps a filter
 *   sends with each outbound call), or None where the Python decoder must decide.
 * - view_fields(fields): a request's header fields with lowercase names, and its Host and
 *   Authorization values, in one pass (headers.view_fields, on every request; the same loop
 *   in Python costs about a tenth of a cache hit).
 *
 * Nothing links against wasmtime: bind(path, val_size) resolves the few entry points with
 * dlsym from the library wasmtime-py already loaded (RTLD_NOLOAD), declared below as in
 * wasmtime 50's C API. Built by .ci/setup into _fastcall<EXT_SUFFIX>; without it the host
 * crosses through ctypes.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

/* ---------------------------------------------------------------------------------------- */
/* The wasmtime 50 C API, as much as is used (wasmtime/val.h, func.h, linker.h, ...)        */
/* ---------------------------------------------------------------------------------------- */

typedef struct wasmtime_context wasmtime_context_t;
typedef struct wasmtime_caller wasmtime_caller_t;
typedef struct wasmtime_error wasmtime_error_t;
typedef struct wasm_trap_t wasm_trap_t;
typedef struct wasmtime_linker wasmtime_linker_t;
typedef struct wasm_functype_t wasm_functype_t;
typedef struct wasmtime_func wasmtime_func_t;     /* only its address is passed here */
typedef struct wasmtime_memory wasmtime_memory_t; /* likewise */

typedef union wasmtime_val_raw {
    int32_t i32;
    int64_t i64;
    float f32;
    double f64;
    uint8_t v128[16];
    uint32_t anyref;
    uint32_t externref;
    uint32_t exnref;
    void *funcref;
} wasmtime_val_raw_t;

typedef wasm_trap_t *(*wasmtime_func_unchecked_callback_t)(void *env, wasmtime_caller_t *caller,
                                                           wasmtime_val_raw_t *args_and_results,
                                                           size_t num_args_and_results);
typedef wasmtime_error_t *(*func_call_unchecked_fn)(wasmtime_context_t *store,
                                                    const wasmtime_func_t *func,
                                                    wasmtime_val_raw_t *args_and_results,
                                                    size_t args_and_results_len,
                                                    wasm_trap_t **trap);
typedef wasmtime_error_t *(*linker_define_func_unchecked_fn)(
    wasmtime_linker_t *linker, const char *module, size_t module_len, const char *name,
    size_t name_len, const wasm_functype_t *ty, wasmtime_func_unchecked_callback_t cb,
    void *data, void (*finalizer)(void *));
typedef wasm_trap_t *(*trap_new_fn)(const char *msg, size_t msg_len);
typedef void (*trap_delete_fn)(wasm_trap_t *trap);
typedef void (*error_delete_fn)(wasmtime_error_t *error);
typedef void (*set_epoch_deadline_fn)(wasmtime_context_t *context, uint64_t ticks_beyond_current);
typedef size_t (*memory_data_size_fn)(const wasmtime_context_t *store,
                                      const wasmtime_memory_t *memory);
typedef uint64_t (*memory_size_fn)(const wasmtime_context_t *store,
                                   const wasmtime_memory_t *memory);
typedef uint8_t *(*memory_data_fn)(const wasmtime_context_t *store,
                                   const wasmtime_memory_t *memory);

static func_call_unchecked_fn wr_func_call;
static linker_define_func_unchecked_fn wr_define_func;
static trap_new_fn wr_trap_new;
static trap_delete_fn wr_trap_delete;
static error_delete_fn wr_error_delete;
static set_epoch_deadline_fn wr_set_epoch_deadline;
static memory_data_size_fn wr_memory_data_size;
static memory_size_fn wr_memory_size;
static memory_data_fn wr_memory_data;

/* How deep this thread is in guest calls: 0 outside any, 1 in a guest call, 2 in a guest call
 * made from a host call of one, ... */
static _Thread_local int wr_depth;

/* A guest call's raw value array: params and the result share it (as in _wasmtime.py). */
#define WR_SLOTS 16
/* Host functions with more params than this are defined through ctypes by the caller. */
#define WR_MAX_HOST_PARAMS 16

static PyObject *wr_mask32;      /* 0xFFFFFFFF, for a result that is not an int */

/* Allocation goes through these two, in one place (no GIL needed). */
#define WR_ALLOC(size) PyMem_RawCalloc(1, size)
#define WR_FREE(ptr) PyMem_RawFree(ptr)

/* ---------------------------------------------------------------------------------------- */
/* Helpers                                                                                  */
/* ---------------------------------------------------------------------------------------- */

/* A non-null address from a Python int; NULL with an exception set otherwise. */
static void *wr_address(PyObject *o, const char *what) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an address (int), not %.100s", what,
                     Py_TYPE(o)->tp_name);
        return NULL;
    }
    void *p = PyLong_AsVoidPtr(o);
    if (p == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "%s is a null address", what);
    return p;
}

/* 1 if bind() resolved the entry points; else 0 with RuntimeError set. */
static int wr_bound(void) {
    if (wr_func_call == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fastcall.bind() was not called");
        return 0;
    }
    return 1;
}

/* A guest call's parameter: any int in [-2**63, 2**64) as its low 64 bits (an i32 parameter
 * is read from the low half). Returns -1 with an exception set otherwise. */
static int wr_param(PyObject *o, int64_t *out) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "guest call parameters must be ints, not %.100s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(o);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) return -1;
        v = (long long)u;
    } else if (overflow < 0) {
        PyErr_SetString(PyExc_OverflowError, "guest call parameter below -2**63");
        return -1;
    } else if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Guest calls                                                                              */
/* ---------------------------------------------------------------------------------------- */

/* The guest call of checked(): args are (ctx, func, *params). Returns 0 with
 * *result set, or with *error or *trap set (owned by the caller) when the call trapped or
 * failed; -1 with TypeError/OverflowError/ValueError set for bad arguments (nothing was
 * called). With release_gil the GIL is released around the call; host calls re-take it. */
static int wr_call_core(PyObject *const *args, Py_ssize_t nargs, int release_gil,
                        int32_t *result, wasmtime_error_t **error_out, wasm_trap_t **trap_out) {
    if (!wr_bound()) return -1;
    if (nargs < 2 || nargs > 2 + WR_SLOTS) {
        PyErr_Format(PyExc_TypeError, "call(ctx, func, *params) takes 2 to %d arguments",
                     2 + WR_SLOTS);
        return -1;
    }
    wasmtime_context_t *ctx = wr_address(args[0], "ctx");
    if (ctx == NULL) return -1;
    const wasmtime_func_t *func = wr_address(args[1], "func");
    if (func == NULL) return -1;
    wasmtime_val_raw_t vals[WR_SLOTS];
    memset(vals, 0, sizeof vals);
    for (Py_ssize_t i = 2; i < nargs; i++) {
        if (wr_param(args[i], &vals[i - 2].i64) < 0) return -1;
    }
    wasm_trap_t *trap = NULL;
    wasmtime_error_t *error;
    /* An outermost call's first epoch prompt comes at the next tick, not at once for the
     * ticks that passed while no guest ran. A call made from a host call keeps its caller's
     * deadline, so that nesting never puts the caller's prompt off. */
    if (wr_depth == 0) wr_set_epoch_deadline(ctx, 1);
    wr_depth++;
    if (release_gil) {
        Py_BEGIN_ALLOW_THREADS
        error = wr_func_call(ctx, func, vals, WR_SLOTS, &trap);
        Py_END_ALLOW_THREADS
    } else {
        error = wr_func_call(ctx, func, vals, WR_SLOTS, &trap);
    }
    wr_depth--;
    *error_out = error;
    *trap_out = trap;
    *result = vals[0].i32;
    return 0;
}

/* checked(meter, on_failed, ctx, func, *params): the guest call, then meter[0] = None (the
 * meter of the call that ended, see _wasmtime.py), and a failed call becomes the exception
 * that on_failed(error, trap) raises (it owns both; see _wasmtime.py's _call_failed). The
 * host binds it to an instance with functools.partial: no Python frame per guest call.
 * Returns a new int (the i32 result, signed), or NULL with an exception set: also
 * TypeError/OverflowError/ValueError for bad arguments (nothing was called). */
static PyObject *wr_checked(PyObject *const *args, Py_ssize_t nargs, int release_gil) {
    if (nargs < 2 || !PyList_CheckExact(args[0]) || PyList_GET_SIZE(args[0]) < 1) {
        PyErr_SetString(PyExc_TypeError,
                        "checked(meter, on_failed, ctx, func, *params): meter must be a list");
        return NULL;
    }
    int32_t result;
    wasmtime_error_t *error;
    wasm_trap_t *trap;
    int rc = wr_call_core(args + 2, nargs - 2, release_gil, &result, &error, &trap);
    if (rc < 0) return NULL;
    PyObject *meter = args[0];
    PyObject *old = PyList_GET_ITEM(meter, 0);
    if (old != Py_None) { /* a GuestMeter: freeing it runs no Python code */
        Py_INCREF(Py_None);
        PyList_SET_ITEM(meter, 0, Py_None);
        Py_DECREF(old);
    }
    if (error == NULL && trap == NULL) {
        if (PyErr_Occurred()) return NULL; /* never expected: a callback leaves no exception */
        return PyLong_FromLong(result);
    }
    PyErr_Clear(); /* never expected besides a trap; on_failed says what failed */
    PyObject *e = PyLong_FromVoidPtr(error);
    PyObject *t = e ? PyLong_FromVoidPtr(trap) : NULL;
    if (t == NULL) {
        Py_XDECREF(e);
        if (error) wr_error_delete(error);
        if (trap) wr_trap_delete(trap);
        return NULL;
    }
    PyObject *call_args[2] = {e, t};
    PyObject *r = PyObject_Vectorcall(args[1], call_args, 2, NULL);
    Py_DECREF(e);
    Py_DECREF(t);
    if (r != NULL) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_SystemError, "checked(): on_failed returned instead of raising");
    }
    return NULL;
}

static PyObject *wr_checked_keep_gil(PyObject *Py_UNUSED(m), PyObject *const *args,
                                     Py_ssize_t nargs) {
    return wr_checked(args, nargs, 0);
}

static PyObject *wr_checked_nogil(PyObject *Py_UNUSED(m), PyObject *const *args,
                                  Py_ssize_t nargs) {
    return wr_checked(args, nargs, 1);
}

/* ---------------------------------------------------------------------------------------- */
/* Linear memory                                                                            */
/* ---------------------------------------------------------------------------------------- */

/* The (ctx, memory) arguments of memory_size/memory_pages. Returns 0, or -1 with an
 * exception set. */
static int wr_memory_args(PyObject *const *args, Py_ssize_t nargs, wasmtime_context_t **ctx,
                          wasmtime_memory_t **memory) {
    if (!wr_bound()) return -1;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "takes exactly 2 arguments (ctx, memory)");
        return -1;
    }
    *ctx = wr_address(args[0], "ctx");
    if (*ctx == NULL) return -1;
    *memory = wr_address(args[1], "memory");
    return *memory == NULL ? -1 : 0;
}

/* memory_size(ctx, memory): a new int, the size in bytes; NULL with an exception set. */
static PyObject *wr_memory_size_bytes(PyObject *Py_UNUSED(m), PyObject *const *args,
                                      Py_ssize_t nargs) {
    wasmtime_context_t *ctx;
    wasmtime_memory_t *memory;
    if (wr_memory_args(args, nargs, &ctx, &memory) < 0) return NULL;
    return PyLong_FromSize_t(wr_memory_data_size(ctx, memory));
}

/* memory_pages(ctx, memory): a new int, the size in 64 KiB pages; NULL with an exception set. */
static PyObject *wr_memory_pages(PyObject *Py_UNUSED(m), PyObject *const *args,
                                 Py_ssize_t nargs) {
    wasmtime_context_t *ctx;
    wasmtime_memory_t *memory;
    if (wr_memory_args(args, nargs, &ctx, &memory) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(wr_memory_size(ctx, memory));
}

/* ---------------------------------------------------------------------------------------- */
/* Serialized maps                                                                          */
/* ---------------------------------------------------------------------------------------- */

static uint32_t wr_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* parse_map(data): a serialized map (the Proxy-Wasm encoding: a little-endian u32 count N, N
 * pairs of u32 sizes (key, value), then every key and value each followed by a NUL; empty:
 * b"" or b"\0") as a new list of (key, value) bytes tuples. None if data is not bytes or does
 * not follow the encoding: headers.py's Python decoder then decides, and says where it is
 * broken. NULL with an exception set only when memory runs out. */
static PyObject *wr_parse_map(PyObject *Py_UNUSED(m), PyObject *data) {
    if (!PyBytes_Check(data)) Py_RETURN_NONE;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    uint64_t n = (uint64_t)PyBytes_GET_SIZE(data);
    if (n <= 1) {
        if (n == 0 || p[0] == 0) return PyList_New(0);
        Py_RETURN_NONE;
    }
    if (n < 4) Py_RETURN_NONE;
    uint32_t count = wr_le32(p);
    uint64_t pos = 4 + 8 * (uint64_t)count; /* no overflow: count < 2**32 */
    if (pos > n) Py_RETURN_NONE;
    PyObject *pairs = PyList_New((Py_ssize_t)count);
    if (pairs == NULL) return NULL;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t key_len = wr_le32(p + 4 + 8 * (uint64_t)i);
        uint64_t value_len = wr_le32(p + 8 + 8 * (uint64_t)i);
        uint64_t key_end = pos + key_len;
        uint64_t value_end = key_end + 1 + value_len;
        if (value_end + 1 > n || p[key_end] != 0 || p[value_end] != 0) {
            Py_DECREF(pairs); /* items not set yet are NULL, which list_dealloc skips */
            Py_RETURN_NONE;
        }
        PyObject *pair = PyTuple_New(2);
        PyObject *key = pair ? PyBytes_FromStringAndSize((const char *)p + pos,
                                                         (Py_ssize_t)key_len) : NULL;
        PyObject *value = key ? PyBytes_FromStringAndSize((const char *)p + key_end + 1,
                                                          (Py_ssize_t)value_len) : NULL;
        if (value == NULL) {
            Py_XDECREF(key);
            Py_XDECREF(pair);
            Py_DECREF(pairs);
            return NULL;
        }
        PyTuple_SET_ITEM(pair, 0, key);
        PyTuple_SET_ITEM(pair, 1, value);
        PyList_SET_ITEM(pairs, (Py_ssize_t)i, pair);
        pos = value_end + 1;
    }
    if (pos != n) {
        Py_DECREF(pairs);
        Py_RETURN_NONE;
    }
    return pairs;
}

/* view_fields(fields): one pass over a request's raw header fields (mitmproxy's
 * `headers.fields`, a tuple of (name, value) bytes tuples) for the addon's request hook:
 * (lowered, host, hosts, authorization), where lowered is a new list of the fields with
 * lowercase names (bytes.lower(): ASCII only) but Host (a filter sees it as :authority, as in
 * Envoy), host and authorization the values of the last Host and Authorization fields (None
 * if none) and hosts how many Host fields there are.
 * None if fields is not such a tuple (headers.view_fields_py then decides).
 * NULL with an exception set only when memory runs out. */
static PyObject *wr_view_fields(PyObject *Py_UNUSED(m), PyObject *fields) {
    if (!PyTuple_CheckExact(fields)) Py_RETURN_NONE;
    Py_ssize_t n = PyTuple_GET_SIZE(fields);
    long hosts = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyTuple_GET_ITEM(fields, i);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 0)) ||
            !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 1)))
            Py_RETURN_NONE;
        PyObject *name = PyTuple_GET_ITEM(pair, 0);
        if (PyBytes_GET_SIZE(name) == 4 && strncasecmp(PyBytes_AS_STRING(name), "host", 4) == 0)
            hosts++;
    }
    PyObject *lowered = PyList_New(n - hosts);
    if (lowered == NULL) return NULL;
    PyObject *host = Py_None, *authorization = Py_None;
    Py_ssize_t out_i = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyTuple_GET_ITEM(fields, i);
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        const char *raw = PyBytes_AS_STRING(name);
        Py_ssize_t len = PyBytes_GET_SIZE(name);
        Py_ssize_t upper = 0;
        while (upper < len && !(raw[upper] >= 'A' && raw[upper] <= 'Z')) upper++;
        PyObject *key;
        if (upper == len) { /* already lowercase: the same object, as a pair of its own */
            Py_INCREF(name);
            key = name;
        } else {
            key = PyBytes_FromStringAndSize(NULL, len);
            if (key == NULL) {
                Py_DECREF(lowered);
                return NULL;
            }
            char *out = PyBytes_AS_STRING(key);
            for (Py_ssize_t j = 0; j < len; j++)
                out[j] = (char)(raw[j] >= 'A' && raw[j] <= 'Z' ? raw[j] + 32 : raw[j]);
        }
        const char *k = PyBytes_AS_STRING(key);
        if (len == 4 && memcmp(k, "host", 4) == 0) {
            host = value; /* counted above; not in the filter's map */
            Py_DECREF(key);
            continue;
        }
        if (len == 13 && memcmp(k, "authorization", 13) == 0) authorization = value;
        PyObject *item = PyTuple_New(2);
        if (item == NULL) {
            Py_DECREF(key);
            Py_DECREF(lowered);
            return NULL;
        }
        Py_INCREF(value);
        PyTuple_SET_ITEM(item, 0, key);
        PyTuple_SET_ITEM(item, 1, value);
        PyList_SET_ITEM(lowered, out_i++, item);
    }
    PyObject *result = Py_BuildValue("(NOlO)", lowered, host, hosts, authorization);
    return result;
}

/* ---------------------------------------------------------------------------------------- */
/* Host calls                                                                               */
/* ---------------------------------------------------------------------------------------- */

typedef struct wr_host {
    PyObject *impl;     /* impl(vm, *params) -> int | None */
    PyObject *active;   /* list: [0] is the VM whose guest code runs, or None */
    PyObject *meter;    /* list: [0] is the running guest call's meter, or None */
    PyObject *fallback; /* the ctypes-path callback(env, caller, args, nargs) -> trap address */
    PyObject *fail;     /* fail(exception) -> the trap's message (logs a host bug) */
    Py_ssize_t nparams;
    int native; /* WR_NATIVE_*: a C form of the common case, or 0 */
    char wide[WR_MAX_HOST_PARAMS]; /* 1: an i64 (signed) parameter, 0: an i32 (unsigned) */
    struct wr_host *next;          /* in wr_released, once finalized without the GIL */
} wr_host;

/* Envs finalized on a thread without the GIL, released by the next wr_release_pending. */
static _Atomic(wr_host *) wr_released;

/* A trap with `message` (any object: its str, UTF-8 with errors replaced). Takes the
 * reference to `message`; NULL `message` means an exception is set, which is reported as
 * unraisable and the trap gets a generic message. Never returns NULL unless wasmtime does. */
static wasm_trap_t *wr_trap(PyObject *message) {
    PyObject *bytes = NULL;
    if (message != NULL) {
        PyObject *s = PyObject_Str(message);
        Py_DECREF(message);
        if (s != NULL) {
            bytes = PyUnicode_AsEncodedString(s, "utf-8", "replace");
            Py_DECREF(s);
        }
    }
    if (bytes == NULL) {
        PyErr_WriteUnraisable(NULL);
        static const char generic[] = "a host function failed (and reporting it failed too)";
        return wr_trap_new(generic, sizeof generic - 1);
    }
    wasm_trap_t *trap = wr_trap_new(PyBytes_AS_STRING(bytes), (size_t)PyBytes_GET_SIZE(bytes));
    Py_DECREF(bytes);
    return trap;
}

/* The trap for the exception that is set (cleared here): fail(exception) gives its message.
 * Returns the new trap (wasmtime takes it when the callback returns it). */
static wasm_trap_t *wr_trap_from_exception(wr_host *env) {
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *value = PyErr_GetRaisedException(); /* carries its traceback */
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
#endif
    PyObject *message = NULL;
    if (value != NULL) {
        message = PyObject_CallOneArg(env->fail, value);
        Py_DECREF(value);
    } else {
        PyErr_SetString(PyExc_SystemError, "a host function failed without an exception");
    }
    return wr_trap(message);
}

/* The Python callback, for the uncommon cases: the guest call is being measured, or no VM is
 * active (it traps with the same message as on the ctypes path). Returns the trap it made (an
 * address it returns as an int), or NULL. */
static wasm_trap_t *wr_host_fallback(wr_host *env, wasmtime_caller_t *caller,
                                     wasmtime_val_raw_t *vals, size_t nvals) {
    PyObject *argv[4] = {NULL, NULL, NULL, NULL};
    argv[0] = PyLong_FromLong(0);
    argv[1] = argv[0] ? PyLong_FromVoidPtr(caller) : NULL;
    argv[2] = argv[1] ? PyLong_FromVoidPtr(vals) : NULL;
    argv[3] = argv[2] ? PyLong_FromSize_t(nvals) : NULL;
    PyObject *result = argv[3] ? PyObject_Vectorcall(env->fallback, argv, 4, NULL) : NULL;
    for (int i = 0; i < 4; i++) Py_XDECREF(argv[i]);
    if (result == NULL) return wr_trap_from_exception(env);
    void *trap = PyLong_AsVoidPtr(result);
    Py_DECREF(result);
    if (trap == NULL && PyErr_Occurred()) return wr_trap_from_exception(env);
    return trap;
}

/* impl(target, *params) with the raw arguments as ints; its i32 result written in place.
 * Returns NULL, or a trap (owned by wasmtime once returned to it) for an exception. */
static wasm_trap_t *wr_host_direct(wr_host *env, PyObject *target, wasmtime_val_raw_t *vals,
                                   size_t nvals) {
    /* stack[0] is scratch for PY_VECTORCALL_ARGUMENTS_OFFSET */
    PyObject *stack[2 + WR_MAX_HOST_PARAMS];
    Py_ssize_t n = env->nparams;
    stack[0] = NULL;
    Py_INCREF(target); /* the impl may replace active[0] while it runs */
    stack[1] = target;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = env->wide[i] ? PyLong_FromLongLong(vals[i].i64)
                                   : PyLong_FromUnsignedLong((uint32_t)vals[i].i32);
        if (v == NULL) {
            for (Py_ssize_t j = 1; j < 2 + i; j++) Py_DECREF(stack[j]);
            return wr_trap_from_exception(env);
        }
        stack[2 + i] = v;
    }
    PyObject *result = PyObject_Vectorcall(env->impl, stack + 1,
                                           (size_t)(1 + n) | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                           NULL);
    for (Py_ssize_t j = 1; j < 2 + n; j++) Py_DECREF(stack[j]);
    if (result == NULL) return wr_trap_from_exception(env);
    if (result == Py_None) {
        Py_DECREF(result);
        return NULL;
    }
    if (!PyLong_Check(result)) { /* as `result & 0xFFFFFFFF` does: an error for a non-int */
        PyObject *masked = PyNumber_And(result, wr_mask32);
        Py_DECREF(result);
        if (masked == NULL) return wr_trap_from_exception(env);
        result = masked;
    }
    unsigned long long bits = PyLong_AsUnsignedLongLongMask(result);
    Py_DECREF(result);
    if (bits == (unsigned long long)-1 && PyErr_Occurred()) return wr_trap_from_exception(env);
    if (nvals >= 1) {
        uint32_t low = (uint32_t)(bits & 0xFFFFFFFFu);
        memcpy(&vals[0], &low, sizeof low); /* the i32 slot; the rest of it is left as is */
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* Native forms of the hottest host calls                                                   */
/* ---------------------------------------------------------------------------------------- */

/* A cache hit makes two host calls per request beyond the callbacks themselves: it reads
 * request headers (proxy_get_header_map_value, which allocates in the guest for the value)
 * and the clock (proxy_get_current_time_nanoseconds; every tick reads it too). Their C forms
 * below do the common case without a Python frame: the same reads, the same guest allocation,
 * the same writes and statuses. Anything else (a missing header, an empty value, an argument
 * out of bounds, a map they do not know, a VM without its `native` tuple) they leave, before
 * any effect, to the Python function, which decides as always.
 *
 * They read the active VM's `native` tuple (vm.py): (ctx, memory, allocator, header_map,
 * now_ns): the store's context and memory addresses, the guest allocator's address (0: none),
 * the VM class's header_map function (called with the VM: no reference cycle) and the host
 * clock's bound now_ns. */

#define WR_NATIVE_HEADER_MAP_VALUE 1
#define WR_NATIVE_CURRENT_TIME 2
#define WR_DEFER 0   /* not handled: call the Python function */
#define WR_HANDLED 1 /* handled: the result is written, or *trap is set */
#define WR_STATUS_OK 0
#define WR_STATUS_BAD_MEMORY 6 /* INVALID_MEMORY_ACCESS */
#define WR_MAX_NATIVE_KEY 256

static PyObject *wr_str_native; /* "native" */
/* Whether guest calls keep the GIL (keep_gil(); as checked and checked_nogil): the nested guest
 * allocation below releases it otherwise, so that a Python ticker can still interrupt it. */
static int wr_keep_gil;

typedef struct wr_native_vm {
    wasmtime_context_t *ctx;
    const wasmtime_memory_t *memory;
    const wasmtime_func_t *alloc;
    PyObject *header_map; /* header_map(vm, map_type); borrowed from the tuple */
    PyObject *now_ns;
    PyObject *tuple; /* a new reference: release with Py_DECREF */
} wr_native_vm;

/* The VM's native tuple; 0, or -1 (no exception left set) when it has none to use. */
static int wr_native_vm_of(PyObject *vm, wr_native_vm *out) {
    PyObject *t = PyObject_GetAttr(vm, wr_str_native);
    if (t == NULL) {
        PyErr_Clear();
        return -1;
    }
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 5) {
        Py_DECREF(t);
        return -1;
    }
    out->ctx = PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 0));
    out->memory = PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 1));
    out->alloc = PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 2));
    if (PyErr_Occurred() || out->ctx == NULL || out->memory == NULL) {
        PyErr_Clear();
        Py_DECREF(t);
        return -1;
    }
    out->header_map = PyTuple_GET_ITEM(t, 3);
    out->now_ns = PyTuple_GET_ITEM(t, 4);
    out->tuple = t;
    return 0;
}

static void wr_put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void wr_set_result(wasmtime_val_raw_t *vals, uint32_t status) {
    memcpy(&vals[0], &status, sizeof status); /* the i32 slot, as wr_host_direct writes it */
}

/* proxy_get_current_time_nanoseconds(ret_time). */
static int wr_native_time(wr_native_vm *v, wasmtime_val_raw_t *vals) {
    uint64_t ret = (uint32_t)vals[0].i32;
    if (ret + 8 > wr_memory_data_size(v->ctx, v->memory)) return WR_DEFER;
    PyObject *now = PyObject_CallNoArgs(v->now_ns);
    if (now == NULL) {
        PyErr_Clear(); /* the Python function calls it again and reports what it raises */
        return WR_DEFER;
    }
    unsigned long long ns = PyLong_Check(now) ? PyLong_AsUnsignedLongLongMask(now) : 0;
    int bad = !PyLong_Check(now) || (ns == (unsigned long long)-1 && PyErr_Occurred());
    Py_DECREF(now);
    if (bad) {
        PyErr_Clear();
        return WR_DEFER;
    }
    uint8_t *mem = wr_memory_data(v->ctx, v->memory);
    wr_put_le32(mem + ret, (uint32_t)ns);
    wr_put_le32(mem + ret + 4, (uint32_t)(ns >> 32));
    wr_set_result(vals, WR_STATUS_OK);
    return WR_HANDLED;
}

/* proxy_get_header_map_value(map_type, key_ptr, key_size, ret_ptr, ret_size), for the
 * request and response headers, a header that is there with a non-empty value. */
static int wr_native_header(wr_host *env, PyObject *vm, wr_native_vm *v,
                            wasmtime_val_raw_t *vals, wasm_trap_t **trap_out) {
    uint32_t map_type = (uint32_t)vals[0].i32;
    uint64_t key_ptr = (uint32_t)vals[1].i32, key_size = (uint32_t)vals[2].i32;
    uint64_t ret_ptr = (uint32_t)vals[3].i32, ret_size = (uint32_t)vals[4].i32;
    if ((map_type != 0 && map_type != 2) || v->alloc == NULL || key_size > WR_MAX_NATIVE_KEY)
        return WR_DEFER;
    size_t size = wr_memory_data_size(v->ctx, v->memory);
    if (key_ptr + key_size > size || ret_ptr + 4 > size || ret_size + 4 > size)
        return WR_DEFER;
    char key[WR_MAX_NATIVE_KEY];
    const uint8_t *mem = wr_memory_data(v->ctx, v->memory);
    for (uint64_t i = 0; i < key_size; i++) { /* bytes.lower(): ASCII only */
        uint8_t c = mem[key_ptr + i];
        key[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    PyObject *type = PyLong_FromUnsignedLong(map_type);
    PyObject *argv[2] = {vm, type};
    PyObject *pairs = type ? PyObject_Vectorcall(v->header_map, argv, 2, NULL) : NULL;
    Py_XDECREF(type);
    if (pairs == NULL) {
        PyErr_Clear();
        return WR_DEFER;
    }
    PyObject *value = NULL;
    if (PyList_CheckExact(pairs) || PyTuple_CheckExact(pairs)) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(pairs);
        PyObject **items = PySequence_Fast_ITEMS(pairs);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *pair = items[i];
            if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) break;
            PyObject *k = PyTuple_GET_ITEM(pair, 0);
            if (!PyBytes_CheckExact(k)) break;
            if ((uint64_t)PyBytes_GET_SIZE(k) == key_size &&
                memcmp(PyBytes_AS_STRING(k), key, (size_t)key_size) == 0) {
                value = PyTuple_GET_ITEM(pair, 1); /* the first match, as the loop in Python */
                break;
            }
        }
    }
    if (value == NULL || !PyBytes_CheckExact(value) || PyBytes_GET_SIZE(value) == 0) {
        Py_DECREF(pairs);
        return WR_DEFER; /* missing, empty, or not plain pairs: the Python function decides */
    }
    Py_INCREF(value); /* kept while the guest allocates (its pairs may change meanwhile) */
    Py_DECREF(pairs);
    Py_ssize_t len = PyBytes_GET_SIZE(value);
    /* The guest allocation, as Vm.return_bytes makes it: a nested call (no new deadline). */
    wasmtime_val_raw_t slots[WR_SLOTS];
    memset(slots, 0, sizeof slots);
    slots[0].i32 = (int32_t)len;
    wasm_trap_t *trap = NULL;
    wasmtime_error_t *error;
    wr_depth++;
    if (wr_keep_gil) {
        error = wr_func_call(v->ctx, v->alloc, slots, WR_SLOTS, &trap);
    } else {
        Py_BEGIN_ALLOW_THREADS
        error = wr_func_call(v->ctx, v->alloc, slots, WR_SLOTS, &trap);
        Py_END_ALLOW_THREADS
    }
    wr_depth--;
    if (error != NULL || trap != NULL || PyErr_Occurred()) {
        Py_DECREF(value);
        if (PyErr_Occurred()) { /* never expected: a callback leaves no exception */
            if (error != NULL) wr_error_delete(error);
            if (trap != NULL) wr_trap_delete(trap);
            *trap_out = wr_trap_from_exception(env);
            return WR_HANDLED;
        }
        /* As RawInstance.call1 does: its _raise makes the GuestTrap this call fails with. */
        PyObject *raw = PyObject_GetAttrString(vm, "raw");
        PyObject *r = NULL;
        if (raw != NULL) {
            r = PyObject_CallMethod(raw, "_raise", "KK", (unsigned long long)(uintptr_t)error,
                                    (unsigned long long)(uintptr_t)trap);
            Py_DECREF(raw);
        } else { /* the wasmtime error and trap are left to leak: nothing can own them */
            PyErr_SetString(PyExc_SystemError, "the VM has no raw instance");
        }
        if (r != NULL) { /* _raise always raises */
            Py_DECREF(r);
            PyErr_SetString(PyExc_SystemError, "a failed allocation raised nothing");
        }
        *trap_out = wr_trap_from_exception(env);
        return WR_HANDLED;
    }
    uint64_t addr = (uint32_t)slots[0].i32;
    size = wr_memory_data_size(v->ctx, v->memory); /* the allocation may have grown it */
    uint32_t status = WR_STATUS_OK;
    if (addr == 0 || addr + (uint64_t)len > size) {
        status = WR_STATUS_BAD_MEMORY;
    } else {
        uint8_t *base = wr_memory_data(v->ctx, v->memory);
        memcpy(base + addr, PyBytes_AS_STRING(value), (size_t)len);
        wr_put_le32(base + ret_ptr, (uint32_t)addr);
        wr_put_le32(base + ret_size, (uint32_t)len);
    }
    Py_DECREF(value);
    wr_set_result(vals, status);
    return WR_HANDLED;
}

/* keep_gil(flag): whether guest calls keep the GIL (the native forms' nested calls follow). */
static PyObject *wr_set_keep_gil(PyObject *Py_UNUSED(m), PyObject *flag) {
    int keep = PyObject_IsTrue(flag);
    if (keep < 0) return NULL;
    wr_keep_gil = keep;
    Py_RETURN_NONE;
}

/* The native form of `env`'s host function, if it has one and takes this case. */
static int wr_host_native(wr_host *env, PyObject *vm, wasmtime_val_raw_t *vals,
                          wasm_trap_t **trap_out) {
    wr_native_vm v;
    if (wr_native_vm_of(vm, &v) < 0) return WR_DEFER;
    /* `vm` is borrowed from active[0]: held, as wr_host_direct holds it, since Python code
     * (header_map, the clock) and, without the GIL, other threads run before it is done. */
    Py_INCREF(vm);
    int done = env->native == WR_NATIVE_CURRENT_TIME ? wr_native_time(&v, vals)
               : env->native == WR_NATIVE_HEADER_MAP_VALUE
                   ? wr_native_header(env, vm, &v, vals, trap_out)
                   : WR_DEFER;
    Py_DECREF(v.tuple);
    Py_DECREF(vm);
    return done;
}

/* The wasmtime_func_unchecked_callback_t of every host function: `data` is its wr_host.
 * Takes the GIL (a no-op when the guest call kept it), calls the host function, and returns
 * NULL, or a trap for wasmtime to raise in the guest. */
static wasm_trap_t *wr_trampoline(void *data, wasmtime_caller_t *caller,
                                  wasmtime_val_raw_t *vals, size_t nvals) {
    wr_host *env = data;
    PyGILState_STATE gil = PyGILState_Ensure(); /* held already unless checked_nogil released it */
    wasm_trap_t *trap = NULL;
    PyObject *target = PyList_GET_SIZE(env->active) > 0 ? PyList_GET_ITEM(env->active, 0)
                                                        : Py_None;
    PyObject *meter = PyList_GET_SIZE(env->meter) > 0 ? PyList_GET_ITEM(env->meter, 0)
                                                      : Py_None;
    if (meter != Py_None || target == Py_None || nvals < (size_t)env->nparams) {
        trap = wr_host_fallback(env, caller, vals, nvals);
    } else if (env->native == 0 || wr_host_native(env, target, vals, &trap) == WR_DEFER) {
        trap = wr_host_direct(env, target, vals, nvals);
    }
    PyGILState_Release(gil);
    return trap;
}

/* Whether the interpreter is shutting down (its objects must be left alone). */
static int wr_finalizing(void) {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
}

/* Release an env's Python objects and free it; the GIL is held. */
static void wr_release(wr_host *env) {
    Py_CLEAR(env->impl);
    Py_CLEAR(env->active);
    Py_CLEAR(env->meter);
    Py_CLEAR(env->fallback);
    Py_CLEAR(env->fail);
    WR_FREE(env);
}

/* Release the envs finalized without the GIL (a pending call, and before each define). */
static int wr_release_pending(void *Py_UNUSED(arg)) {
    wr_host *env = atomic_exchange(&wr_released, NULL);
    while (env != NULL) {
        wr_host *next = env->next;
        wr_release(env);
        env = next;
    }
    return 0;
}

/* wasmtime's finalizer for a host function's env: when the last linker, module instance or
 * store that refers to the function is dropped. With the GIL held (a linker or store dropped
 * from Python) the env is released at once. Without it (the reaper thread drops stores with
 * the GIL released) it is queued and released on the main thread by a pending call, so this
 * thread never waits for the GIL (nor is stopped by it at exit). Once the interpreter is
 * shutting down, envs are left alone. */
static void wr_host_finalize(void *data) {
    wr_host *env = data;
    if (env == NULL) return;
    if (!Py_IsInitialized() || wr_finalizing()) return;
    if (PyGILState_Check()) {
        wr_release(env);
        return;
    }
    wr_host *head = atomic_load(&wr_released);
    do {
        env->next = head;
    } while (!atomic_compare_exchange_weak(&wr_released, &head, env));
    (void)Py_AddPendingCall(wr_release_pending, NULL); /* if full: released by a later one */
}

/* define(linker, module, name, functype, kinds, impl, active, meter, fallback, fail)
 * -> the address of a wasmtime_error_t (the caller owns it), or 0. */
static PyObject *wr_define(PyObject *Py_UNUSED(m), PyObject *args) {
    unsigned long long linker_addr, functype_addr;
    const char *module, *name, *kinds;
    Py_ssize_t module_len, name_len, nkinds;
    PyObject *impl, *active, *meter, *fallback, *fail;
    int native = 0;
    if (!wr_bound()) return NULL;
    wr_release_pending(NULL);
    if (!PyArg_ParseTuple(args, "Ky#y#Ky#OO!O!OO|i:define", &linker_addr, &module, &module_len,
                          &name, &name_len, &functype_addr, &kinds, &nkinds, &impl,
                          &PyList_Type, &active, &PyList_Type, &meter, &fallback, &fail,
                          &native))
        return NULL;
    if (native < 0 || native > WR_NATIVE_CURRENT_TIME ||
        (native == WR_NATIVE_HEADER_MAP_VALUE && nkinds != 5) ||
        (native == WR_NATIVE_CURRENT_TIME && nkinds != 1)) {
        PyErr_SetString(PyExc_ValueError, "define: no such native form for this signature");
        return NULL;
    }
    if (linker_addr == 0 || functype_addr == 0) {
        PyErr_SetString(PyExc_ValueError, "define: null linker or functype");
        return NULL;
    }
    if (nkinds > WR_MAX_HOST_PARAMS) {
        PyErr_Format(PyExc_ValueError, "define: at most %d parameters", WR_MAX_HOST_PARAMS);
        return NULL;
    }
    if (!PyCallable_Check(impl) || !PyCallable_Check(fallback) || !PyCallable_Check(fail)) {
        PyErr_SetString(PyExc_TypeError, "define: impl, fallback and fail must be callable");
        return NULL;
    }
    wr_host *env = WR_ALLOC(sizeof *env);
    if (env == NULL) return PyErr_NoMemory();
    env->nparams = nkinds;
    env->native = native;
    for (Py_ssize_t i = 0; i < nkinds; i++) {
        if (kinds[i] != 'i' && kinds[i] != 'I') {
            WR_FREE(env);
            PyErr_SetString(PyExc_ValueError, "define: kinds are 'i' (i32) or 'I' (i64)");
            return NULL;
        }
        env->wide[i] = kinds[i] == 'I';
    }
    Py_INCREF(impl);
    env->impl = impl;
    Py_INCREF(active);
    env->active = active;
    Py_INCREF(meter);
    env->meter = meter;
    Py_INCREF(fallback);
    env->fallback = fallback;
    Py_INCREF(fail);
    env->fail = fail;
    /* From here wasmtime owns env: it calls the finalizer when the definition is dropped,
     * also when defining fails. */
    wasmtime_error_t *error = wr_define_func(
        (wasmtime_linker_t *)(uintptr_t)linker_addr, module, (size_t)module_len, name,
        (size_t)name_len, (const wasm_functype_t *)(uintptr_t)functype_addr, wr_trampoline, env,
        wr_host_finalize);
    return PyLong_FromVoidPtr(error);
}

/* ---------------------------------------------------------------------------------------- */
/* Binding and the module                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* bind(path, val_size): resolve the entry points from the already loaded wasmtime library. */
static PyObject *wr_bind(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *path_obj;
    Py_ssize_t val_size;
    if (!PyArg_ParseTuple(args, "O&n:bind", PyUnicode_FSConverter, &path_obj, &val_size))
        return NULL;
    if (val_size != (Py_ssize_t)sizeof(wasmtime_val_raw_t)) {
        Py_DECREF(path_obj);
        PyErr_Format(PyExc_RuntimeError,
                     "wasmtime's raw value is %zd bytes, this module was written for %zu",
                     val_size, sizeof(wasmtime_val_raw_t));
        return NULL;
    }
    void *lib = dlopen(PyBytes_AS_STRING(path_obj), RTLD_NOW | RTLD_NOLOAD);
    Py_DECREF(path_obj);
    if (lib == NULL) {
        const char *why = dlerror();
        PyErr_Format(PyExc_OSError, "wasmtime's library is not loaded: %s",
                     why ? why : "dlopen failed");
        return NULL;
    }
    /* The handle is kept: the library stays loaded as long as wasmtime-py needs it anyway. */
    struct {
        const char *name;
        void **slot;
    } entries[] = {
        {"wasmtime_func_call_unchecked", (void **)&wr_func_call},
        {"wasmtime_linker_define_func_unchecked", (void **)&wr_define_func},
        {"wasmtime_trap_new", (void **)&wr_trap_new},
        {"wasm_trap_delete", (void **)&wr_trap_delete},
        {"wasmtime_error_delete", (void **)&wr_error_delete},
        {"wasmtime_context_set_epoch_deadline", (void **)&wr_set_epoch_deadline},
        {"wasmtime_memory_data_size", (void **)&wr_memory_data_size},
        {"wasmtime_memory_size", (void **)&wr_memory_size},
        {"wasmtime_memory_data", (void **)&wr_memory_data},
    };
    void *found[sizeof entries / sizeof entries[0]];
    for (size_t i = 0; i < sizeof entries / sizeof entries[0]; i++) {
        found[i] = dlsym(lib, entries[i].name);
        if (found[i] == NULL) {
            PyErr_Format(PyExc_OSError, "wasmtime's library lacks %s", entries[i].name);
            return NULL;
        }
    }
    /* All or nothing; wr_func_call last, since wr_bound() looks at it. */
    for (size_t i = sizeof entries / sizeof entries[0]; i-- > 0;) *entries[i].slot = found[i];
    Py_RETURN_NONE;
}

static PyMethodDef wr_methods[] = {
    {"bind", wr_bind, METH_VARARGS,
     "bind(path, val_size): resolve wasmtime's entry points from its loaded library."},
    {"checked", (PyCFunction)(void (*)(void))wr_checked_keep_gil, METH_FASTCALL,
     "checked(meter, on_failed, ctx, func, *params) -> i32 result; keeps the GIL; then "
     "meter[0] = None; a failure raises what on_failed(error, trap) raises."},
    {"checked_nogil", (PyCFunction)(void (*)(void))wr_checked_nogil, METH_FASTCALL,
     "checked_nogil(meter, on_failed, ctx, func, *params): checked(), releasing the GIL."},
    {"memory_size", (PyCFunction)(void (*)(void))wr_memory_size_bytes, METH_FASTCALL,
     "memory_size(ctx, memory) -> the linear memory's size in bytes."},
    {"memory_pages", (PyCFunction)(void (*)(void))wr_memory_pages, METH_FASTCALL,
     "memory_pages(ctx, memory) -> the linear memory's size in 64 KiB pages."},
    {"keep_gil", wr_set_keep_gil, METH_O,
     "keep_gil(flag): whether guest calls keep the GIL (the native host calls' nested ones)."},
    {"parse_map", wr_parse_map, METH_O,
     "parse_map(data) -> the pairs of a serialized map, or None (not bytes, or malformed)."},
    {"view_fields", wr_view_fields, METH_O,
     "view_fields(fields) -> (lowered, host, hosts, authorization) of raw header fields, or "
     "None (not a tuple of bytes pairs)."},
    {"define", wr_define, METH_VARARGS,
     "define(linker, module, name, functype, kinds, impl, active, meter, fallback, fail"
     "[, native]) -> address of a wasmtime_error_t, or 0."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef wr_module = {
    PyModuleDef_HEAD_INIT, "_fastcall",
    "The host's guest and host calls without ctypes (see fastcall.c).", -1, wr_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastcall(void) {
    PyObject *m = PyModule_Create(&wr_module);
    if (m == NULL) return NULL;
    if (wr_str_native == NULL) {
        wr_str_native = PyUnicode_InternFromString("native");
        if (wr_str_native == NULL) goto fail;
    }
    if (wr_mask32 == NULL) {
        wr_mask32 = PyLong_FromUnsignedLong(0xFFFFFFFFul);
        if (wr_mask32 == NULL) goto fail;
    }
    if (PyModule_AddIntConstant(m, "MAX_PARAMS", WR_SLOTS) < 0) goto fail;
    if (PyModule_AddIntConstant(m, "MAX_HOST_PARAMS", WR_MAX_HOST_PARAMS) < 0) goto fail;
    if (PyModule_AddIntConstant(m, "NATIVE_HEADER_MAP_VALUE", WR_NATIVE_HEADER_MAP_VALUE) < 0)
        goto fail;
    if (PyModule_AddIntConstant(m, "NATIVE_CURRENT_TIME", WR_NATIVE_CURRENT_TIME) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
