/* ac_cache.h -- token cache of the auth_cache Proxy-Wasm filter.
 *
 * The cache maps a bearer token (arbitrary bytes) to the time its positive
 * auth result expires. It is a hash table with separate chaining:
 *
 *   ac_cache
 *   +-------------+      buckets[0] -> NULL
 *   | buckets  ---+--->  buckets[1] -> [entry] -> [entry] -> NULL
 *   | nbuckets    |      buckets[2] -> [entry] -> NULL
 *   | live_...    |      ...           (nbuckets is a power of two)
 *   +-------------+
 *
 * Each entry is ONE heap block (see ac_alloc.h) laid out as
 *
 *   +---------------------------+----------------+--------------------+
 *   | header (next, expiry,     | token bytes    | zero filler up to  |
 *   | hash, lengths)            | (exact copy)   | entry_size bytes   |
 *   +---------------------------+----------------+--------------------+
 *
 * The block is max(entry_size, header + token_len) bytes. The filler stands
 * for the auth result a real filter would keep (user record, claims); with
 * the default entry_size of 1024 every cached token costs about 1 KiB of
 * linear memory, which is what the paper's measurements assume.
 *
 * Tokens are compared byte for byte (the stored copy), so hash collisions
 * never produce false hits. The table doubles (full rehash) when the number
 * of entries exceeds the number of buckets (load factor 1); it never
 * shrinks. If growing fails for lack of memory the table keeps working with
 * longer chains.
 *
 * An entry is valid while now_ns < expiry_ns. Lookups never modify the
 * table: an expired entry stays allocated (and counted) until
 * ac_cache_evict_expired(), ac_cache_remove() or a re-insert of the same
 * token. That mirrors the filter, which evicts on its timer tick.
 *
 * Ground truth for the evaluation: ac_cache_live_bytes() is the sum of the
 * block sizes of all entries currently allocated (the guest's "required"
 * memory for the cache). It does not include the bucket array
 * (ac_cache_bucket_count() pointers) or the allocator's own overhead.
 *
 * The hash is not keyed: only tokens the auth server accepted are inserted,
 * so a client cannot flood one chain with tokens of its choosing.
 *
 * This module has no Proxy-Wasm dependency; it builds natively (the oracle
 * test in tests/test_cache_oracle.py loads it with ctypes) and for wasm32.
 */
#ifndef AC_CACHE_H
#define AC_CACHE_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------------
 * Return codes
 * ------------------------------------------------------------------------ */

#define AC_CACHE_OK 0            /* success */
#define AC_CACHE_ERR_NOMEM (-1)  /* an allocation failed; nothing changed */
#define AC_CACHE_ERR_RANGE (-2)  /* token too long to describe in a block */

#define AC_CACHE_MISS 0 /* ac_cache_lookup: absent or expired */
#define AC_CACHE_HIT 1  /* ac_cache_lookup: present and not expired */

/* Bucket count of a new table; must be a power of two. */
#define AC_CACHE_INITIAL_BUCKETS 16

typedef struct ac_cache ac_cache;

/* ---------------------------------------------------------------------------
 * Lifetime
 * ------------------------------------------------------------------------ */

/* Create an empty cache whose entries occupy at least entry_size bytes.
 * Returns the cache, owned by the caller (release with ac_cache_free), or
 * NULL if memory is exhausted (nothing is leaked). */
ac_cache *ac_cache_new(size_t entry_size);

/* Free every entry, the bucket array and the cache itself. The pointer is
 * invalid afterwards. NULL is accepted and ignored. */
void ac_cache_free(ac_cache *c);

/* Change the minimum block size used by later insertions. Entries already
 * in the table keep the blocks they were allocated with (and are counted
 * with those sizes). Returns nothing; cannot fail. */
void ac_cache_set_entry_size(ac_cache *c, size_t entry_size);

/* ---------------------------------------------------------------------------
 * Operations (tokens are borrowed for the duration of the call only)
 * ------------------------------------------------------------------------ */

/* Look tok[0..len) up at time now_ns. Returns AC_CACHE_HIT if the token is
 * present and now_ns < its expiry, AC_CACHE_MISS otherwise. Never modifies
 * the cache. tok may be NULL when len is 0. */
int ac_cache_lookup(const ac_cache *c, const void *tok, size_t len,
                    uint64_t now_ns);

/* Cache tok[0..len) until now_ns + ttl_ns (saturating at UINT64_MAX). If the
 * token is already present (expired or not) its expiry is replaced in place
 * and its block is kept. Otherwise one block of ac_cache_block_size() bytes
 * is allocated and owned by the cache; the token bytes are copied.
 * Returns AC_CACHE_OK, AC_CACHE_ERR_NOMEM (cache unchanged) or
 * AC_CACHE_ERR_RANGE (token length would overflow a block size). */
int ac_cache_insert(ac_cache *c, const void *tok, size_t len,
                    uint64_t now_ns, uint64_t ttl_ns);

/* Remove tok[0..len) and free its block, whether expired or not.
 * Returns 1 if an entry was removed, 0 if the token was absent. */
int ac_cache_remove(ac_cache *c, const void *tok, size_t len);

/* Remove and free every entry with expiry <= now_ns.
 * Returns the number of entries removed. */
size_t ac_cache_evict_expired(ac_cache *c, uint64_t now_ns);

/* ---------------------------------------------------------------------------
 * Introspection (all O(1), none modify the cache)
 * ------------------------------------------------------------------------ */

/* Returns the number of entries allocated (expired or not). */
size_t ac_cache_live_entries(const ac_cache *c);

/* Returns the sum of the block sizes of all allocated entries, in bytes. */
size_t ac_cache_live_bytes(const ac_cache *c);

/* Returns the current number of buckets (a power of two). */
size_t ac_cache_bucket_count(const ac_cache *c);

/* Returns the size of an entry header in bytes for this build (the token
 * bytes start right after it). Differs between wasm32 and 64-bit hosts. */
size_t ac_cache_entry_header_size(void);

/* Returns the block size a new entry for a token of token_len bytes would
 * get with the cache's current entry_size: max(entry_size, header +
 * token_len), or 0 if that would overflow size_t. */
size_t ac_cache_block_size(const ac_cache *c, size_t token_len);

#endif /* AC_CACHE_H */
