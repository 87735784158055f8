// Package proxywasm is a small Proxy-Wasm ABI v0.2.1 binding for standard Go (>= 1.24,
// GOOS=wasip1, -buildmode=c-shared): host calls are imported with //go:wasmimport and the
// callbacks are exported with //go:wasmexport, as the current Go SDK does. It is the part of
// the conformance filter that stands in for an SDK, kept to what the filter needs.
package proxywasm

import "unsafe"

// Status is the ABI's proxy_status_t.
type Status uint32

const (
	StatusOK            Status = 0
	StatusNotFound      Status = 1
	StatusBadArgument   Status = 2
	StatusEmpty         Status = 7
	StatusCasMismatch   Status = 8
	StatusUnimplemented Status = 12
)

// Action is what a stream callback returns.
type Action uint32

const (
	ActionContinue Action = 0
	ActionPause    Action = 1
)

// MapType names a header map (proxy_map_type_t).
type MapType uint32

const (
	RequestHeaders          MapType = 0
	RequestTrailers         MapType = 1
	ResponseHeaders         MapType = 2
	ResponseTrailers        MapType = 3
	HttpCallResponseHeaders MapType = 6
)

// BufferType names a buffer (proxy_buffer_type_t).
type BufferType uint32

const (
	RequestBody          BufferType = 0
	ResponseBody         BufferType = 1
	HttpCallResponseBody BufferType = 4
	VMConfiguration      BufferType = 6
	PluginConfiguration  BufferType = 7
)

// MetricType is proxy_metric_type_t.
type MetricType uint32

const (
	Counter   MetricType = 0
	Gauge     MetricType = 1
	Histogram MetricType = 2
)

//go:wasmimport env proxy_log
func proxyLog(level uint32, msg unsafe.Pointer, size uint32) uint32

//go:wasmimport env proxy_set_tick_period_milliseconds
func proxySetTickPeriodMilliseconds(ms uint32) uint32

//go:wasmimport env proxy_get_buffer_bytes
func proxyGetBufferBytes(t uint32, start uint32, max uint32, retPtr unsafe.Pointer, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_set_buffer_bytes
func proxySetBufferBytes(t uint32, start uint32, size uint32, data unsafe.Pointer, dataSize uint32) uint32

//go:wasmimport env proxy_get_header_map_value
func proxyGetHeaderMapValue(t uint32, key unsafe.Pointer, keySize uint32, retPtr unsafe.Pointer, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_add_header_map_value
func proxyAddHeaderMapValue(t uint32, key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_replace_header_map_value
func proxyReplaceHeaderMapValue(t uint32, key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_remove_header_map_value
func proxyRemoveHeaderMapValue(t uint32, key unsafe.Pointer, keySize uint32) uint32

//go:wasmimport env proxy_continue_stream
func proxyContinueStream(streamType uint32) uint32

//go:wasmimport env proxy_send_local_response
func proxySendLocalResponse(status uint32, details unsafe.Pointer, detailsSize uint32, body unsafe.Pointer, bodySize uint32, headers unsafe.Pointer, headersSize uint32, grpcStatus int32) uint32

//go:wasmimport env proxy_http_call
func proxyHttpCall(upstream unsafe.Pointer, upstreamSize uint32, headers unsafe.Pointer, headersSize uint32, body unsafe.Pointer, bodySize uint32, trailers unsafe.Pointer, trailersSize uint32, timeout uint32, retToken unsafe.Pointer) uint32

//go:wasmimport env proxy_set_effective_context
func proxySetEffectiveContext(contextID uint32) uint32

//go:wasmimport env proxy_get_property
func proxyGetProperty(path unsafe.Pointer, pathSize uint32, retPtr unsafe.Pointer, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_set_property
func proxySetProperty(path unsafe.Pointer, pathSize uint32, value unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_get_shared_data
func proxyGetSharedData(key unsafe.Pointer, keySize uint32, retPtr unsafe.Pointer, retSize unsafe.Pointer, retCas unsafe.Pointer) uint32

//go:wasmimport env proxy_set_shared_data
func proxySetSharedData(key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize uint32, cas uint32) uint32

//go:wasmimport env proxy_register_shared_queue
func proxyRegisterSharedQueue(name unsafe.Pointer, nameSize uint32, retID unsafe.Pointer) uint32

//go:wasmimport env proxy_resolve_shared_queue
func proxyResolveSharedQueue(vmID unsafe.Pointer, vmIDSize uint32, name unsafe.Pointer, nameSize uint32, retID unsafe.Pointer) uint32

//go:wasmimport env proxy_enqueue_shared_queue
func proxyEnqueueSharedQueue(id uint32, value unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_dequeue_shared_queue
func proxyDequeueSharedQueue(id uint32, retPtr unsafe.Pointer, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_define_metric
func proxyDefineMetric(t uint32, name unsafe.Pointer, nameSize uint32, retID unsafe.Pointer) uint32

//go:wasmimport env proxy_increment_metric
func proxyIncrementMetric(id uint32, delta int64) uint32

//go:wasmimport env proxy_record_metric
func proxyRecordMetric(id uint32, value uint64) uint32

//go:wasmimport env proxy_get_metric
func proxyGetMetric(id uint32, retValue unsafe.Pointer) uint32

// ---- memory the host writes into ---------------------------------------------------------

// allocations keeps the buffers handed to the host alive until the guest has copied them.
var allocations = map[uint32][]byte{}

//go:wasmexport proxy_on_memory_allocate
func proxyOnMemoryAllocate(size uint32) uint32 {
	if size == 0 {
		size = 1
	}
	buf := make([]byte, size)
	ptr := uint32(uintptr(unsafe.Pointer(&buf[0])))
	allocations[ptr] = buf
	return ptr
}

// take copies what the host returned at (ptr, size) and releases the allocation.
func take(ptr uint32, size uint32) []byte {
	buf, ok := allocations[ptr]
	if !ok {
		return nil
	}
	delete(allocations, ptr)
	out := make([]byte, size)
	copy(out, buf[:size])
	return out
}

func bytesPtr(b []byte) unsafe.Pointer {
	if len(b) == 0 {
		return nil
	}
	return unsafe.Pointer(&b[0])
}

func strPtr(s string) unsafe.Pointer {
	if s == "" {
		return nil
	}
	return unsafe.Pointer(unsafe.StringData(s))
}

// ---- host calls --------------------------------------------------------------------------

// Log writes a message at info level (2).
func Log(msg string) {
	proxyLog(2, strPtr(msg), uint32(len(msg)))
}

// SetTickPeriod asks for proxy_on_tick every ms milliseconds.
func SetTickPeriod(ms uint32) Status {
	return Status(proxySetTickPeriodMilliseconds(ms))
}

// GetBuffer reads up to max bytes from start of a buffer.
func GetBuffer(t BufferType, start, max uint32) ([]byte, Status) {
	var ptr uint32
	var size uint32
	st := Status(proxyGetBufferBytes(uint32(t), start, max, unsafe.Pointer(&ptr), unsafe.Pointer(&size)))
	if st != StatusOK {
		return nil, st
	}
	return take(ptr, size), st
}

// SetBuffer replaces size bytes at start of a buffer with data.
func SetBuffer(t BufferType, start, size uint32, data []byte) Status {
	return Status(proxySetBufferBytes(uint32(t), start, size, bytesPtr(data), uint32(len(data))))
}

// GetHeader reads one header (or trailer) value.
func GetHeader(t MapType, key string) (string, Status) {
	var ptr uint32
	var size uint32
	st := Status(proxyGetHeaderMapValue(uint32(t), strPtr(key), uint32(len(key)), unsafe.Pointer(&ptr), unsafe.Pointer(&size)))
	if st != StatusOK {
		return "", st
	}
	return string(take(ptr, size)), st
}

// AddHeader adds a header (or trailer).
func AddHeader(t MapType, key, value string) Status {
	return Status(proxyAddHeaderMapValue(uint32(t), strPtr(key), uint32(len(key)), strPtr(value), uint32(len(value))))
}

// ReplaceHeader sets a header (or trailer), replacing any value it had.
func ReplaceHeader(t MapType, key, value string) Status {
	return Status(proxyReplaceHeaderMapValue(uint32(t), strPtr(key), uint32(len(key)), strPtr(value), uint32(len(value))))
}

// RemoveHeader removes a header (or trailer).
func RemoveHeader(t MapType, key string) Status {
	return Status(proxyRemoveHeaderMapValue(uint32(t), strPtr(key), uint32(len(key))))
}

// ContinueRequest resumes a paused request; ContinueResponse a paused response.
func ContinueRequest() Status  { return Status(proxyContinueStream(0)) }
func ContinueResponse() Status { return Status(proxyContinueStream(1)) }

// SerializePairs encodes header pairs as the ABI's serialized map.
func SerializePairs(pairs [][2]string) []byte {
	size := 4
	for _, p := range pairs {
		size += 8 + len(p[0]) + 1 + len(p[1]) + 1
	}
	out := make([]byte, size)
	putU32 := func(at int, v int) {
		out[at], out[at+1], out[at+2], out[at+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
	}
	putU32(0, len(pairs))
	at := 4
	for _, p := range pairs {
		putU32(at, len(p[0]))
		putU32(at+4, len(p[1]))
		at += 8
	}
	for _, p := range pairs {
		at += copy(out[at:], p[0]) + 1
		at += copy(out[at:], p[1]) + 1
	}
	return out
}

// SendLocalResponse answers the stream with a response of the filter's own.
func SendLocalResponse(status uint32, body string, headers [][2]string) Status {
	h := SerializePairs(headers)
	return Status(proxySendLocalResponse(status, nil, 0, strPtr(body), uint32(len(body)), bytesPtr(h), uint32(len(h)), -1))
}

// HttpCall sends an outbound request to a cluster; the answer comes to OnHttpCallResponse.
func HttpCall(cluster string, headers [][2]string, body []byte, timeoutMs uint32) (uint32, Status) {
	h := SerializePairs(headers)
	var token uint32
	st := Status(proxyHttpCall(strPtr(cluster), uint32(len(cluster)), bytesPtr(h), uint32(len(h)), bytesPtr(body), uint32(len(body)), nil, 0, timeoutMs, unsafe.Pointer(&token)))
	if st == StatusOK {
		pendingCalls[token] = current
	}
	return token, st
}

func joinPath(path []string) []byte {
	var out []byte
	for i, p := range path {
		if i > 0 {
			out = append(out, 0)
		}
		out = append(out, p...)
	}
	return out
}

// GetProperty reads a property by its path segments.
func GetProperty(path ...string) ([]byte, Status) {
	p := joinPath(path)
	var ptr uint32
	var size uint32
	st := Status(proxyGetProperty(bytesPtr(p), uint32(len(p)), unsafe.Pointer(&ptr), unsafe.Pointer(&size)))
	if st != StatusOK {
		return nil, st
	}
	if size == 0 {
		take(ptr, 0)
		return []byte{}, st
	}
	return take(ptr, size), st
}

// SetProperty stores a value under a property path.
func SetProperty(value []byte, path ...string) Status {
	p := joinPath(path)
	return Status(proxySetProperty(bytesPtr(p), uint32(len(p)), bytesPtr(value), uint32(len(value))))
}

// GetSharedData reads a shared value and its compare-and-swap token.
func GetSharedData(key string) ([]byte, uint32, Status) {
	var ptr uint32
	var size, cas uint32
	st := Status(proxyGetSharedData(strPtr(key), uint32(len(key)), unsafe.Pointer(&ptr), unsafe.Pointer(&size), unsafe.Pointer(&cas)))
	if st != StatusOK {
		return nil, 0, st
	}
	return take(ptr, size), cas, st
}

// SetSharedData writes a shared value; a non-zero cas must match.
func SetSharedData(key string, value []byte, cas uint32) Status {
	return Status(proxySetSharedData(strPtr(key), uint32(len(key)), bytesPtr(value), uint32(len(value)), cas))
}

// RegisterQueue creates (or opens) a shared queue owned by this VM.
func RegisterQueue(name string) (uint32, Status) {
	var id uint32
	st := Status(proxyRegisterSharedQueue(strPtr(name), uint32(len(name)), unsafe.Pointer(&id)))
	return id, st
}

// ResolveQueue finds a queue by VM id and name.
func ResolveQueue(vmID, name string) (uint32, Status) {
	var id uint32
	st := Status(proxyResolveSharedQueue(strPtr(vmID), uint32(len(vmID)), strPtr(name), uint32(len(name)), unsafe.Pointer(&id)))
	return id, st
}

// Enqueue adds an item to a queue.
func Enqueue(id uint32, value []byte) Status {
	return Status(proxyEnqueueSharedQueue(id, bytesPtr(value), uint32(len(value))))
}

// Dequeue takes the first item of a queue (StatusEmpty when there is none).
func Dequeue(id uint32) ([]byte, Status) {
	var ptr uint32
	var size uint32
	st := Status(proxyDequeueSharedQueue(id, unsafe.Pointer(&ptr), unsafe.Pointer(&size)))
	if st != StatusOK {
		return nil, st
	}
	return take(ptr, size), st
}

// DefineMetric defines a metric and returns its id.
func DefineMetric(t MetricType, name string) (uint32, Status) {
	var id uint32
	st := Status(proxyDefineMetric(uint32(t), strPtr(name), uint32(len(name)), unsafe.Pointer(&id)))
	return id, st
}

// IncrementMetric, RecordMetric and GetMetric work on a defined metric.
func IncrementMetric(id uint32, delta int64) Status { return Status(proxyIncrementMetric(id, delta)) }
func RecordMetric(id uint32, value uint64) Status   { return Status(proxyRecordMetric(id, value)) }
func GetMetric(id uint32) (uint64, Status) {
	var v uint64
	st := Status(proxyGetMetric(id, unsafe.Pointer(&v)))
	return v, st
}
