/* proxy_wasm.h -- the part of the Proxy-Wasm ABI v0.2.1 this filter uses.
 *
 * Source: the public specification, proxy-wasm/spec,
 * abi-versions/v0.2.1/README.md. Names here are the specification's own
 * (proxy_* functions, proxy_*_t types, PROXY_* constants); everything the
 * filter defines itself carries the ac_/AC_ prefix instead.
 *
 * Conventions of the ABI:
 *   - Every host function returns a proxy_status_t; results are written
 *     through the return_* pointers.
 *   - Buffers the host returns (header values, configuration bytes) are
 *     allocated inside the guest by calling the module's exported
 *     proxy_on_memory_allocate; the guest owns them and frees them.
 *   - Integers in serialized maps are little-endian u32.
 *   - All host functions are imported from module "env".
 *
 * Only the functions in this file are imported; the filter calls no WASI
 * function itself.
 */
#ifndef PROXY_WASM_H
#define PROXY_WASM_H

#include <stddef.h>
#include <stdint.h>

#define PROXY_IMPORT(name) \
    __attribute__((import_module("env"), import_name(name)))

/* ---------------------------------------------------------------------------
 * Types (spec section "Types")
 * ------------------------------------------------------------------------ */

typedef uint32_t proxy_status_t;
#define PROXY_STATUS_OK 0
#define PROXY_STATUS_NOT_FOUND 1
#define PROXY_STATUS_BAD_ARGUMENT 2
#define PROXY_STATUS_SERIALIZATION_FAILURE 3
#define PROXY_STATUS_PARSE_FAILURE 4
#define PROXY_STATUS_INVALID_MEMORY_ACCESS 6
#define PROXY_STATUS_EMPTY 7
#define PROXY_STATUS_CAS_MISMATCH 8
#define PROXY_STATUS_INTERNAL_FAILURE 10
#define PROXY_STATUS_UNIMPLEMENTED 12

typedef uint32_t proxy_log_level_t;
#define PROXY_LOG_TRACE 0
#define PROXY_LOG_DEBUG 1
#define PROXY_LOG_INFO 2
#define PROXY_LOG_WARN 3
#define PROXY_LOG_ERROR 4
#define PROXY_LOG_CRITICAL 5

typedef uint32_t proxy_action_t;
#define PROXY_ACTION_CONTINUE 0
#define PROXY_ACTION_PAUSE 1

typedef uint32_t proxy_buffer_type_t;
#define PROXY_BUFFER_HTTP_REQUEST_BODY 0
#define PROXY_BUFFER_HTTP_RESPONSE_BODY 1
#define PROXY_BUFFER_DOWNSTREAM_DATA 2
#define PROXY_BUFFER_UPSTREAM_DATA 3
#define PROXY_BUFFER_HTTP_CALL_RESPONSE_BODY 4
#define PROXY_BUFFER_GRPC_CALL_MESSAGE 5
#define PROXY_BUFFER_VM_CONFIGURATION 6
#define PROXY_BUFFER_PLUGIN_CONFIGURATION 7
#define PROXY_BUFFER_FOREIGN_FUNCTION_ARGUMENTS 8

typedef uint32_t proxy_map_type_t;
#define PROXY_MAP_HTTP_REQUEST_HEADERS 0
#define PROXY_MAP_HTTP_REQUEST_TRAILERS 1
#define PROXY_MAP_HTTP_RESPONSE_HEADERS 2
#define PROXY_MAP_HTTP_RESPONSE_TRAILERS 3
#define PROXY_MAP_GRPC_CALL_INITIAL_METADATA 4
#define PROXY_MAP_GRPC_CALL_TRAILING_METADATA 5
#define PROXY_MAP_HTTP_CALL_RESPONSE_HEADERS 6
#define PROXY_MAP_HTTP_CALL_RESPONSE_TRAILERS 7

typedef uint32_t proxy_stream_type_t;
#define PROXY_STREAM_HTTP_REQUEST 0
#define PROXY_STREAM_HTTP_RESPONSE 1
#define PROXY_STREAM_DOWNSTREAM 2
#define PROXY_STREAM_UPSTREAM 3

typedef uint32_t proxy_metric_type_t;
#define PROXY_METRIC_COUNTER 0
#define PROXY_METRIC_GAUGE 1
#define PROXY_METRIC_HISTOGRAM 2

/* grpc_status argument of proxy_send_local_response for plain HTTP
 * responses (no gRPC status); the SDKs pass -1. */
#define PROXY_GRPC_STATUS_NONE 0xffffffffu

/* ---------------------------------------------------------------------------
 * Logging and clocks
 * ------------------------------------------------------------------------ */

/* Log message_data[0..message_size) at log_level.
 * Returns: Ok, BadArgument (unknown level), InvalidMemoryAccess */
PROXY_IMPORT("proxy_log")
proxy_status_t proxy_log(proxy_log_level_t log_level, const char *message_data,
                         size_t message_size);

/* Write the host's current time (ns since the Unix epoch; our host may run
 * a scaled virtual clock) to *return_time.
 * Returns: Ok, InvalidMemoryAccess */
PROXY_IMPORT("proxy_get_current_time_nanoseconds")
proxy_status_t proxy_get_current_time_nanoseconds(uint64_t *return_time);

/* Call proxy_on_tick every tick_period ms on the root context; 0 disables.
 * Returns: Ok */
PROXY_IMPORT("proxy_set_tick_period_milliseconds")
proxy_status_t proxy_set_tick_period_milliseconds(uint32_t tick_period);

/* ---------------------------------------------------------------------------
 * Contexts
 * ------------------------------------------------------------------------ */

/* Make context_id the context later calls act on (used in
 * proxy_on_http_call_response to act on the paused stream).
 * Returns: Ok, BadArgument (unknown context) */
PROXY_IMPORT("proxy_set_effective_context")
proxy_status_t proxy_set_effective_context(uint32_t context_id);

/* ---------------------------------------------------------------------------
 * Buffers and header maps
 * ------------------------------------------------------------------------ */

/* Copy up to max_size bytes from start of buffer buffer_id into a block
 * the host allocates with proxy_on_memory_allocate; the guest owns
 * *return_value_data afterwards and must free it.
 * Returns: Ok, BadArgument (unknown buffer or bad range), NotFound
 * (buffer not available in this callback), InvalidMemoryAccess */
PROXY_IMPORT("proxy_get_buffer_bytes")
proxy_status_t proxy_get_buffer_bytes(proxy_buffer_type_t buffer_id,
                                      size_t start, size_t max_size,
                                      const char **return_value_data,
                                      size_t *return_value_size);

/* Look key_data[0..key_size) up in map map_id (our host lowercases header
 * names, so keys are lowercase). The value is copied into a guest block
 * the guest owns and must free.
 * Returns: Ok, BadArgument (unknown map), NotFound (no such key),
 * InvalidMemoryAccess */
PROXY_IMPORT("proxy_get_header_map_value")
proxy_status_t proxy_get_header_map_value(proxy_map_type_t map_id,
                                          const char *key_data, size_t key_size,
                                          const char **return_value_data,
                                          size_t *return_value_size);

/* ---------------------------------------------------------------------------
 * Streams
 * ------------------------------------------------------------------------ */

/* Answer the current stream with a response generated here instead of
 * forwarding it upstream. headers are a serialized map; all buffers are
 * borrowed for the call only.
 * Returns: Ok, InvalidMemoryAccess */
PROXY_IMPORT("proxy_send_local_response")
proxy_status_t proxy_send_local_response(uint32_t status_code,
                                         const char *status_code_details_data,
                                         size_t status_code_details_size,
                                         const char *body_data, size_t body_size,
                                         const char *serialized_headers_data,
                                         size_t serialized_headers_size,
                                         uint32_t grpc_status);

/* Resume a stream paused by returning PAUSE from a callback.
 * Returns: Ok, BadArgument (unknown stream type), Unimplemented */
PROXY_IMPORT("proxy_continue_stream")
proxy_status_t proxy_continue_stream(proxy_stream_type_t stream_type);

/* ---------------------------------------------------------------------------
 * HTTP calls
 * ------------------------------------------------------------------------ */

/* Send an HTTP request to upstream (a cluster name). The headers must
 * contain :method, :path and :authority. proxy_on_http_call_response is
 * called later with *return_call_id, on the answer or after timeout ms.
 * All buffers are borrowed for the call only.
 * Returns: Ok, BadArgument (unknown upstream or missing pseudo-headers),
 * InternalFailure (could not send), InvalidMemoryAccess */
PROXY_IMPORT("proxy_http_call")
proxy_status_t proxy_http_call(const char *upstream_name_data,
                               size_t upstream_name_size,
                               const char *serialized_headers_data,
                               size_t serialized_headers_size,
                               const char *body_data, size_t body_size,
                               const char *serialized_trailers_data,
                               size_t serialized_trailers_size,
                               uint32_t timeout, uint32_t *return_call_id);

/* ---------------------------------------------------------------------------
 * Metrics
 * ------------------------------------------------------------------------ */

/* Define a metric named name_data[0..name_size) and write its id.
 * Returns: Ok, BadArgument (unknown type), InvalidMemoryAccess */
PROXY_IMPORT("proxy_define_metric")
proxy_status_t proxy_define_metric(proxy_metric_type_t metric_type,
                                   const char *name_data, size_t name_size,
                                   uint32_t *return_metric_id);

/* Set metric metric_id (a gauge, here) to value.
 * Returns: Ok, NotFound (unknown metric) */
PROXY_IMPORT("proxy_record_metric")
proxy_status_t proxy_record_metric(uint32_t metric_id, uint64_t value);

/* Add delta to metric metric_id (a counter, here).
 * Returns: Ok, NotFound (unknown metric), BadArgument (e.g. decrementing
 * a counter) */
PROXY_IMPORT("proxy_increment_metric")
proxy_status_t proxy_increment_metric(uint32_t metric_id, int64_t delta);

#endif /* PROXY_WASM_H */
