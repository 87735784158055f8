/* ac_config.h -- plugin configuration of the auth_cache filter.
 *
 * The plugin configuration is one flat JSON object, e.g.
 *
 *   {"ttl_seconds": 600, "entry_size": 1024, "auth_cluster": "auth",
 *    "auth_authority": "auth", "auth_path": "/verify", "timeout_ms": 1000,
 *    "fail_open": false, "tick_ms": 1000, "logout_path": "/logout"}
 *
 * Every key is optional (the values above are the defaults) and an empty
 * configuration (zero bytes or only whitespace) means all defaults.
 *
 *   key             type     accepted values
 *   ttl_seconds     number   >= 0, fractions allowed (kept in nanoseconds)
 *   entry_size      integer  0 .. AC_CONFIG_MAX_ENTRY_SIZE bytes
 *   auth_cluster    string   non-empty
 *   auth_authority  string   non-empty
 *   auth_path       string   starts with '/'
 *   timeout_ms      integer  1 .. 4294967295
 *   fail_open       boolean
 *   tick_ms         integer  0 .. 4294967295 (0 disables the timer)
 *   logout_path     string   starts with '/', or "" to disable logout
 *
 * Numbers follow the JSON grammar and are read exactly up to 19 significant
 * digits (further digits are truncated). Strings are at most
 * AC_CONFIG_STR_MAX bytes after unescaping and may not contain NUL. Unknown keys (whatever their value) are skipped and reported
 * through the warning callback. Any other deviation -- malformed JSON, a
 * wrong type, a value out of range, a top level that is not an object --
 * rejects the whole configuration.
 *
 * The parser is a small recursive-descent reader over the raw bytes. It
 * allocates nothing: strings are copied into fixed arrays inside
 * ac_config, so a configuration is a plain value that can be copied with =.
 */
#ifndef AC_CONFIG_H
#define AC_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "ac_msg.h"

#define AC_CONFIG_OK 0
#define AC_CONFIG_ERR (-1)

#define AC_CONFIG_STR_MAX 255                 /* bytes per string value */
#define AC_CONFIG_MAX_ENTRY_SIZE (1u << 20)   /* 1 MiB per cache entry */

/* A string value: len bytes in data, followed by a NUL for convenience. */
typedef struct ac_config_str {
    char data[AC_CONFIG_STR_MAX + 1];
    size_t len;
} ac_config_str;

typedef struct ac_config {
    uint64_t ttl_ns;              /* ttl_seconds * 1e9 */
    uint32_t entry_size;          /* bytes per cache entry (minimum) */
    ac_config_str auth_cluster;   /* upstream name for proxy_http_call */
    ac_config_str auth_authority; /* :authority of the auth request */
    ac_config_str auth_path;      /* :path of the auth request */
    uint32_t timeout_ms;          /* auth call timeout */
    int fail_open;                /* 1: let requests through on auth failure */
    uint32_t tick_ms;             /* eviction timer period, 0 = off */
    ac_config_str logout_path;    /* path that evicts the token; "" = off */
} ac_config;

/* Receives one warning (e.g. an unknown key); msg is len bytes, not
 * necessarily NUL-terminated, and only valid during the call. */
typedef void (*ac_config_warn_fn)(void *ud, const char *msg, size_t len);

/* Fill cfg with the defaults listed above. Returns nothing. */
void ac_config_defaults(ac_config *cfg);

/* Parse json[0..len) into *out (defaults for absent keys).
 * Returns AC_CONFIG_OK with *out filled, or AC_CONFIG_ERR with *out left
 * untouched and a one-line reason (mentioning the byte offset for syntax
 * errors) in *err. warn may be NULL. Nothing is allocated; json is only
 * read during the call. */
int ac_config_parse(ac_config *out, const char *json, size_t len,
                    ac_config_warn_fn warn, void *ud, ac_msg *err);

#endif /* AC_CONFIG_H */
