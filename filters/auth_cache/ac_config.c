/* ac_config.c -- defaults and JSON parsing of the plugin configuration.
 * The accepted format is described in ac_config.h. */

#include "ac_config.h"

#include <string.h>

/* Nesting limit when skipping the value of an unknown key. */
#define AC_JSON_MAX_DEPTH 16

/* Keys longer than this cannot be known keys; they are still skipped. */
#define AC_JSON_KEY_MAX 63

/* ---------------------------------------------------------------------------
 * Defaults
 * ------------------------------------------------------------------------ */

/* Copy the NUL-terminated literal s into dst. Returns nothing. */
static void ac_str_set(ac_config_str *dst, const char *s) {
    size_t n = strlen(s);
    memcpy(dst->data, s, n + 1);
    dst->len = n;
}

void ac_config_defaults(ac_config *cfg) {
    cfg->ttl_ns = 600ull * 1000000000ull;
    cfg->entry_size = 1024;
    ac_str_set(&cfg->auth_cluster, "auth");
    ac_str_set(&cfg->auth_authority, "auth");
    ac_str_set(&cfg->auth_path, "/verify");
    cfg->timeout_ms = 1000;
    cfg->fail_open = 0;
    cfg->tick_ms = 1000;
    ac_str_set(&cfg->logout_path, "/logout");
}

/* ---------------------------------------------------------------------------
 * Parser state and errors
 * ------------------------------------------------------------------------ */

typedef struct ac_json {
    const char *start; /* first byte of the document (for offsets) */
    const char *p;     /* next unread byte */
    const char *end;   /* one past the last byte */
    ac_msg *err;       /* where the first error is described */
} ac_json;

/* Record a syntax error at the current position.
 * Returns AC_CONFIG_ERR so callers can `return ac_json_fail(...)`. */
static int ac_json_fail(ac_json *j, const char *what) {
    ac_msg_init(j->err);
    ac_msg_str(j->err, "invalid configuration JSON at offset ");
    ac_msg_u64(j->err, (uint64_t)(j->p - j->start));
    ac_msg_str(j->err, ": ");
    ac_msg_str(j->err, what);
    return AC_CONFIG_ERR;
}

/* Record a semantic error about key (a NUL-terminated known key name).
 * Returns AC_CONFIG_ERR. */
static int ac_key_fail(ac_msg *err, const char *key, const char *what) {
    ac_msg_init(err);
    ac_msg_str(err, "invalid configuration: \"");
    ac_msg_str(err, key);
    ac_msg_str(err, "\" ");
    ac_msg_str(err, what);
    return AC_CONFIG_ERR;
}

/* Advance past JSON whitespace (space, tab, CR, LF). Returns nothing. */
static void ac_json_skip_ws(ac_json *j) {
    while (j->p < j->end &&
           (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

/* Consume the exact bytes of lit (e.g. "true"). Returns 1 if they were
 * there (and consumed), 0 otherwise (nothing consumed). */
static int ac_json_literal(ac_json *j, const char *lit) {
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0) return 0;
    j->p += n;
    return 1;
}

/* ---------------------------------------------------------------------------
 * Strings
 * ------------------------------------------------------------------------ */

/* Read 4 hex digits. Returns the value, or -1 if they are not hex. */
static long ac_json_hex4(ac_json *j) {
    if (j->end - j->p < 4) return -1;
    long v = 0;
    for (int i = 0; i < 4; i++) {
        char ch = j->p[i];
        int d;
        if (ch >= '0' && ch <= '9') d = ch - '0';
        else if (ch >= 'a' && ch <= 'f') d = ch - 'a' + 10;
        else if (ch >= 'A' && ch <= 'F') d = ch - 'A' + 10;
        else return -1;
        v = v * 16 + d;
    }
    j->p += 4;
    return v;
}

/* Append one byte to out (capacity cap) unless full; *len counts every
 * byte, so *len > cap afterwards means the string did not fit. */
static void ac_put(char *out, size_t cap, size_t *len, unsigned char b) {
    if (*len < cap) out[*len] = (char)b;
    (*len)++;
}

/* Append code point cp as UTF-8. */
static void ac_put_utf8(char *out, size_t cap, size_t *len, unsigned long cp) {
    if (cp < 0x80) {
        ac_put(out, cap, len, (unsigned char)cp);
    } else if (cp < 0x800) {
        ac_put(out, cap, len, (unsigned char)(0xc0 | (cp >> 6)));
        ac_put(out, cap, len, (unsigned char)(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
        ac_put(out, cap, len, (unsigned char)(0xe0 | (cp >> 12)));
        ac_put(out, cap, len, (unsigned char)(0x80 | ((cp >> 6) & 0x3f)));
        ac_put(out, cap, len, (unsigned char)(0x80 | (cp & 0x3f)));
    } else {
        ac_put(out, cap, len, (unsigned char)(0xf0 | (cp >> 18)));
        ac_put(out, cap, len, (unsigned char)(0x80 | ((cp >> 12) & 0x3f)));
        ac_put(out, cap, len, (unsigned char)(0x80 | ((cp >> 6) & 0x3f)));
        ac_put(out, cap, len, (unsigned char)(0x80 | (cp & 0x3f)));
    }
}

/* Parse a JSON string at j->p (which must be at the opening quote) and
 * unescape it into out[0..cap). Returns AC_CONFIG_OK with *len set to the
 * full unescaped length (which may exceed cap: the caller decides whether
 * truncation matters), or AC_CONFIG_ERR on a syntax error. out is not
 * NUL-terminated. NUL characters (\u0000) are rejected. */
static int ac_json_string(ac_json *j, char *out, size_t cap, size_t *len) {
    *len = 0;
    if (j->p >= j->end || *j->p != '"') return ac_json_fail(j, "expected '\"'");
    j->p++;
    for (;;) {
        if (j->p >= j->end) return ac_json_fail(j, "unterminated string");
        unsigned char ch = (unsigned char)*j->p;
        if (ch == '"') {
            j->p++;
            return AC_CONFIG_OK;
        }
        if (ch < 0x20) return ac_json_fail(j, "control character in string");
        if (ch != '\\') {
            ac_put(out, cap, len, ch);
            j->p++;
            continue;
        }
        j->p++; /* backslash */
        if (j->p >= j->end) return ac_json_fail(j, "unterminated string");
        char esc = *j->p++;
        switch (esc) {
        case '"': ac_put(out, cap, len, '"'); break;
        case '\\': ac_put(out, cap, len, '\\'); break;
        case '/': ac_put(out, cap, len, '/'); break;
        case 'b': ac_put(out, cap, len, '\b'); break;
        case 'f': ac_put(out, cap, len, '\f'); break;
        case 'n': ac_put(out, cap, len, '\n'); break;
        case 'r': ac_put(out, cap, len, '\r'); break;
        case 't': ac_put(out, cap, len, '\t'); break;
        case 'u': {
            long cp = ac_json_hex4(j);
            if (cp < 0) return ac_json_fail(j, "bad \\u escape");
            if (cp >= 0xdc00 && cp <= 0xdfff)
                return ac_json_fail(j, "unpaired surrogate in \\u escape");
            if (cp >= 0xd800 && cp <= 0xdbff) {
                if (!ac_json_literal(j, "\\u"))
                    return ac_json_fail(j, "unpaired surrogate in \\u escape");
                long lo = ac_json_hex4(j);
                if (lo < 0xdc00 || lo > 0xdfff)
                    return ac_json_fail(j, "unpaired surrogate in \\u escape");
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            }
            if (cp == 0) return ac_json_fail(j, "\\u0000 is not allowed");
            ac_put_utf8(out, cap, len, (unsigned long)cp);
            break;
        }
        default:
            j->p--;
            return ac_json_fail(j, "bad escape in string");
        }
    }
}

/* ---------------------------------------------------------------------------
 * Numbers
 * ------------------------------------------------------------------------ */

/* A JSON number scaled by 1e9 (so seconds become nanoseconds exactly). */
typedef struct ac_json_num {
    int negative;   /* a '-' sign was present */
    int overflow;   /* |value| * 1e9 does not fit in uint64 */
    int exact;      /* nano holds the value without truncation */
    uint64_t nano;  /* |value| * 1e9, truncated toward zero */
} ac_json_num;

/* Parse a number per the JSON grammar. Returns AC_CONFIG_OK with *num
 * filled, or AC_CONFIG_ERR on a syntax error. */
static int ac_json_number(ac_json *j, ac_json_num *num) {
    uint64_t mant = 0;    /* up to 19 significant digits */
    int sig = 0;          /* significant digits kept in mant */
    long exp10 = 0;       /* value = mant * 10^exp10 (before scaling) */
    int dropped_nonzero = 0;

    num->negative = 0;
    num->overflow = 0;
    if (j->p < j->end && *j->p == '-') {
        num->negative = 1;
        j->p++;
    }
    if (j->p >= j->end || *j->p < '0' || *j->p > '9')
        return ac_json_fail(j, "expected a digit");
    if (*j->p == '0') {
        j->p++; /* a leading zero stands alone */
    } else {
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
            if (sig < 19) {
                mant = mant * 10 + (uint64_t)(*j->p - '0');
                sig++;
            } else {
                exp10++; /* integer digit beyond precision: scale instead */
                if (*j->p != '0') dropped_nonzero = 1;
            }
            j->p++;
        }
    }
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (j->p >= j->end || *j->p < '0' || *j->p > '9')
            return ac_json_fail(j, "expected a digit after '.'");
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
            if (sig < 19 && !(mant == 0 && *j->p == '0' && sig == 0)) {
                mant = mant * 10 + (uint64_t)(*j->p - '0');
                sig++;
                exp10--;
            } else if (mant == 0 && sig == 0) {
                exp10--; /* leading zero of a fraction like 0.001 */
            } else if (*j->p != '0') {
                dropped_nonzero = 1;
            }
            j->p++;
        }
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        int eneg = 0;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-')) {
            eneg = *j->p == '-';
            j->p++;
        }
        if (j->p >= j->end || *j->p < '0' || *j->p > '9')
            return ac_json_fail(j, "expected a digit in exponent");
        long e = 0;
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
            if (e < 100000) e = e * 10 + (*j->p - '0'); /* clamp */
            j->p++;
        }
        exp10 += eneg ? -e : e;
    }

    /* nano = mant * 10^(exp10 + 9) */
    long shift = exp10 + 9;
    uint64_t v = mant;
    num->exact = !dropped_nonzero;
    if (v != 0) {
        for (; shift > 0; shift--) {
            if (v > UINT64_MAX / 10) {
                num->overflow = 1;
                break;
            }
            v *= 10;
        }
        for (; shift < 0 && v != 0; shift++) {
            if (v % 10 != 0) num->exact = 0;
            v /= 10;
        }
        if (v == 0) num->exact = 0; /* a nonzero value below 1e-9 */
    }
    num->nano = v;
    return AC_CONFIG_OK;
}

/* ---------------------------------------------------------------------------
 * Skipping values of unknown keys
 * ------------------------------------------------------------------------ */

/* Skip any JSON value (nested up to AC_JSON_MAX_DEPTH).
 * Returns AC_CONFIG_OK or AC_CONFIG_ERR on a syntax error. */
static int ac_json_skip_value(ac_json *j, int depth) {
    char dummy[1];
    size_t len;
    ac_json_num num;

    if (depth > AC_JSON_MAX_DEPTH) return ac_json_fail(j, "nested too deeply");
    ac_json_skip_ws(j);
    if (j->p >= j->end) return ac_json_fail(j, "expected a value");
    char ch = *j->p;
    if (ch == '"') return ac_json_string(j, dummy, 0, &len);
    if (ch == '-' || (ch >= '0' && ch <= '9')) return ac_json_number(j, &num);
    if (ac_json_literal(j, "true") || ac_json_literal(j, "false") ||
        ac_json_literal(j, "null"))
        return AC_CONFIG_OK;
    if (ch != '{' && ch != '[') return ac_json_fail(j, "expected a value");

    char close = ch == '{' ? '}' : ']';
    j->p++;
    ac_json_skip_ws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        return AC_CONFIG_OK;
    }
    for (;;) {
        if (close == '}') {
            ac_json_skip_ws(j);
            if (ac_json_string(j, dummy, 0, &len) != AC_CONFIG_OK)
                return AC_CONFIG_ERR;
            ac_json_skip_ws(j);
            if (!ac_json_literal(j, ":")) return ac_json_fail(j, "expected ':'");
        }
        if (ac_json_skip_value(j, depth + 1) != AC_CONFIG_OK) return AC_CONFIG_ERR;
        ac_json_skip_ws(j);
        if (j->p < j->end && *j->p == ',') {
            j->p++;
            continue;
        }
        if (j->p < j->end && *j->p == close) {
            j->p++;
            return AC_CONFIG_OK;
        }
        return ac_json_fail(j, close == '}' ? "expected ',' or '}'"
                                            : "expected ',' or ']'");
    }
}

/* ---------------------------------------------------------------------------
 * Typed values of known keys
 * ------------------------------------------------------------------------ */

/* Parse a string value for key into dst. Returns AC_CONFIG_OK, or
 * AC_CONFIG_ERR if it is not a string or longer than AC_CONFIG_STR_MAX. */
static int ac_value_str(ac_json *j, const char *key, ac_config_str *dst) {
    if (j->p >= j->end || *j->p != '"')
        return ac_key_fail(j->err, key, "must be a string");
    size_t len;
    if (ac_json_string(j, dst->data, AC_CONFIG_STR_MAX, &len) != AC_CONFIG_OK)
        return AC_CONFIG_ERR;
    if (len > AC_CONFIG_STR_MAX)
        return ac_key_fail(j->err, key, "is longer than 255 bytes");
    dst->data[len] = '\0';
    dst->len = len;
    return AC_CONFIG_OK;
}

/* Parse a non-negative number for key. Returns AC_CONFIG_OK with *num, or
 * AC_CONFIG_ERR if it is not a number, negative or too large. */
static int ac_value_num(ac_json *j, const char *key, ac_json_num *num) {
    if (j->p >= j->end || !(*j->p == '-' || (*j->p >= '0' && *j->p <= '9')))
        return ac_key_fail(j->err, key, "must be a number");
    if (ac_json_number(j, num) != AC_CONFIG_OK) return AC_CONFIG_ERR;
    if (num->negative && (num->nano != 0 || !num->exact))
        return ac_key_fail(j->err, key, "must not be negative");
    if (num->overflow) return ac_key_fail(j->err, key, "is too large");
    return AC_CONFIG_OK;
}

/* Parse an integer in [lo, hi] for key into *out. Returns AC_CONFIG_OK, or
 * AC_CONFIG_ERR if it is not an integer or out of range. */
static int ac_value_u32(ac_json *j, const char *key, uint32_t lo, uint32_t hi,
                        uint32_t *out) {
    ac_json_num num;
    if (ac_value_num(j, key, &num) != AC_CONFIG_OK) return AC_CONFIG_ERR;
    if (!num.exact || num.nano % 1000000000u != 0)
        return ac_key_fail(j->err, key, "must be an integer");
    uint64_t v = num.nano / 1000000000u;
    if (v < lo || v > hi) return ac_key_fail(j->err, key, "is out of range");
    *out = (uint32_t)v;
    return AC_CONFIG_OK;
}

/* Parse a boolean for key into *out (0 or 1). Returns AC_CONFIG_OK or
 * AC_CONFIG_ERR if the value is not true/false. */
static int ac_value_bool(ac_json *j, const char *key, int *out) {
    if (ac_json_literal(j, "true")) *out = 1;
    else if (ac_json_literal(j, "false")) *out = 0;
    else return ac_key_fail(j->err, key, "must be true or false");
    return AC_CONFIG_OK;
}

/* Returns nonzero if key[0..len) equals the NUL-terminated name. */
static int ac_key_is(const char *key, size_t len, const char *name) {
    return strlen(name) == len && memcmp(key, name, len) == 0;
}

/* Report an unknown key through warn (control bytes shown as '?'). */
static void ac_warn_unknown(ac_config_warn_fn warn, void *ud, const char *key,
                            size_t len) {
    if (warn == NULL) return;
    ac_msg m;
    ac_msg_init(&m);
    ac_msg_str(&m, "unknown configuration key \"");
    size_t shown = len > AC_JSON_KEY_MAX ? AC_JSON_KEY_MAX : len;
    for (size_t i = 0; i < shown; i++) {
        char c = (unsigned char)key[i] < 0x20 || key[i] == 0x7f ? '?' : key[i];
        ac_msg_bytes(&m, &c, 1);
    }
    if (len > shown) ac_msg_str(&m, "...");
    ac_msg_str(&m, "\" ignored");
    warn(ud, m.buf, m.len);
}

/* Parse the value of one member whose key is key[0..klen) into cfg.
 * Returns AC_CONFIG_OK or AC_CONFIG_ERR. */
static int ac_member(ac_json *j, ac_config *cfg, const char *key, size_t klen,
                     ac_config_warn_fn warn, void *ud) {
    ac_json_num num;

    if (klen <= AC_JSON_KEY_MAX) {
        if (ac_key_is(key, klen, "ttl_seconds")) {
            if (ac_value_num(j, "ttl_seconds", &num) != AC_CONFIG_OK)
                return AC_CONFIG_ERR;
            cfg->ttl_ns = num.nano;
            return AC_CONFIG_OK;
        }
        if (ac_key_is(key, klen, "entry_size"))
            return ac_value_u32(j, "entry_size", 0, AC_CONFIG_MAX_ENTRY_SIZE,
                                &cfg->entry_size);
        if (ac_key_is(key, klen, "timeout_ms"))
            return ac_value_u32(j, "timeout_ms", 1, UINT32_MAX, &cfg->timeout_ms);
        if (ac_key_is(key, klen, "tick_ms"))
            return ac_value_u32(j, "tick_ms", 0, UINT32_MAX, &cfg->tick_ms);
        if (ac_key_is(key, klen, "fail_open"))
            return ac_value_bool(j, "fail_open", &cfg->fail_open);
        if (ac_key_is(key, klen, "auth_cluster"))
            return ac_value_str(j, "auth_cluster", &cfg->auth_cluster);
        if (ac_key_is(key, klen, "auth_authority"))
            return ac_value_str(j, "auth_authority", &cfg->auth_authority);
        if (ac_key_is(key, klen, "auth_path"))
            return ac_value_str(j, "auth_path", &cfg->auth_path);
        if (ac_key_is(key, klen, "logout_path"))
            return ac_value_str(j, "logout_path", &cfg->logout_path);
    }
    ac_warn_unknown(warn, ud, key, klen);
    return ac_json_skip_value(j, 1);
}

/* Check the cross-field rules that the per-key parsers cannot.
 * Returns AC_CONFIG_OK or AC_CONFIG_ERR with *err set. */
static int ac_config_validate(const ac_config *cfg, ac_msg *err) {
    if (cfg->auth_cluster.len == 0)
        return ac_key_fail(err, "auth_cluster", "must not be empty");
    if (cfg->auth_authority.len == 0)
        return ac_key_fail(err, "auth_authority", "must not be empty");
    if (cfg->auth_path.len == 0 || cfg->auth_path.data[0] != '/')
        return ac_key_fail(err, "auth_path", "must start with '/'");
    if (cfg->logout_path.len != 0 && cfg->logout_path.data[0] != '/')
        return ac_key_fail(err, "logout_path", "must start with '/' or be empty");
    return AC_CONFIG_OK;
}

/* ---------------------------------------------------------------------------
 * Entry point
 * ------------------------------------------------------------------------ */

int ac_config_parse(ac_config *out, const char *json, size_t len,
                    ac_config_warn_fn warn, void *ud, ac_msg *err) {
    ac_config cfg;
    ac_json j = {json, json, json + len, err};
    char key[AC_JSON_KEY_MAX];
    size_t klen;

    ac_config_defaults(&cfg);
    ac_json_skip_ws(&j);
    if (j.p == j.end) { /* empty configuration: all defaults */
        *out = cfg;
        return AC_CONFIG_OK;
    }
    if (*j.p != '{') return ac_json_fail(&j, "the configuration must be an object");
    j.p++;
    ac_json_skip_ws(&j);
    if (j.p < j.end && *j.p == '}') {
        j.p++;
    } else {
        for (;;) {
            ac_json_skip_ws(&j);
            if (ac_json_string(&j, key, sizeof(key), &klen) != AC_CONFIG_OK)
                return AC_CONFIG_ERR;
            ac_json_skip_ws(&j);
            if (!ac_json_literal(&j, ":")) return ac_json_fail(&j, "expected ':'");
            ac_json_skip_ws(&j);
            if (ac_member(&j, &cfg, key, klen, warn, ud) != AC_CONFIG_OK)
                return AC_CONFIG_ERR;
            ac_json_skip_ws(&j);
            if (j.p < j.end && *j.p == ',') {
                j.p++;
                continue;
            }
            if (j.p < j.end && *j.p == '}') {
                j.p++;
                break;
            }
            return ac_json_fail(&j, "expected ',' or '}'");
        }
    }
    ac_json_skip_ws(&j);
    if (j.p != j.end) return ac_json_fail(&j, "unexpected data after the object");
    if (ac_config_validate(&cfg, err) != AC_CONFIG_OK) return AC_CONFIG_ERR;
    *out = cfg;
    return AC_CONFIG_OK;
}
