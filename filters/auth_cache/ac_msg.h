/* ac_msg.h -- fixed-size text builder for log and error messages.
 *
 * The filter must not use printf (it would pull in stdio and WASI fd_write),
 * yet its log lines mention numbers and configuration keys. An ac_msg is a
 * small buffer on the caller's stack that pieces are appended to:
 *
 *   ac_msg m;
 *   ac_msg_init(&m);
 *   ac_msg_str(&m, "proxy_http_call failed, status ");
 *   ac_msg_u64(&m, status);
 *   log(m.buf, m.len);
 *
 * Appends that do not fit are truncated at AC_MSG_CAP - 1 bytes; the buffer
 * is always NUL-terminated. No heap memory is involved.
 */
#ifndef AC_MSG_H
#define AC_MSG_H

#include <stddef.h>
#include <stdint.h>

#define AC_MSG_CAP 256

typedef struct ac_msg {
    char buf[AC_MSG_CAP]; /* text, always NUL-terminated */
    size_t len;           /* bytes before the NUL */
} ac_msg;

/* Make m empty. Returns nothing. */
void ac_msg_init(ac_msg *m);

/* Append the NUL-terminated string s (truncating). Returns nothing. */
void ac_msg_str(ac_msg *m, const char *s);

/* Append n bytes from s (truncating); s may contain any bytes.
 * Returns nothing. */
void ac_msg_bytes(ac_msg *m, const char *s, size_t n);

/* Append v in decimal (truncating). Returns nothing. */
void ac_msg_u64(ac_msg *m, uint64_t v);

#endif /* AC_MSG_H */
