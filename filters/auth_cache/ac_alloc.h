/* ac_alloc.h -- the one allocation indirection of the auth_cache filter.
 *
 * Every heap allocation in filters/auth_cache goes through AC_MALLOC,
 * AC_REALLOC and AC_FREE. By default they are the C library's allocator:
 * in the wasm32-wasi build that is wasi-libc's dlmalloc, which reuses freed
 * chunks but never returns linear memory to the host (memory.grow only
 * grows). That behaviour is the subject of the whole project, so the filter
 * deliberately uses no allocator of its own.
 *
 * A test or another embedding can route allocations elsewhere by defining
 * the three macros before this header is included (e.g. with -D on the
 * compiler command line). Semantics must match malloc/realloc/free:
 * AC_MALLOC(n) returns NULL on failure, AC_FREE(NULL) is a no-op.
 */
#ifndef AC_ALLOC_H
#define AC_ALLOC_H

#include <stdlib.h>

#ifndef AC_MALLOC
#define AC_MALLOC(n) malloc(n)
#endif

#ifndef AC_REALLOC
#define AC_REALLOC(p, n) realloc((p), (n))
#endif

#ifndef AC_FREE
#define AC_FREE(p) free(p)
#endif

#endif /* AC_ALLOC_H */
