// Conformance filter for standard Go (GOOS=wasip1, -buildmode=c-shared) against the ABI
// binding in ./proxywasm. It does what filters/conformance/README.md ("The behaviour every
// conformance filter has") says, like the Rust and AssemblyScript filters. It uses fmt, os
// and strings on purpose: that is what makes the Go runtime ask the host for the WASI
// functions a real Go filter needs.
package main

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"strings"

	pw "wasm-reclaim/conformance/proxywasm"
)

const (
	sdk     = "go"
	cluster = "conf"
	queue   = "conf.queue"
	tickMs  = 200
)

var props = []string{
	"request.path", "request.url_path", "request.host", "request.scheme", "request.method",
	"request.protocol", "request.id", "source.address", "source.port", "destination.address",
	"destination.port", "connection.id", "response.code", "plugin_name", "plugin_root_id",
	"plugin_vm_id", "cluster_name", "upstream.address",
}

func logf(format string, args ...any) {
	pw.Log("conf[" + sdk + "] " + fmt.Sprintf(format, args...))
}

func property(path string) string {
	v, st := pw.GetProperty(strings.Split(path, ".")...)
	switch st {
	case pw.StatusOK:
		return hex.EncodeToString(v)
	case pw.StatusNotFound:
		return ""
	default:
		return fmt.Sprintf("!%d", st)
	}
}

func shared(key string) string {
	v, _, st := pw.GetSharedData(key)
	if st == pw.StatusNotFound {
		return ""
	}
	if st != pw.StatusOK {
		return fmt.Sprintf("!%d", st)
	}
	return string(v)
}

type metrics struct{ requests, headers, bodyBytes uint32 }

type root struct {
	config, vmConfig string
	metrics          *metrics
	ticks            int
}

func (r *root) OnVMStart(size uint32) bool {
	v, _ := pw.GetBuffer(pw.VMConfiguration, 0, size)
	r.vmConfig = string(v)
	// Through the Go runtime's os.Stdout: WASI fd_write, which the host logs at info level.
	fmt.Fprintf(os.Stdout, "conf[%s] stdout vm_start size=%d\n", sdk, size)
	logf("vm_start size=%d vm_config=%s", size, r.vmConfig)
	return true
}

func (r *root) OnConfigure(size uint32) bool {
	v, _ := pw.GetBuffer(pw.PluginConfiguration, 0, size)
	r.config = string(v)
	logf("configure size=%d config=%s", size, r.config)
	r.metrics.requests, _ = pw.DefineMetric(pw.Counter, "conf_requests")
	r.metrics.headers, _ = pw.DefineMetric(pw.Gauge, "conf_request_headers")
	r.metrics.bodyBytes, _ = pw.DefineMetric(pw.Histogram, "conf_body_bytes")
	if id, st := pw.RegisterQueue(queue); st == pw.StatusOK {
		logf("registered queue %s as %d", queue, id)
	} else {
		logf("register_shared_queue failed: %d", st)
	}
	pw.SetTickPeriod(tickMs)
	return true
}

func (r *root) OnTick() {
	r.ticks++
	pw.SetSharedData("conf.ticks", []byte(strconv.Itoa(r.ticks)), 0)
}

func (r *root) OnQueueReady(id uint32) {
	for {
		item, st := pw.Dequeue(id)
		if st != pw.StatusOK {
			return
		}
		logf("dequeued %s", item)
		pw.SetSharedData("conf.queue_last", item, 0)
	}
}

func (r *root) NewHttpContext(id uint32) pw.HttpContext {
	return &stream{id: id, root: r}
}

type stream struct {
	id             uint32
	root           *root
	seq            []string
	local, call    string
	body, props    bool
	status         string
	count          int
	bodySize       uint32
	requestTrailer *string
	pending        string
	tag, read      string
	logged         bool
}

func header(t pw.MapType, name string) string {
	v, _ := pw.GetHeader(t, name)
	return v
}

func (s *stream) phaseAction(phase string) (pw.Action, bool) {
	if s.local == phase {
		pw.SendLocalResponse(418, "local "+sdk+" "+phase,
			[][2]string{{"x-conf-local", phase}, {"x-conf-sdk", sdk}})
		return pw.ActionPause, true
	}
	if s.call == phase {
		headers := [][2]string{
			{":method", "GET"}, {":path", "/call/" + phase}, {":authority", "conf-call.test"},
			{":scheme", "http"}, {"x-conf-sdk", sdk},
		}
		token, st := pw.HttpCall(cluster, headers, nil, 5000)
		if st == pw.StatusOK {
			logf("%s: http call %d dispatched", phase, token)
			s.pending = phase
			return pw.ActionPause, true
		}
		logf("%s: dispatch_http_call failed: %d", phase, st)
	}
	return pw.ActionContinue, false
}

func (s *stream) appendBody(t pw.BufferType, size uint32, suffix string) {
	body, _ := pw.GetBuffer(t, 0, size)
	pw.SetBuffer(t, 0, size, append(body, suffix...))
}

func (s *stream) OnRequestHeaders(numHeaders uint32, eos bool) pw.Action {
	s.seq = append(s.seq, fmt.Sprintf("request_headers:%d", b2i(eos)))
	s.local = header(pw.RequestHeaders, "x-conf-local")
	s.call = header(pw.RequestHeaders, "x-conf-call")
	s.body = header(pw.RequestHeaders, "x-conf-body") != ""
	s.props = header(pw.RequestHeaders, "x-conf-props") != ""
	s.status = header(pw.RequestHeaders, "x-conf-status")
	s.tag = header(pw.RequestHeaders, "x-conf-tag")
	s.read = header(pw.RequestHeaders, "x-conf-read")
	path := header(pw.RequestHeaders, ":path")
	logf("request_headers %d %s %s", s.id, header(pw.RequestHeaders, ":method"), path)

	pw.AddHeader(pw.RequestHeaders, "x-conf-sdk", sdk)
	pw.RemoveHeader(pw.RequestHeaders, "x-conf-drop")
	if _, st := pw.GetHeader(pw.RequestHeaders, "x-conf-replace"); st == pw.StatusOK {
		pw.ReplaceHeader(pw.RequestHeaders, "x-conf-replace", "replaced-"+sdk)
	}
	if newPath, st := pw.GetHeader(pw.RequestHeaders, "x-conf-path"); st == pw.StatusOK {
		pw.ReplaceHeader(pw.RequestHeaders, ":path", newPath)
	}

	pw.IncrementMetric(s.root.metrics.requests, 1)
	pw.RecordMetric(s.root.metrics.headers, uint64(numHeaders))

	// A counter in shared data, updated with compare-and-swap.
	for i := 0; i < 16; i++ {
		v, cas, _ := pw.GetSharedData("conf.count")
		n, _ := strconv.Atoi(string(v))
		st := pw.SetSharedData("conf.count", []byte(strconv.Itoa(n+1)), cas)
		if st == pw.StatusOK {
			s.count = n + 1
			break
		}
		if st != pw.StatusCasMismatch {
			logf("set_shared_data failed: %d", st)
			break
		}
	}

	if st := pw.SetProperty([]byte(fmt.Sprintf("%s:%d", sdk, s.id)), "conf_state"); st != pw.StatusOK {
		logf("set_property failed: %d", st)
	}

	if item, st := pw.GetHeader(pw.RequestHeaders, "x-conf-enqueue"); st == pw.StatusOK {
		vmID, _ := pw.GetProperty("plugin_vm_id")
		if q, st := pw.ResolveQueue(string(vmID), queue); st == pw.StatusOK {
			if st := pw.Enqueue(q, []byte(sdk+" "+item)); st != pw.StatusOK {
				logf("enqueue_shared_queue failed: %d", st)
			}
		} else {
			logf("resolve_shared_queue failed: %d", st)
		}
	}

	action, _ := s.phaseAction("request_headers")
	return action
}

func (s *stream) OnRequestBody(size uint32, eos bool) pw.Action {
	s.seq = append(s.seq, fmt.Sprintf("request_body:%d:%d", size, b2i(eos)))
	if !eos {
		return pw.ActionPause
	}
	s.bodySize = size
	pw.RecordMetric(s.root.metrics.bodyBytes, uint64(size))
	if s.body {
		suffix := "|" + sdk
		s.appendBody(pw.RequestBody, size, suffix)
		s.bodySize += uint32(len(suffix))
	}
	action, _ := s.phaseAction("request_body")
	return action
}

func (s *stream) OnRequestTrailers(n uint32) pw.Action {
	s.seq = append(s.seq, "request_trailers")
	if v, st := pw.GetHeader(pw.RequestTrailers, "x-trailer-in"); st == pw.StatusOK {
		s.requestTrailer = &v
	}
	pw.AddHeader(pw.RequestTrailers, "x-conf-trailer", sdk)
	action, _ := s.phaseAction("request_trailers")
	return action
}

func (s *stream) OnResponseHeaders(n uint32, eos bool) pw.Action {
	s.seq = append(s.seq, fmt.Sprintf("response_headers:%d", b2i(eos)))
	if s.status != "" {
		pw.ReplaceHeader(pw.ResponseHeaders, ":status", s.status)
	}
	metric := ""
	if v, st := pw.GetMetric(s.root.metrics.requests); st == pw.StatusOK {
		metric = strconv.FormatUint(v, 10)
	} else {
		metric = fmt.Sprintf("!%d", st)
	}
	state := ""
	if v, st := pw.GetProperty("conf_state"); st == pw.StatusOK {
		state = string(v)
	} else if st != pw.StatusNotFound {
		state = fmt.Sprintf("!%d", st)
	}
	report := [][2]string{
		{"x-conf-sdk", sdk},
		{"x-conf-count", strconv.Itoa(s.count)},
		{"x-conf-metric", metric},
		{"x-conf-state", state},
		{"x-conf-queue-last", shared("conf.queue_last")},
		{"x-conf-ticks", shared("conf.ticks")},
		{"x-conf-config", s.root.config},
		{"x-conf-vm-config", s.root.vmConfig},
		{"x-conf-upstream", header(pw.ResponseHeaders, "x-upstream")},
		{"x-conf-seq", strings.Join(s.seq, ",")},
	}
	if s.requestTrailer != nil {
		report = append(report, [2]string{"x-conf-request-trailer", *s.requestTrailer})
	}
	if s.read != "" {
		report = append(report, [2]string{"x-conf-read-value", shared(s.read)})
	}
	if s.props {
		parts := make([]string, 0, len(props))
		for _, p := range props {
			parts = append(parts, p+"="+property(p))
		}
		report = append(report, [2]string{"x-conf-props", strings.Join(parts, ";")})
	}
	for _, h := range report {
		pw.AddHeader(pw.ResponseHeaders, h[0], h[1])
	}
	if action, done := s.phaseAction("response_headers"); done {
		return action
	}
	if s.local == "response_body" || s.call == "response_body" {
		return pw.ActionPause // hold the headers: the body phase may replace the response
	}
	return pw.ActionContinue
}

func (s *stream) OnResponseBody(size uint32, eos bool) pw.Action {
	s.seq = append(s.seq, fmt.Sprintf("response_body:%d:%d", size, b2i(eos)))
	if !eos {
		return pw.ActionPause
	}
	s.bodySize = size
	if s.body {
		suffix := "|" + sdk
		s.appendBody(pw.ResponseBody, size, suffix)
		s.bodySize += uint32(len(suffix))
	}
	action, _ := s.phaseAction("response_body")
	return action
}

func (s *stream) OnResponseTrailers(n uint32) pw.Action {
	s.seq = append(s.seq, "response_trailers")
	pw.AddHeader(pw.ResponseTrailers, "x-conf-trailer", sdk)
	action, _ := s.phaseAction("response_trailers")
	return action
}

func (s *stream) OnHttpCallResponse(token, numHeaders, bodySize, numTrailers uint32) {
	s.seq = append(s.seq, "http_call_response")
	result := "failed"
	if numHeaders > 0 {
		status := header(pw.HttpCallResponseHeaders, ":status")
		body, _ := pw.GetBuffer(pw.HttpCallResponseBody, 0, bodySize)
		result = status + " " + string(body)
	}
	logf("http call %d answered: %s", token, result)
	phase := s.pending
	s.pending = ""
	switch phase {
	case "request_headers":
		pw.AddHeader(pw.RequestHeaders, "x-conf-call-result", result)
		pw.ContinueRequest()
	case "request_body":
		s.appendBody(pw.RequestBody, s.bodySize, "|call="+result)
		pw.ContinueRequest()
	case "request_trailers":
		pw.AddHeader(pw.RequestTrailers, "x-conf-call-result", result)
		pw.ContinueRequest()
	case "response_headers":
		pw.AddHeader(pw.ResponseHeaders, "x-conf-call-result", result)
		pw.ContinueResponse()
	case "response_body":
		s.appendBody(pw.ResponseBody, s.bodySize, "|call="+result)
		pw.ContinueResponse()
	case "response_trailers":
		pw.AddHeader(pw.ResponseTrailers, "x-conf-call-result", result)
		pw.ContinueResponse()
	default:
		logf("http call answered with no phase waiting")
	}
}

func (s *stream) OnDone() bool {
	logf("done %d", s.id)
	if s.tag != "" {
		order := "before_log"
		if s.logged {
			order = "after_log"
		}
		pw.SetSharedData("conf.done."+s.tag, []byte(order), 0)
	}
	return true
}

func (s *stream) OnLog() {
	code := "none"
	v, st := pw.GetProperty("response", "code")
	switch {
	case st == pw.StatusOK && len(v) == 8:
		code = strconv.FormatUint(binary.LittleEndian.Uint64(v), 10)
	case st == pw.StatusOK:
		code = "bytes:" + hex.EncodeToString(v)
	case st != pw.StatusNotFound:
		code = fmt.Sprintf("!%d", st)
	}
	line := fmt.Sprintf("seq=%s code=%s", strings.Join(s.seq, ","), code)
	logf("log %d %s", s.id, line)
	if s.tag != "" {
		pw.SetSharedData("conf.log."+s.tag, []byte(line), 0)
	}
	s.logged = true
}

func (s *stream) OnDelete() {}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func init() {
	pw.SetNewRootContext(func(id uint32) pw.RootContext { return &root{metrics: &metrics{}} })
}

func main() {}
