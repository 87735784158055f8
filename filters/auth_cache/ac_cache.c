/* ac_cache.c -- token cache: chained hash table of one-block entries.
 * The data structure is described in ac_cache.h. */

#include "ac_cache.h"

#include <string.h>

#include "ac_alloc.h"

/* Tests compile this file with -DAC_CACHE_HASH_MASK=0x3 so that every token
 * lands in one of four hash values: long collision chains and rehashes that
 * move whole chains at once. Production builds keep all 32 bits. */
#ifndef AC_CACHE_HASH_MASK
#define AC_CACHE_HASH_MASK 0xffffffffu
#endif

/* ---------------------------------------------------------------------------
 * Types
 * ------------------------------------------------------------------------ */

typedef struct ac_entry {
    uint64_t expiry_ns;      /* valid while now < expiry_ns */
    struct ac_entry *next;   /* next entry in the same bucket, or NULL */
    size_t token_len;        /* bytes in token[] */
    size_t block_size;       /* bytes of this whole block (header included) */
    uint32_t hash;           /* full hash, kept so rehash need not recompute */
    unsigned char token[];   /* token bytes, then zero filler */
} ac_entry;

struct ac_cache {
    ac_entry **buckets;      /* nbuckets chain heads */
    size_t nbuckets;         /* power of two */
    size_t entry_size;       /* minimum block size of new entries */
    size_t live_entries;     /* entries allocated */
    size_t live_bytes;       /* sum of their block_size */
};

#define AC_ENTRY_HEADER_SIZE offsetof(ac_entry, token)

/* ---------------------------------------------------------------------------
 * Hashing and search
 * ------------------------------------------------------------------------ */

/* FNV-1a over the token, then the murmur3 finalizer so that the low bits
 * (used to pick a bucket) depend on every input byte.
 * Returns the 32-bit hash, masked by AC_CACHE_HASH_MASK. */
static uint32_t ac_hash(const unsigned char *p, size_t len) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h & AC_CACHE_HASH_MASK;
}

/* Returns nonzero if entry e holds exactly tok[0..len). */
static int ac_entry_matches(const ac_entry *e, uint32_t hash,
                            const unsigned char *tok, size_t len) {
    if (e->hash != hash || e->token_len != len) return 0;
    return len == 0 || memcmp(e->token, tok, len) == 0;
}

/* Find tok in the table. Returns a pointer to the link that points at the
 * matching entry (the bucket head or the previous entry's next field), so
 * the caller can unlink it; returns NULL if the token is absent. */
static ac_entry **ac_find_link(const ac_cache *c, uint32_t hash,
                               const unsigned char *tok, size_t len) {
    ac_entry **link = &c->buckets[hash & (c->nbuckets - 1)];
    while (*link != NULL) {
        if (ac_entry_matches(*link, hash, tok, len)) return link;
        link = &(*link)->next;
    }
    return NULL;
}

/* ---------------------------------------------------------------------------
 * Growth
 * ------------------------------------------------------------------------ */

/* Double the bucket array and move every entry to its new chain.
 * Returns AC_CACHE_OK, or AC_CACHE_ERR_NOMEM with the table unchanged. */
static int ac_grow(ac_cache *c) {
    size_t n = c->nbuckets * 2;
    if (n < c->nbuckets || n > SIZE_MAX / sizeof(ac_entry *))
        return AC_CACHE_ERR_NOMEM;
    ac_entry **nb = AC_MALLOC(n * sizeof(ac_entry *));
    if (nb == NULL) return AC_CACHE_ERR_NOMEM;
    for (size_t i = 0; i < n; i++) nb[i] = NULL;

    for (size_t i = 0; i < c->nbuckets; i++) {
        ac_entry *e = c->buckets[i];
        while (e != NULL) {
            ac_entry *next = e->next;
            size_t j = e->hash & (n - 1);
            e->next = nb[j];
            nb[j] = e;
            e = next;
        }
    }
    AC_FREE(c->buckets);
    c->buckets = nb;
    c->nbuckets = n;
    return AC_CACHE_OK;
}

/* ---------------------------------------------------------------------------
 * Lifetime
 * ------------------------------------------------------------------------ */

ac_cache *ac_cache_new(size_t entry_size) {
    ac_cache *c = AC_MALLOC(sizeof(*c));
    if (c == NULL) return NULL;
    c->buckets = AC_MALLOC(AC_CACHE_INITIAL_BUCKETS * sizeof(ac_entry *));
    if (c->buckets == NULL) {
        AC_FREE(c);
        return NULL;
    }
    for (size_t i = 0; i < AC_CACHE_INITIAL_BUCKETS; i++) c->buckets[i] = NULL;
    c->nbuckets = AC_CACHE_INITIAL_BUCKETS;
    c->entry_size = entry_size;
    c->live_entries = 0;
    c->live_bytes = 0;
    return c;
}

void ac_cache_free(ac_cache *c) {
    if (c == NULL) return;
    for (size_t i = 0; i < c->nbuckets; i++) {
        ac_entry *e = c->buckets[i];
        while (e != NULL) {
            ac_entry *next = e->next;
            AC_FREE(e);
            e = next;
        }
    }
    AC_FREE(c->buckets);
    AC_FREE(c);
}

void ac_cache_set_entry_size(ac_cache *c, size_t entry_size) {
    c->entry_size = entry_size;
}

/* ---------------------------------------------------------------------------
 * Operations
 * ------------------------------------------------------------------------ */

int ac_cache_lookup(const ac_cache *c, const void *tok, size_t len,
                    uint64_t now_ns) {
    uint32_t hash = ac_hash(tok, len);
    ac_entry **link = ac_find_link(c, hash, tok, len);
    if (link == NULL) return AC_CACHE_MISS;
    return now_ns < (*link)->expiry_ns ? AC_CACHE_HIT : AC_CACHE_MISS;
}

int ac_cache_insert(ac_cache *c, const void *tok, size_t len,
                    uint64_t now_ns, uint64_t ttl_ns) {
    uint64_t expiry = now_ns + ttl_ns;
    if (expiry < now_ns) expiry = UINT64_MAX; /* saturate */

    uint32_t hash = ac_hash(tok, len);
    ac_entry **link = ac_find_link(c, hash, tok, len);
    if (link != NULL) {
        (*link)->expiry_ns = expiry; /* replace in place, keep the block */
        return AC_CACHE_OK;
    }

    size_t block = ac_cache_block_size(c, len);
    if (block == 0) return AC_CACHE_ERR_RANGE;
    ac_entry *e = AC_MALLOC(block);
    if (e == NULL) return AC_CACHE_ERR_NOMEM;
    e->expiry_ns = expiry;
    e->token_len = len;
    e->block_size = block;
    e->hash = hash;
    if (len > 0) memcpy(e->token, tok, len);
    /* Touch the filler: it stands for the cached auth result. */
    memset(e->token + len, 0, block - AC_ENTRY_HEADER_SIZE - len);

    size_t i = hash & (c->nbuckets - 1);
    e->next = c->buckets[i];
    c->buckets[i] = e;
    c->live_entries++;
    c->live_bytes += block;

    /* Keep the load factor at most 1. Failure is harmless: chains grow. */
    if (c->live_entries > c->nbuckets) (void)ac_grow(c);
    return AC_CACHE_OK;
}

/* Unlink the entry *link points at, free it and update the counters. */
static void ac_unlink(ac_cache *c, ac_entry **link) {
    ac_entry *e = *link;
    *link = e->next;
    c->live_entries--;
    c->live_bytes -= e->block_size;
    AC_FREE(e);
}

int ac_cache_remove(ac_cache *c, const void *tok, size_t len) {
    uint32_t hash = ac_hash(tok, len);
    ac_entry **link = ac_find_link(c, hash, tok, len);
    if (link == NULL) return 0;
    ac_unlink(c, link);
    return 1;
}

size_t ac_cache_evict_expired(ac_cache *c, uint64_t now_ns) {
    size_t evicted = 0;
    for (size_t i = 0; i < c->nbuckets; i++) {
        ac_entry **link = &c->buckets[i];
        while (*link != NULL) {
            if ((*link)->expiry_ns <= now_ns) {
                ac_unlink(c, link); /* *link now is the next entry */
                evicted++;
            } else {
                link = &(*link)->next;
            }
        }
    }
    return evicted;
}

/* ---------------------------------------------------------------------------
 * Introspection
 * ------------------------------------------------------------------------ */

size_t ac_cache_live_entries(const ac_cache *c) { return c->live_entries; }

size_t ac_cache_live_bytes(const ac_cache *c) { return c->live_bytes; }

size_t ac_cache_bucket_count(const ac_cache *c) { return c->nbuckets; }

size_t ac_cache_entry_header_size(void) { return AC_ENTRY_HEADER_SIZE; }

size_t ac_cache_block_size(const ac_cache *c, size_t token_len) {
    if (token_len > SIZE_MAX - AC_ENTRY_HEADER_SIZE) return 0;
    size_t need = AC_ENTRY_HEADER_SIZE + token_len;
    return need > c->entry_size ? need : c->entry_size;
}
