// A tiny Proxy-Wasm filter for standard Go (GOOS=wasip1, -buildmode=c-shared): it exports the
// ABI with go:wasmexport and imports host calls with go:wasmimport, as the Go SDK does.
package main

import (
	"os"
	"time"
	"unsafe"
)

//go:wasmimport env proxy_log
func proxyLog(level uint32, ptr unsafe.Pointer, size uint32) uint32

//go:wasmimport env proxy_add_header_map_value
func proxyAddHeader(mapType uint32, k unsafe.Pointer, kn uint32, v unsafe.Pointer, vn uint32) uint32

//go:wasmimport env proxy_log
func proxyLogAgain(level uint32, ptr unsafe.Pointer, size uint32) uint32

var keep [][]byte

func log(level uint32, s string) {
	b := []byte(s)
	proxyLog(level, unsafe.Pointer(&b[0]), uint32(len(b)))
}

//go:wasmexport proxy_abi_version_0_2_1
func abiVersion() {}

//go:wasmexport proxy_on_memory_allocate
func onMemoryAllocate(size uint32) unsafe.Pointer {
	b := make([]byte, size+1)
	keep = append(keep, b)
	return unsafe.Pointer(&b[0])
}

//go:wasmexport proxy_on_context_create
func onContextCreate(contextID, parentID uint32) {}

//go:wasmexport proxy_on_configure
func onConfigure(rootID, size uint32) uint32 {
	log(4, "go filter starting (an error-level line, on purpose)")
	os.Stderr.WriteString("go filter: stderr during start-up\n")
	return 1
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(contextID, numHeaders, endOfStream uint32) uint32 {
	time.Sleep(time.Millisecond) // the Go scheduler waits in poll_oneoff
	k, v := []byte("x-go"), []byte(time.Now().Format("2006"))
	proxyAddHeader(0, unsafe.Pointer(&k[0]), uint32(len(k)), unsafe.Pointer(&v[0]), uint32(len(v)))
	b := []byte("go filter saw a request")
	proxyLogAgain(2, unsafe.Pointer(&b[0]), uint32(len(b)))
	return 0
}

func main() {}
