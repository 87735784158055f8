/* ac_msg.c -- fixed-size text builder; see ac_msg.h. */

#include "ac_msg.h"

void ac_msg_init(ac_msg *m) {
    m->len = 0;
    m->buf[0] = '\0';
}

void ac_msg_bytes(ac_msg *m, const char *s, size_t n) {
    size_t room = AC_MSG_CAP - 1 - m->len;
    if (n > room) n = room;
    for (size_t i = 0; i < n; i++) m->buf[m->len + i] = s[i];
    m->len += n;
    m->buf[m->len] = '\0';
}

void ac_msg_str(ac_msg *m, const char *s) {
    size_t n = 0;
    while (s[n] != '\0') n++;
    ac_msg_bytes(m, s, n);
}

void ac_msg_u64(ac_msg *m, uint64_t v) {
    char digits[20]; /* UINT64_MAX has 20 decimal digits */
    size_t n = 0;
    do {
        digits[sizeof(digits) - 1 - n] = (char)('0' + v % 10);
        v /= 10;
        n++;
    } while (v != 0);
    ac_msg_bytes(m, digits + sizeof(digits) - n, n);
}
