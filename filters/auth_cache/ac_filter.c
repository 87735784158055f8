/* ac_filter.c -- Proxy-Wasm callbacks of the auth_cache filter.
 *
 * An HTTP filter that authorizes requests carrying
 * "Authorization: Bearer <token>" against an auth service and caches the
 * positive answers (ac_cache.h) in the Wasm instance's own linear memory:
 *
 *   request headers
 *     no/malformed bearer token ........ local 401 "missing_or_malformed_token"
 *     :path (before '?') == logout_path  evict the token, CONTINUE upstream
 *     cached and not expired ........... hits++, CONTINUE
 *     otherwise ........................ misses++, proxy_http_call
 *                                        GET auth_path on auth_cluster, PAUSE;
 *                                        if a call for the same token is
 *                                        already in flight, wait for its
 *                                        answer instead (merged), PAUSE
 *   auth answer (proxy_on_http_call_response), for every stream waiting on it
 *     200 .............................. cache token for ttl, resume stream
 *     401 / 403 ........................ denied++, local 401 "token_rejected"
 *     other status, timeout, no answer . auth_failures++, then
 *                                        fail_open: resume (token not cached)
 *                                        fail-closed: local 503
 *                                        "auth_unavailable"
 *   tick ............................... evict expired entries
 *
 * Ground truth for the evaluation is published as gauges
 * auth_cache.live_entries and auth_cache.live_bytes (recorded after every
 * change to the cache and on every tick), next to counters auth_cache.hits,
 * .misses, .denied and .auth_failures.
 *
 * State. A Proxy-Wasm VM runs one plugin here, so the state is one static
 * ac_filter: configuration, cache, metric ids and the table of pending
 * auth calls (call id -> token copy + the paused streams waiting for it).
 * Concurrent misses for one token share one call: a miss whose token
 * already has a call in flight joins its streams. Stream contexts keep no
 * other state. Every token or header value that outlives a callback is a
 * heap copy owned by this file.
 *
 * Decisions the ABI leaves open (documented in filters/README.md):
 *   - After proxy_send_local_response from proxy_on_request_headers the
 *     callback returns PAUSE, as Envoy filters stop iteration after
 *     sending a local reply.
 *   - Tokens longer than AC_MAX_TOKEN_LEN bytes, or containing bytes other
 *     than visible ASCII, count as malformed (a 401, never cached).
 *   - proxy_on_http_call_response must not be delivered re-entrantly from
 *     inside proxy_http_call: the call id is known only after it returns.
 *   - Tokens are never logged.
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ac_alloc.h"
#include "ac_cache.h"
#include "ac_config.h"
#include "ac_msg.h"
#include "proxy_wasm.h"

#define AC_EXPORT(name) __attribute__((export_name(name)))

/* Longest bearer token accepted, in bytes (longer ones are malformed). */
#define AC_MAX_TOKEN_LEN 4096

/* ---------------------------------------------------------------------------
 * State
 * ------------------------------------------------------------------------ */

/* One auth call in flight, owned by the pending table: one heap block, and
 * a heap array of the streams waiting for its answer (the first made it). */
typedef struct ac_pending {
    uint32_t call_id;        /* id returned by proxy_http_call */
    uint32_t *streams;       /* paused stream contexts, nstreams of cap */
    size_t nstreams;
    size_t cap_streams;
    size_t token_len;
    char token[];            /* copy of the token, token_len bytes */
} ac_pending;

enum {
    AC_METRIC_LIVE_ENTRIES,
    AC_METRIC_LIVE_BYTES,
    AC_METRIC_HITS,
    AC_METRIC_MISSES,
    AC_METRIC_DENIED,
    AC_METRIC_AUTH_FAILURES,
    AC_METRIC_COUNT
};

static const struct {
    const char *name;
    proxy_metric_type_t type;
} ac_metric_defs[AC_METRIC_COUNT] = {
    [AC_METRIC_LIVE_ENTRIES] = {"auth_cache.live_entries", PROXY_METRIC_GAUGE},
    [AC_METRIC_LIVE_BYTES] = {"auth_cache.live_bytes", PROXY_METRIC_GAUGE},
    [AC_METRIC_HITS] = {"auth_cache.hits", PROXY_METRIC_COUNTER},
    [AC_METRIC_MISSES] = {"auth_cache.misses", PROXY_METRIC_COUNTER},
    [AC_METRIC_DENIED] = {"auth_cache.denied", PROXY_METRIC_COUNTER},
    [AC_METRIC_AUTH_FAILURES] = {"auth_cache.auth_failures", PROXY_METRIC_COUNTER},
};

typedef struct ac_filter {
    int initialised;                     /* cfg holds at least defaults */
    uint32_t root_id;                    /* plugin (root) context id */
    ac_config cfg;                       /* current configuration */
    ac_cache *cache;                     /* NULL until first needed */
    ac_pending **pending;                /* npending of cap_pending used */
    size_t npending;
    size_t cap_pending;
    int metrics_defined;                 /* proxy_define_metric was tried */
    uint32_t metric_id[AC_METRIC_COUNT];
    int metric_ok[AC_METRIC_COUNT];      /* definition succeeded */
} ac_filter;

static ac_filter ac_g; /* zero-initialised */

/* A (key, value) pair for map serialization; both borrowed. */
typedef struct ac_pair {
    const char *key;
    size_t key_len;
    const char *value;
    size_t value_len;
} ac_pair;

/* ---------------------------------------------------------------------------
 * Logging
 * ------------------------------------------------------------------------ */

/* Log the NUL-terminated text s at level, prefixed with "auth_cache: ". */
static void ac_log(proxy_log_level_t level, const char *s) {
    ac_msg m;
    ac_msg_init(&m);
    ac_msg_str(&m, "auth_cache: ");
    ac_msg_str(&m, s);
    proxy_log(level, m.buf, m.len);
}

/* Log s followed by a decimal number (e.g. a status) at level. */
static void ac_log_u64(proxy_log_level_t level, const char *s, uint64_t v) {
    ac_msg m;
    ac_msg_init(&m);
    ac_msg_str(&m, "auth_cache: ");
    ac_msg_str(&m, s);
    ac_msg_u64(&m, v);
    proxy_log(level, m.buf, m.len);
}

/* Warning callback for ac_config_parse: log at WARN. */
static void ac_config_warn(void *ud, const char *msg, size_t len) {
    (void)ud;
    ac_msg m;
    ac_msg_init(&m);
    ac_msg_str(&m, "auth_cache: ");
    ac_msg_bytes(&m, msg, len);
    proxy_log(PROXY_LOG_WARN, m.buf, m.len);
}

/* ---------------------------------------------------------------------------
 * Metrics
 * ------------------------------------------------------------------------ */

/* Define all metrics once per VM. A metric whose definition fails is
 * logged and skipped afterwards. Returns nothing. */
static void ac_metrics_define(void) {
    if (ac_g.metrics_defined) return;
    ac_g.metrics_defined = 1;
    for (int i = 0; i < AC_METRIC_COUNT; i++) {
        const char *name = ac_metric_defs[i].name;
        proxy_status_t st = proxy_define_metric(ac_metric_defs[i].type, name,
                                                strlen(name), &ac_g.metric_id[i]);
        ac_g.metric_ok[i] = st == PROXY_STATUS_OK;
        if (st != PROXY_STATUS_OK)
            ac_log_u64(PROXY_LOG_WARN, "proxy_define_metric failed, status ", st);
    }
}

/* Add 1 to counter i (if defined). Returns nothing. */
static void ac_metric_inc(int i) {
    if (ac_g.metric_ok[i]) proxy_increment_metric(ac_g.metric_id[i], 1);
}

/* Record both ground-truth gauges from the cache. Returns nothing. */
static void ac_gauges_record(void) {
    if (ac_g.cache == NULL) return;
    if (ac_g.metric_ok[AC_METRIC_LIVE_ENTRIES])
        proxy_record_metric(ac_g.metric_id[AC_METRIC_LIVE_ENTRIES],
                            ac_cache_live_entries(ac_g.cache));
    if (ac_g.metric_ok[AC_METRIC_LIVE_BYTES])
        proxy_record_metric(ac_g.metric_id[AC_METRIC_LIVE_BYTES],
                            ac_cache_live_bytes(ac_g.cache));
}

/* ---------------------------------------------------------------------------
 * State lifetime
 * ------------------------------------------------------------------------ */

/* Make sure a configuration (defaults if proxy_on_configure never
 * succeeded) and a cache exist. Returns 1, or 0 if the cache could not be
 * allocated (logged). */
static int ac_state_ready(void) {
    if (!ac_g.initialised) {
        ac_config_defaults(&ac_g.cfg);
        ac_g.initialised = 1;
    }
    if (ac_g.cache == NULL) {
        ac_g.cache = ac_cache_new(ac_g.cfg.entry_size);
        if (ac_g.cache == NULL) {
            ac_log(PROXY_LOG_ERROR, "out of memory creating the cache");
            return 0;
        }
    }
    return 1;
}

static void ac_pending_free(ac_pending *p);

/* Free the cache and every pending call (the root context is going away).
 * Configuration and metric ids are kept. Returns nothing. */
static void ac_state_release(void) {
    ac_cache_free(ac_g.cache);
    ac_g.cache = NULL;
    for (size_t i = 0; i < ac_g.npending; i++) ac_pending_free(ac_g.pending[i]);
    AC_FREE(ac_g.pending);
    ac_g.pending = NULL;
    ac_g.npending = 0;
    ac_g.cap_pending = 0;
}

/* ---------------------------------------------------------------------------
 * Pending auth calls
 * ------------------------------------------------------------------------ */

/* Free a pending call and its array of streams. NULL is a no-op. */
static void ac_pending_free(ac_pending *p) {
    if (p == NULL) return;
    AC_FREE(p->streams);
    AC_FREE(p);
}

/* Add stream stream_id to the streams waiting for p. Returns 1, or 0 on out
 * of memory (p is unchanged). */
static int ac_pending_add_stream(ac_pending *p, uint32_t stream_id) {
    if (p->nstreams == p->cap_streams) {
        size_t cap = p->cap_streams ? p->cap_streams * 2 : 2;
        uint32_t *s = AC_REALLOC(p->streams, cap * sizeof(*s));
        if (s == NULL) return 0;
        p->streams = s;
        p->cap_streams = cap;
    }
    p->streams[p->nstreams++] = stream_id;
    return 1;
}

/* The pending call for token tok[0..tok_len), or NULL if none is in
 * flight. The table keeps ownership. */
static ac_pending *ac_pending_find_token(const char *tok, size_t tok_len) {
    for (size_t i = 0; i < ac_g.npending; i++) {
        ac_pending *p = ac_g.pending[i];
        if (p->token_len == tok_len && memcmp(p->token, tok, tok_len) == 0) return p;
    }
    return NULL;
}

/* Make room for one more pending call so that ac_pending_push cannot fail.
 * Returns 1, or 0 on out of memory (table unchanged). */
static int ac_pending_reserve(void) {
    if (ac_g.npending < ac_g.cap_pending) return 1;
    size_t cap = ac_g.cap_pending ? ac_g.cap_pending * 2 : 8;
    ac_pending **p = AC_REALLOC(ac_g.pending, cap * sizeof(*p));
    if (p == NULL) return 0;
    ac_g.pending = p;
    ac_g.cap_pending = cap;
    return 1;
}

/* Add p to the table, which takes ownership. Requires a prior successful
 * ac_pending_reserve. Returns nothing. */
static void ac_pending_push(ac_pending *p) {
    ac_g.pending[ac_g.npending++] = p;
}

/* Remove the entry at index i (order is not kept) and return it; the
 * caller owns it afterwards. */
static ac_pending *ac_pending_remove_at(size_t i) {
    ac_pending *p = ac_g.pending[i];
    ac_g.pending[i] = ac_g.pending[--ac_g.npending];
    return p;
}

/* Find and remove the pending call call_id. Returns it (caller owns and
 * frees it with ac_pending_free) or NULL if unknown. */
static ac_pending *ac_pending_take(uint32_t call_id) {
    for (size_t i = 0; i < ac_g.npending; i++)
        if (ac_g.pending[i]->call_id == call_id) return ac_pending_remove_at(i);
    return NULL;
}

/* ---------------------------------------------------------------------------
 * Header maps
 * ------------------------------------------------------------------------ */

/* Write v as 4 little-endian bytes at p. */
static void ac_put_u32le(char *p, uint32_t v) {
    p[0] = (char)(v & 0xff);
    p[1] = (char)((v >> 8) & 0xff);
    p[2] = (char)((v >> 16) & 0xff);
    p[3] = (char)((v >> 24) & 0xff);
}

/* Serialize n pairs as the ABI's map format: u32 count, n x (u32 key_len,
 * u32 value_len), then each key and value followed by a NUL byte.
 * Returns a heap block the caller owns (free with AC_FREE) and sets *size,
 * or returns NULL on out of memory. */
static char *ac_map_serialize(const ac_pair *pairs, size_t n, size_t *size) {
    size_t total = 4 + n * 8;
    for (size_t i = 0; i < n; i++)
        total += pairs[i].key_len + 1 + pairs[i].value_len + 1;
    char *buf = AC_MALLOC(total);
    if (buf == NULL) return NULL;

    ac_put_u32le(buf, (uint32_t)n);
    char *lens = buf + 4;
    char *data = buf + 4 + n * 8;
    for (size_t i = 0; i < n; i++) {
        ac_put_u32le(lens + i * 8, (uint32_t)pairs[i].key_len);
        ac_put_u32le(lens + i * 8 + 4, (uint32_t)pairs[i].value_len);
        memcpy(data, pairs[i].key, pairs[i].key_len);
        data += pairs[i].key_len;
        *data++ = '\0';
        memcpy(data, pairs[i].value, pairs[i].value_len);
        data += pairs[i].value_len;
        *data++ = '\0';
    }
    *size = total;
    return buf;
}

/* Read header name (NUL-terminated, lowercase) from map. On Ok, *value is a
 * block the caller owns (free with AC_FREE; may be NULL when *len is 0).
 * Returns the host's status: Ok, NotFound, or another error. */
static proxy_status_t ac_header_get(proxy_map_type_t map, const char *name,
                                    const char **value, size_t *len) {
    *value = NULL;
    *len = 0;
    proxy_status_t st =
        proxy_get_header_map_value(map, name, strlen(name), value, len);
    if (st != PROXY_STATUS_OK) {
        *value = NULL;
        *len = 0;
    }
    return st;
}

/* ---------------------------------------------------------------------------
 * Request parsing
 * ------------------------------------------------------------------------ */

/* Extract the token from an Authorization value "Bearer <token>": the
 * scheme is matched case-insensitively, followed by one or more spaces and
 * a non-empty token of visible ASCII (0x21..0x7e) of at most
 * AC_MAX_TOKEN_LEN bytes; spaces and tabs around the value are ignored.
 * Returns 1 with *tok pointing into v (borrowed) and *tok_len set, or 0 if
 * the value is malformed. */
static int ac_bearer_token(const char *v, size_t n, const char **tok,
                           size_t *tok_len) {
    static const char scheme[] = "bearer";
    size_t i = 0;
    while (i < n && (v[i] == ' ' || v[i] == '\t')) i++;
    while (n > i && (v[n - 1] == ' ' || v[n - 1] == '\t')) n--;
    if (n - i < sizeof(scheme) - 1) return 0;
    for (size_t k = 0; k < sizeof(scheme) - 1; k++) {
        char c = v[i + k];
        if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
        if (c != scheme[k]) return 0;
    }
    i += sizeof(scheme) - 1;
    if (i >= n || v[i] != ' ') return 0;
    while (i < n && v[i] == ' ') i++;
    if (i >= n || n - i > AC_MAX_TOKEN_LEN) return 0;
    for (size_t k = i; k < n; k++)
        if ((unsigned char)v[k] < 0x21 || (unsigned char)v[k] > 0x7e) return 0;
    *tok = v + i;
    *tok_len = n - i;
    return 1;
}

/* Returns 1 if path (up to any '?') equals the configured logout path, 0
 * otherwise or when logout is disabled. */
static int ac_is_logout(const char *path, size_t len) {
    const ac_config_str *lp = &ac_g.cfg.logout_path;
    if (lp->len == 0 || path == NULL) return 0;
    const char *q = memchr(path, '?', len);
    if (q != NULL) len = (size_t)(q - path);
    return len == lp->len && memcmp(path, lp->data, len) == 0;
}

/* Parse the 3-digit status of an HTTP answer. Returns it, or 0 if the
 * value is not a decimal number in 100..999. */
static uint32_t ac_parse_status(const char *v, size_t n) {
    if (v == NULL || n != 3) return 0;
    uint32_t s = 0;
    for (size_t i = 0; i < 3; i++) {
        if (v[i] < '0' || v[i] > '9') return 0;
        s = s * 10 + (uint32_t)(v[i] - '0');
    }
    return s >= 100 ? s : 0;
}

/* Current host time in ns (0 if the host refuses, which makes every cached
 * entry look unexpired; logged). */
static uint64_t ac_now(void) {
    uint64_t now = 0;
    proxy_status_t st = proxy_get_current_time_nanoseconds(&now);
    if (st != PROXY_STATUS_OK) {
        ac_log_u64(PROXY_LOG_WARN, "proxy_get_current_time_nanoseconds failed, status ",
                   st);
        return 0;
    }
    return now;
}

/* ---------------------------------------------------------------------------
 * Responses
 * ------------------------------------------------------------------------ */

/* Send a local response on the effective stream: status code, details and
 * body (NUL-terminated, borrowed), with "www-authenticate: Bearer" when
 * challenge is set. Returns nothing (failures are logged). */
static void ac_reply(uint32_t code, const char *details, const char *body,
                     int challenge) {
    static const ac_pair www = {"www-authenticate", 16, "Bearer", 6};
    size_t hsize = 0;
    char *headers = NULL;
    if (challenge) {
        headers = ac_map_serialize(&www, 1, &hsize);
        if (headers == NULL) hsize = 0; /* still answer, without the header */
    }
    proxy_status_t st = proxy_send_local_response(
        code, details, strlen(details), body, strlen(body), headers, hsize,
        PROXY_GRPC_STATUS_NONE);
    AC_FREE(headers);
    if (st != PROXY_STATUS_OK)
        ac_log_u64(PROXY_LOG_WARN, "proxy_send_local_response failed, status ", st);
}

/* Answer 401 with a Bearer challenge; details names the reason. */
static void ac_reply_unauthorized(const char *details) {
    ac_reply(401, details, "unauthorized\n", 1);
}

/* Answer 503: the auth service gave no usable answer (fail-closed). */
static void ac_reply_unavailable(void) {
    ac_reply(503, "auth_unavailable", "auth service unavailable\n", 0);
}

/* Resume the effective stream's request. Returns nothing (logged). */
static void ac_resume(void) {
    proxy_status_t st = proxy_continue_stream(PROXY_STREAM_HTTP_REQUEST);
    if (st != PROXY_STATUS_OK)
        ac_log_u64(PROXY_LOG_WARN, "proxy_continue_stream failed, status ", st);
}

/* Apply the fail mode to the effective stream: the auth service gave no
 * usable answer. from_headers: we are still inside proxy_on_request_headers
 * (so fail-open means returning CONTINUE rather than resuming).
 * Returns the action proxy_on_request_headers should return. */
static proxy_action_t ac_fail_mode(int from_headers) {
    if (ac_g.cfg.fail_open) {
        if (!from_headers) ac_resume();
        return PROXY_ACTION_CONTINUE;
    }
    ac_reply_unavailable();
    return PROXY_ACTION_PAUSE;
}

/* The auth service could not give an answer for the stream being handled in
 * proxy_on_request_headers: count it and apply the fail mode.
 * Returns the action proxy_on_request_headers should return. */
static proxy_action_t ac_auth_failed(int from_headers) {
    ac_metric_inc(AC_METRIC_AUTH_FAILURES);
    return ac_fail_mode(from_headers);
}

/* ---------------------------------------------------------------------------
 * Auth calls
 * ------------------------------------------------------------------------ */

/* Ask the auth cluster about the request of stream stream_id, whose
 * Authorization value is auth[0..auth_len) and token tok[0..tok_len). If a
 * call for the same token is already in flight, the stream waits for its
 * answer instead of making another call.
 * Returns PAUSE when the stream waits for a call (the pending table owns a
 * copy of the token), or the fail-mode action if the call could not be made. */
static proxy_action_t ac_start_auth_call(uint32_t stream_id, const char *auth,
                                         size_t auth_len, const char *tok,
                                         size_t tok_len) {
    const ac_config *cfg = &ac_g.cfg;
    ac_pending *same = ac_pending_find_token(tok, tok_len);
    if (same != NULL && ac_pending_add_stream(same, stream_id)) return PROXY_ACTION_PAUSE;
    ac_pair hdrs[4] = {
        {":method", 7, "GET", 3},
        {":path", 5, cfg->auth_path.data, cfg->auth_path.len},
        {":authority", 10, cfg->auth_authority.data, cfg->auth_authority.len},
        {"authorization", 13, auth, auth_len},
    };

    /* Allocate everything first: once the call is out, recording it must
     * not fail, or its answer would find no paused stream. */
    ac_pending *p = AC_MALLOC(sizeof(*p) + tok_len);
    size_t hsize = 0;
    char *headers = ac_map_serialize(hdrs, 4, &hsize);
    if (p != NULL) {
        p->streams = NULL;
        p->nstreams = p->cap_streams = 0;
    }
    if (p == NULL || headers == NULL || !ac_pending_reserve() ||
        !ac_pending_add_stream(p, stream_id)) {
        ac_pending_free(p);
        AC_FREE(headers);
        ac_log(PROXY_LOG_ERROR, "out of memory starting an auth call");
        return ac_auth_failed(1);
    }
    p->token_len = tok_len;
    memcpy(p->token, tok, tok_len);

    uint32_t call_id = 0;
    proxy_status_t st = proxy_http_call(
        cfg->auth_cluster.data, cfg->auth_cluster.len, headers, hsize,
        NULL, 0, NULL, 0, cfg->timeout_ms, &call_id);
    AC_FREE(headers);
    if (st != PROXY_STATUS_OK) {
        ac_pending_free(p);
        ac_log_u64(PROXY_LOG_WARN, "proxy_http_call to the auth cluster failed, status ",
                   st);
        return ac_auth_failed(1);
    }
    p->call_id = call_id;
    ac_pending_push(p);
    return PROXY_ACTION_PAUSE;
}

/* Ask the auth cluster again about p's token, on behalf of p->streams[0]
 * (the stream that made the call is gone, and the host cancels a stream's
 * calls with it). Sends "Bearer <token>". Returns 1 with p->call_id updated,
 * or 0 if the call could not be made. */
static int ac_pending_reissue(ac_pending *p) {
    const ac_config *cfg = &ac_g.cfg;
    if (proxy_set_effective_context(p->streams[0]) != PROXY_STATUS_OK) return 0;
    char *auth = AC_MALLOC(7 + p->token_len);
    if (auth == NULL) return 0;
    memcpy(auth, "Bearer ", 7);
    memcpy(auth + 7, p->token, p->token_len);
    ac_pair hdrs[4] = {
        {":method", 7, "GET", 3},
        {":path", 5, cfg->auth_path.data, cfg->auth_path.len},
        {":authority", 10, cfg->auth_authority.data, cfg->auth_authority.len},
        {"authorization", 13, auth, 7 + p->token_len},
    };
    size_t hsize = 0;
    char *headers = ac_map_serialize(hdrs, 4, &hsize);
    AC_FREE(auth);
    if (headers == NULL) return 0;
    uint32_t call_id = 0;
    proxy_status_t st = proxy_http_call(
        cfg->auth_cluster.data, cfg->auth_cluster.len, headers, hsize,
        NULL, 0, NULL, 0, cfg->timeout_ms, &call_id);
    AC_FREE(headers);
    if (st != PROXY_STATUS_OK) return 0;
    p->call_id = call_id;
    return 1;
}

/* Stream stream_id is gone: take it off every pending call. A call no stream
 * waits for any more is dropped (its answer will be ignored). A call whose
 * maker is gone while others still wait is made again for the next one; if
 * that fails, the waiting streams get the fail mode. Returns nothing. */
static void ac_stream_gone(uint32_t stream_id) {
    size_t i = 0;
    while (i < ac_g.npending) {
        ac_pending *p = ac_g.pending[i];
        int maker_gone = p->nstreams > 0 && p->streams[0] == stream_id;
        size_t kept = 0;
        for (size_t j = 0; j < p->nstreams; j++)
            if (p->streams[j] != stream_id) p->streams[kept++] = p->streams[j];
        p->nstreams = kept;
        if (kept == 0) {
            ac_pending_free(ac_pending_remove_at(i)); /* slot i now holds another */
            continue;
        }
        if (maker_gone && !ac_pending_reissue(p)) {
            ac_pending_remove_at(i);
            ac_metric_inc(AC_METRIC_AUTH_FAILURES);
            for (size_t j = 0; j < p->nstreams; j++)
                if (proxy_set_effective_context(p->streams[j]) == PROXY_STATUS_OK)
                    ac_fail_mode(0);
            ac_pending_free(p);
            continue;
        }
        i++;
    }
}

/* ---------------------------------------------------------------------------
 * Exported callbacks: integration and memory
 * ------------------------------------------------------------------------ */

/* ABI marker; never called. */
AC_EXPORT("proxy_abi_version_0_2_1")
void proxy_abi_version_0_2_1(void) {}

/* Allocate memory_size bytes for the host (it fills them with header
 * values, configuration, ...; the filter frees them). Returns the block,
 * or 0 on failure. */
AC_EXPORT("proxy_on_memory_allocate")
void *proxy_on_memory_allocate(size_t memory_size) {
    return AC_MALLOC(memory_size);
}

/* ---------------------------------------------------------------------------
 * Exported callbacks: contexts and configuration
 * ------------------------------------------------------------------------ */

/* A new context: remember the root (parent 0); streams need nothing. */
AC_EXPORT("proxy_on_context_create")
void proxy_on_context_create(uint32_t context_id, uint32_t parent_context_id) {
    if (parent_context_id == 0) {
        if (ac_g.root_id != 0 && ac_g.root_id != context_id)
            ac_log(PROXY_LOG_WARN, "second root context; only one plugin per VM");
        ac_g.root_id = context_id;
    }
}

/* VM configuration is not used. Returns 1 (accepted). */
AC_EXPORT("proxy_on_vm_start")
uint32_t proxy_on_vm_start(uint32_t root_id, size_t vm_configuration_size) {
    (void)root_id;
    (void)vm_configuration_size;
    return 1;
}

/* Read and apply the plugin configuration (ac_config.h), start the tick
 * timer and define the metrics. Returns 1 on success, 0 if the
 * configuration is rejected (logged at ERROR; the previous configuration,
 * or the defaults, stays in place). */
AC_EXPORT("proxy_on_configure")
uint32_t proxy_on_configure(uint32_t root_id, size_t configuration_size) {
    (void)root_id;
    const char *json = NULL;
    size_t len = 0;
    if (configuration_size > 0) {
        proxy_status_t st = proxy_get_buffer_bytes(PROXY_BUFFER_PLUGIN_CONFIGURATION,
                                                   0, configuration_size, &json, &len);
        if (st == PROXY_STATUS_NOT_FOUND) {
            json = NULL; /* no configuration: defaults */
            len = 0;
        } else if (st != PROXY_STATUS_OK) {
            ac_log_u64(PROXY_LOG_ERROR,
                       "cannot read the plugin configuration, status ", st);
            return 0;
        }
    }

    ac_config cfg;
    ac_msg err;
    int rc = ac_config_parse(&cfg, json != NULL ? json : "", len, ac_config_warn,
                             NULL, &err);
    AC_FREE((void *)json);
    if (rc != AC_CONFIG_OK) {
        ac_log(PROXY_LOG_ERROR, err.buf);
        return 0;
    }

    ac_g.cfg = cfg;
    ac_g.initialised = 1;
    if (!ac_state_ready()) return 0;
    ac_cache_set_entry_size(ac_g.cache, cfg.entry_size);

    proxy_status_t st = proxy_set_tick_period_milliseconds(cfg.tick_ms);
    if (st != PROXY_STATUS_OK)
        ac_log_u64(PROXY_LOG_WARN, "proxy_set_tick_period_milliseconds failed, status ",
                   st);
    ac_metrics_define();
    ac_gauges_record();
    return 1;
}

/* ---------------------------------------------------------------------------
 * Exported callbacks: HTTP
 * ------------------------------------------------------------------------ */

/* Authorize a request (see the table at the top of this file).
 * Returns CONTINUE to forward it now, or PAUSE while the auth call is in
 * flight or after a local response was sent. */
AC_EXPORT("proxy_on_request_headers")
proxy_action_t proxy_on_request_headers(uint32_t context_id, size_t num_headers,
                                        uint32_t end_of_stream) {
    (void)num_headers;
    (void)end_of_stream;
    if (!ac_state_ready()) return ac_auth_failed(1);

    const char *auth, *tok;
    size_t auth_len, tok_len;
    ac_header_get(PROXY_MAP_HTTP_REQUEST_HEADERS, "authorization", &auth, &auth_len);
    if (auth == NULL || !ac_bearer_token(auth, auth_len, &tok, &tok_len)) {
        AC_FREE((void *)auth);
        ac_reply_unauthorized("missing_or_malformed_token");
        return PROXY_ACTION_PAUSE;
    }

    proxy_action_t action = PROXY_ACTION_CONTINUE;
    if (ac_g.cfg.logout_path.len > 0) {
        const char *path;
        size_t path_len;
        ac_header_get(PROXY_MAP_HTTP_REQUEST_HEADERS, ":path", &path, &path_len);
        int logout = ac_is_logout(path, path_len);
        AC_FREE((void *)path);
        if (logout) {
            if (ac_cache_remove(ac_g.cache, tok, tok_len)) ac_gauges_record();
            goto done; /* CONTINUE: the logout request still goes upstream */
        }
    }

    if (ac_cache_lookup(ac_g.cache, tok, tok_len, ac_now()) == AC_CACHE_HIT) {
        ac_metric_inc(AC_METRIC_HITS);
        goto done;
    }
    ac_metric_inc(AC_METRIC_MISSES);
    action = ac_start_auth_call(context_id, auth, auth_len, tok, tok_len);

done:
    AC_FREE((void *)auth);
    return action;
}

/* The auth service answered call_id (num_headers == 0: no answer, e.g. a
 * timeout). Resume or answer the paused stream per the table at the top.
 * Unknown call ids (e.g. the stream was deleted meanwhile) are ignored. */
AC_EXPORT("proxy_on_http_call_response")
void proxy_on_http_call_response(uint32_t root_id, uint32_t call_id,
                                 size_t num_headers, size_t body_size,
                                 size_t num_trailers) {
    (void)root_id;
    (void)body_size;
    (void)num_trailers;
    ac_pending *p = ac_pending_take(call_id);
    if (p == NULL) {
        ac_log_u64(PROXY_LOG_DEBUG, "ignoring the answer to unknown call ", call_id);
        return;
    }

    uint32_t status = 0;
    if (num_headers > 0) {
        const char *v;
        size_t n;
        ac_header_get(PROXY_MAP_HTTP_CALL_RESPONSE_HEADERS, ":status", &v, &n);
        status = ac_parse_status(v, n);
        AC_FREE((void *)v);
    }

    if (status == 200) {
        int rc = ac_cache_insert(ac_g.cache, p->token, p->token_len, ac_now(),
                                 ac_g.cfg.ttl_ns);
        if (rc != AC_CACHE_OK)
            ac_log(PROXY_LOG_WARN, "could not cache a token (out of memory)");
        ac_gauges_record();
    } else if (status == 401 || status == 403) {
        ac_metric_inc(AC_METRIC_DENIED);
    } else {
        ac_metric_inc(AC_METRIC_AUTH_FAILURES);
        if (num_headers == 0) /* the host logged why (timeout, refused): one line */
            ac_log(PROXY_LOG_DEBUG, "auth call failed (no answer)");
        else if (status == 0)
            ac_log(PROXY_LOG_INFO, "auth answer without a valid :status");
        else
            ac_log_u64(PROXY_LOG_INFO, "auth service answered status ", status);
    }

    /* Every stream that waits for this answer gets it. */
    for (size_t i = 0; i < p->nstreams; i++) {
        proxy_status_t st = proxy_set_effective_context(p->streams[i]);
        if (st != PROXY_STATUS_OK) {
            ac_log_u64(PROXY_LOG_INFO, "stream of an auth call is gone, status ", st);
            continue;
        }
        if (status == 200)
            ac_resume();
        else if (status == 401 || status == 403)
            ac_reply_unauthorized("token_rejected");
        else
            ac_fail_mode(0);
    }
    ac_pending_free(p);
}

/* ---------------------------------------------------------------------------
 * Exported callbacks: timer and teardown
 * ------------------------------------------------------------------------ */

/* Evict expired entries; publish the gauges if that changed them (every other
 * change to the cache publishes them itself). A quiet tick is one guest call
 * and one host call, which matters when a simulation runs a week of ticks. */
AC_EXPORT("proxy_on_tick")
void proxy_on_tick(uint32_t root_id) {
    (void)root_id;
    if (ac_g.cache == NULL) return;
    if (ac_cache_evict_expired(ac_g.cache, ac_now()) > 0) ac_gauges_record();
}

/* Returns 1: every context may be finalized right away. */
AC_EXPORT("proxy_on_done")
uint32_t proxy_on_done(uint32_t context_id) {
    (void)context_id;
    return 1;
}

/* Forget a context: a stream's pending auth call is dropped (its answer
 * will be ignored); the root context takes the cache with it. */
AC_EXPORT("proxy_on_delete")
void proxy_on_delete(uint32_t context_id) {
    if (context_id != 0 && context_id == ac_g.root_id) {
        ac_state_release();
        ac_g.root_id = 0;
        return;
    }
    ac_stream_gone(context_id);
}
