package proxywasm

// RootContext is the plugin context: configuration, ticks, queues, and a factory of streams.
type RootContext interface {
	OnVMStart(vmConfigurationSize uint32) bool
	OnConfigure(pluginConfigurationSize uint32) bool
	OnTick()
	OnQueueReady(queueID uint32)
	NewHttpContext(contextID uint32) HttpContext
}

// HttpContext is one HTTP stream.
type HttpContext interface {
	OnRequestHeaders(numHeaders uint32, endOfStream bool) Action
	OnRequestBody(bodySize uint32, endOfStream bool) Action
	OnRequestTrailers(numTrailers uint32) Action
	OnResponseHeaders(numHeaders uint32, endOfStream bool) Action
	OnResponseBody(bodySize uint32, endOfStream bool) Action
	OnResponseTrailers(numTrailers uint32) Action
	OnHttpCallResponse(token, numHeaders, bodySize, numTrailers uint32)
	OnDone() bool
	OnLog()
	OnDelete()
}

var (
	newRoot      func(contextID uint32) RootContext
	roots        = map[uint32]RootContext{}
	streams      = map[uint32]HttpContext{}
	pendingCalls = map[uint32]uint32{} // call token -> the context that made the call
	current      uint32
)

// SetNewRootContext registers the factory of root contexts (call it from init or main).
func SetNewRootContext(f func(contextID uint32) RootContext) { newRoot = f }

//go:wasmexport proxy_abi_version_0_2_1
func proxyAbiVersion() {}

//go:wasmexport proxy_on_context_create
func proxyOnContextCreate(contextID, parentID uint32) {
	if parentID == 0 {
		roots[contextID] = newRoot(contextID)
		return
	}
	if root, ok := roots[parentID]; ok {
		streams[contextID] = root.NewHttpContext(contextID)
	}
}

func b2u(b bool) uint32 {
	if b {
		return 1
	}
	return 0
}

//go:wasmexport proxy_on_vm_start
func proxyOnVMStart(contextID, size uint32) uint32 {
	current = contextID
	return b2u(roots[contextID].OnVMStart(size))
}

//go:wasmexport proxy_on_configure
func proxyOnConfigure(contextID, size uint32) uint32 {
	current = contextID
	return b2u(roots[contextID].OnConfigure(size))
}

//go:wasmexport proxy_on_tick
func proxyOnTick(contextID uint32) {
	current = contextID
	roots[contextID].OnTick()
}

//go:wasmexport proxy_on_queue_ready
func proxyOnQueueReady(contextID, queueID uint32) {
	current = contextID
	roots[contextID].OnQueueReady(queueID)
}

//go:wasmexport proxy_on_request_headers
func proxyOnRequestHeaders(contextID, numHeaders, endOfStream uint32) uint32 {
	current = contextID
	return uint32(streams[contextID].OnRequestHeaders(numHeaders, endOfStream != 0))
}

//go:wasmexport proxy_on_request_body
func proxyOnRequestBody(contextID, bodySize, endOfStream uint32) uint32 {
	current = contextID
	return uint32(streams[contextID].OnRequestBody(bodySize, endOfStream != 0))
}

//go:wasmexport proxy_on_request_trailers
func proxyOnRequestTrailers(contextID, numTrailers uint32) uint32 {
	current = contextID
	return uint32(streams[contextID].OnRequestTrailers(numTrailers))
}

//go:wasmexport proxy_on_response_headers
func proxyOnResponseHeaders(contextID, numHeaders, endOfStream uint32) uint32 {
	current = contextID
	return uint32(streams[contextID].OnResponseHeaders(numHeaders, endOfStream != 0))
}

//go:wasmexport proxy_on_response_body
func proxyOnResponseBody(contextID, bodySize, endOfStream uint32) uint32 {
	current = contextID
	return uint32(streams[contextID].OnResponseBody(bodySize, endOfStream != 0))
}

//go:wasmexport proxy_on_response_trailers
func proxyOnResponseTrailers(contextID, numTrailers uint32) uint32 {
	current = contextID
	return uint32(streams[contextID].OnResponseTrailers(numTrailers))
}

//go:wasmexport proxy_on_http_call_response
func proxyOnHttpCallResponse(contextID, token, numHeaders, bodySize, numTrailers uint32) {
	caller, ok := pendingCalls[token]
	if !ok {
		caller = contextID
	}
	delete(pendingCalls, token)
	stream, ok := streams[caller]
	if !ok {
		Log("http call answered for a stream that is gone")
		return
	}
	// The host calls back on the context that made the call, or on the root context (as
	// some hosts do); either way the stream becomes the effective context again.
	if caller != contextID {
		proxySetEffectiveContext(caller)
	}
	current = caller
	stream.OnHttpCallResponse(token, numHeaders, bodySize, numTrailers)
}

//go:wasmexport proxy_on_done
func proxyOnDone(contextID uint32) uint32 {
	current = contextID
	if stream, ok := streams[contextID]; ok {
		return b2u(stream.OnDone())
	}
	return 1
}

//go:wasmexport proxy_on_log
func proxyOnLog(contextID uint32) {
	current = contextID
	if stream, ok := streams[contextID]; ok {
		stream.OnLog()
	}
}

//go:wasmexport proxy_on_delete
func proxyOnDelete(contextID uint32) {
	current = contextID
	if stream, ok := streams[contextID]; ok {
		stream.OnDelete()
		delete(streams, contextID)
	}
	delete(roots, contextID)
}
