// Conformance filter against the AssemblyScript SDK @solo-io/proxy-runtime (npm).
//
// It does what filters/conformance/README.md ("The behaviour every conformance filter has")
// says, like the Rust and Go filters. It uses the SDK's contexts, headers, local responses,
// outbound calls, metrics and logging. The SDK's wrappers for a few host calls are wrong in the
// published 0.1.8 (the compatibility table in the README lists them); for those the filter
// calls the SDK's own raw imports (`@solo-io/proxy-runtime/imports`) correctly instead.
export * from "@solo-io/proxy-runtime/proxy"; // the ABI exports: callbacks, malloc, the version marker
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, FilterDataStatusValues,
  FilterTrailersStatusValues, stream_context, HeaderPair, Headers, Counter, Gauge, Histogram,
  log, LogLevelValues, WasmResultValues, GrpcStatusValues, send_local_response,
  continue_request, continue_response,
} from "@solo-io/proxy-runtime";
import {
  get_buffer_bytes, BufferTypeValues, set_tick_period_milliseconds, enqueue_shared_queue,
} from "@solo-io/proxy-runtime/runtime";
import * as imports from "@solo-io/proxy-runtime/imports";
import { free } from "@solo-io/proxy-runtime/malloc";

// The SDK declares proxy_set_buffer_bytes under the name of proxy_get_buffer_status.
// @ts-ignore: decorator
@external("env", "proxy_set_buffer_bytes")
declare function proxy_set_buffer_bytes(typ: i32, start: u32, length: u32, data: usize, size: usize): u32;

const SDK = "as";
const CLUSTER = "conf";
const QUEUE = "conf.queue";
const TICK_MS: u32 = 200;
const PROPS: string[] = [
  "request.path", "request.url_path", "request.host", "request.scheme", "request.method",
  "request.protocol", "request.id", "source.address", "source.port", "destination.address",
  "destination.port", "connection.id", "response.code", "plugin_name", "plugin_root_id",
  "plugin_vm_id", "cluster_name", "upstream.address",
];

function info(message: string): void {
  log(LogLevelValues.info, "conf[" + SDK + "] " + message);
}

function buf(s: string): ArrayBuffer {
  return String.UTF8.encode(s);
}

function str(b: ArrayBuffer): string {
  return String.UTF8.decode(b);
}

// Where the host writes a returned (pointer, size) pair.
class Out {
  ptr: usize = 0;
  size: usize = 0;
  cas: u32 = 0;
  id: u32 = 0;
  value: u64 = 0;

  ptrPtr(): usize { return changetype<usize>(this) + offsetof<Out>("ptr"); }
  sizePtr(): usize { return changetype<usize>(this) + offsetof<Out>("size"); }
  casPtr(): usize { return changetype<usize>(this) + offsetof<Out>("cas"); }
  idPtr(): usize { return changetype<usize>(this) + offsetof<Out>("id"); }
  valuePtr(): usize { return changetype<usize>(this) + offsetof<Out>("value"); }

  // Copy the returned bytes out and free the host's allocation.
  take(): ArrayBuffer {
    let out = new ArrayBuffer(<i32>this.size);
    if (this.ptr != 0) {
      memory.copy(changetype<usize>(out), this.ptr, this.size);
      free(this.ptr);
    }
    this.ptr = 0;
    this.size = 0;
    return out;
  }
}

const HEX = "0123456789abcdef";

function hex(b: ArrayBuffer): string {
  let bytes = Uint8Array.wrap(b);
  let s = "";
  for (let i = 0; i < bytes.length; i++) {
    s += HEX.charAt(bytes[i] >> 4) + HEX.charAt(bytes[i] & 15);
  }
  return s;
}

function joinPath(path: string): ArrayBuffer {
  let encoded = Uint8Array.wrap(buf(path));
  for (let i = 0; i < encoded.length; i++) {
    if (encoded[i] == 46) encoded[i] = 0; // '.' separates the segments; the ABI uses NUL
  }
  return encoded.buffer;
}

class PropertyResult {
  status: u32 = 0;
  value: ArrayBuffer = new ArrayBuffer(0);
}

function getProperty(path: string): PropertyResult {
  let p = joinPath(path);
  let out = new Out();
  let result = new PropertyResult();
  result.status = imports.proxy_get_property(changetype<usize>(p), p.byteLength, out.ptrPtr(), out.sizePtr());
  result.value = result.status == WasmResultValues.Ok ? out.take() : new ArrayBuffer(0);
  return result;
}

function property(path: string): string {
  let r = getProperty(path);
  if (r.status == WasmResultValues.Ok) return hex(r.value);
  if (r.status == WasmResultValues.NotFound) return "";
  return "!" + r.status.toString();
}

class SharedResult {
  status: u32 = 0;
  value: ArrayBuffer = new ArrayBuffer(0);
  cas: u32 = 0;
}

function getShared(key: string): SharedResult {
  let k = buf(key);
  let out = new Out();
  let result = new SharedResult();
  result.status = imports.proxy_get_shared_data(changetype<usize>(k), k.byteLength, out.ptrPtr(), out.sizePtr(), out.casPtr());
  result.value = result.status == WasmResultValues.Ok ? out.take() : new ArrayBuffer(0);
  result.cas = out.cas;
  return result;
}

function setShared(key: string, value: ArrayBuffer, cas: u32): u32 {
  let k = buf(key);
  return imports.proxy_set_shared_data(changetype<usize>(k), k.byteLength, changetype<usize>(value), value.byteLength, cas);
}

function shared(key: string): string {
  let r = getShared(key);
  if (r.status == WasmResultValues.Ok) return str(r.value);
  if (r.status == WasmResultValues.NotFound) return "";
  return "!" + r.status.toString();
}

function appendBody(typ: BufferTypeValues, size: u32, suffix: string): void {
  let body = Uint8Array.wrap(get_buffer_bytes(typ, 0, size));
  let tail = Uint8Array.wrap(buf(suffix));
  let joined = new Uint8Array(body.length + tail.length);
  joined.set(body, 0);
  joined.set(tail, body.length);
  proxy_set_buffer_bytes(typ, 0, size, changetype<usize>(joined.buffer), joined.length);
}

var requests: Counter | null = null;
var requestHeaders: Gauge | null = null;
var bodyBytes: Histogram | null = null;
var pluginConfig = "";
var vmConfig = "";

class ConfRoot extends RootContext {
  ticks: u32 = 0;

  onStart(vm_configuration_size: usize): bool {
    vmConfig = str(get_buffer_bytes(BufferTypeValues.VmConfiguration, 0, <u32>vm_configuration_size));
    info("vm_start size=" + vm_configuration_size.toString() + " vm_config=" + vmConfig);
    return true;
  }

  onConfigure(configuration_size: u32): bool {
    pluginConfig = str(get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, configuration_size));
    info("configure size=" + configuration_size.toString() + " config=" + pluginConfig);
    requests = new Counter("conf_requests");
    requestHeaders = new Gauge("conf_request_headers");
    bodyBytes = new Histogram("conf_body_bytes");
    let name = buf(QUEUE);
    let out = new Out();
    let status = imports.proxy_register_shared_queue(changetype<usize>(name), name.byteLength, out.idPtr());
    if (status == WasmResultValues.Ok) {
      info("registered queue " + QUEUE + " as " + out.id.toString());
    } else {
      info("register_shared_queue failed: " + status.toString());
    }
    set_tick_period_milliseconds(TICK_MS);
    return true;
  }

  onTick(): void {
    this.ticks++;
    setShared("conf.ticks", buf(this.ticks.toString()), 0);
  }

  onQueueReady(token: u32): void {
    // The SDK's dequeue_shared_queue does not compile (its result class lacks an initializer).
    while (true) {
      let out = new Out();
      let status = imports.proxy_dequeue_shared_queue(token, out.ptrPtr(), out.sizePtr());
      if (status != WasmResultValues.Ok) return;
      let item = out.take();
      info("dequeued " + str(item));
      setShared("conf.queue_last", item, 0);
    }
  }

  createContext(context_id: u32): Context {
    return new ConfStream(context_id, this);
  }
}

function onCallResponse(origin: Context, headers: u32, body_size: usize, trailers: u32): void {
  (origin as ConfStream).callAnswered(headers, <u32>body_size);
}

class ConfStream extends Context {
  seq: string[] = [];
  local: string = "";
  call: string = "";
  body: bool = false;
  props: bool = false;
  status: string = "";
  count: i32 = 0;
  bodySize: u32 = 0;
  hasRequestTrailer: bool = false;
  requestTrailer: string = "";
  pending: string = "";
  tag: string = "";
  read: string = "";
  logged: bool = false;

  constructor(context_id: u32, root_context: ConfRoot) {
    super(context_id, root_context);
  }

  // The local response or the outbound call that the request asked for in `phase`.
  phaseAction(phase: string): bool {
    if (this.local == phase) {
      let headers: Headers = [];
      headers.push(new HeaderPair(buf("x-conf-local"), buf(phase)));
      headers.push(new HeaderPair(buf("x-conf-sdk"), buf(SDK)));
      send_local_response(418, "", buf("local " + SDK + " " + phase), headers, GrpcStatusValues.InvalidCode);
      return true;
    }
    if (this.call == phase) {
      let headers: Headers = [];
      headers.push(new HeaderPair(buf(":method"), buf("GET")));
      headers.push(new HeaderPair(buf(":path"), buf("/call/" + phase)));
      headers.push(new HeaderPair(buf(":authority"), buf("conf-call.test")));
      headers.push(new HeaderPair(buf(":scheme"), buf("http")));
      headers.push(new HeaderPair(buf("x-conf-sdk"), buf(SDK)));
      let status = this.root_context.httpCall(CLUSTER, headers, new ArrayBuffer(0), [], 5000, this, onCallResponse);
      if (status == WasmResultValues.Ok) {
        info(phase + ": http call dispatched");
        this.pending = phase;
        return true;
      }
      info(phase + ": dispatch_http_call failed: " + status.toString());
    }
    return false;
  }

  callAnswered(headers: u32, body_size: u32): void {
    this.seq.push("http_call_response");
    let result = "failed";
    if (headers > 0) {
      let status = stream_context.headers.http_callback.get(":status");
      let body = str(get_buffer_bytes(BufferTypeValues.HttpCallResponseBody, 0, body_size));
      result = status + " " + body;
    }
    info("http call answered: " + result);
    let phase = this.pending;
    this.pending = "";
    if (phase == "request_headers") {
      stream_context.headers.request.add("x-conf-call-result", result);
      continue_request();
    } else if (phase == "request_body") {
      appendBody(BufferTypeValues.HttpRequestBody, this.bodySize, "|call=" + result);
      continue_request();
    } else if (phase == "request_trailers") {
      stream_context.trailers.request.add("x-conf-call-result", result);
      continue_request();
    } else if (phase == "response_headers") {
      stream_context.headers.response.add("x-conf-call-result", result);
      continue_response();
    } else if (phase == "response_body") {
      appendBody(BufferTypeValues.HttpResponseBody, this.bodySize, "|call=" + result);
      continue_response();
    } else if (phase == "response_trailers") {
      stream_context.trailers.response.add("x-conf-call-result", result);
      continue_response();
    } else {
      info("http call answered with no phase waiting");
    }
  }

  onRequestHeaders(num_headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    this.seq.push("request_headers:" + (end_of_stream ? "1" : "0"));
    let request = stream_context.headers.request;
    this.local = request.get("x-conf-local");
    this.call = request.get("x-conf-call");
    this.body = request.get("x-conf-body") != "";
    this.props = request.get("x-conf-props") != "";
    this.status = request.get("x-conf-status");
    this.tag = request.get("x-conf-tag");
    this.read = request.get("x-conf-read");
    let item = request.get("x-conf-enqueue");
    let path = request.get(":path");
    info("request_headers " + this.context_id.toString() + " " + request.get(":method") + " " + path);

    request.add("x-conf-sdk", SDK);
    request.remove("x-conf-drop");
    if (request.get("x-conf-replace") != "") {
      request.replace("x-conf-replace", "replaced-" + SDK);
    }
    let newPath = request.get("x-conf-path");
    if (newPath != "") {
      request.replace(":path", newPath);
    }

    (requests as Counter).increment(1);
    let gauge = requestHeaders as Gauge;
    gauge.record(gauge.metric_id, num_headers);

    // A counter in shared data, updated with compare-and-swap.
    for (let i = 0; i < 16; i++) {
      let current = getShared("conf.count");
      let n = current.status == WasmResultValues.Ok ? I32.parseInt(str(current.value)) : 0;
      if (isNaN(n)) n = 0;
      let next = <i32>n + 1;
      let status = setShared("conf.count", buf(next.toString()), current.cas);
      if (status == WasmResultValues.Ok) {
        this.count = next;
        break;
      }
      if (status != WasmResultValues.CasMismatch) {
        info("set_shared_data failed: " + status.toString());
        break;
      }
    }

    let statePath = buf("conf_state");
    let state = buf(SDK + ":" + this.context_id.toString());
    let setStatus = imports.proxy_set_property(changetype<usize>(statePath), statePath.byteLength, changetype<usize>(state), state.byteLength);
    if (setStatus != WasmResultValues.Ok) {
      info("set_property failed: " + setStatus.toString());
    }

    if (item != "") {
      let vmId = getProperty("plugin_vm_id").value;
      let queueName = buf(QUEUE);
      let out = new Out();
      let resolved = imports.proxy_resolve_shared_queue(changetype<usize>(vmId), vmId.byteLength, changetype<usize>(queueName), queueName.byteLength, out.idPtr());
      if (resolved == WasmResultValues.Ok) {
        let status = enqueue_shared_queue(out.id, buf(SDK + " " + item));
        if (status != WasmResultValues.Ok) info("enqueue_shared_queue failed: " + status.toString());
      } else {
        info("resolve_shared_queue failed: " + resolved.toString());
      }
    }

    if (this.phaseAction("request_headers")) return FilterHeadersStatusValues.StopIteration;
    return FilterHeadersStatusValues.Continue;
  }

  onRequestBody(body_buffer_length: usize, end_of_stream: bool): FilterDataStatusValues {
    let size = <u32>body_buffer_length;
    this.seq.push("request_body:" + size.toString() + ":" + (end_of_stream ? "1" : "0"));
    if (!end_of_stream) return FilterDataStatusValues.StopIterationAndBuffer;
    this.bodySize = size;
    let histogram = bodyBytes as Histogram;
    histogram.record(histogram.metric_id, size);
    if (this.body) {
      let suffix = "|" + SDK;
      appendBody(BufferTypeValues.HttpRequestBody, size, suffix);
      this.bodySize += suffix.length;
    }
    if (this.phaseAction("request_body")) return FilterDataStatusValues.StopIterationAndBuffer;
    return FilterDataStatusValues.Continue;
  }

  onRequestTrailers(a: u32): FilterTrailersStatusValues {
    this.seq.push("request_trailers");
    let trailers = stream_context.trailers.request;
    let value = trailers.get("x-trailer-in");
    if (value != "") {
      this.hasRequestTrailer = true;
      this.requestTrailer = value;
    }
    trailers.add("x-conf-trailer", SDK);
    if (this.phaseAction("request_trailers")) return FilterTrailersStatusValues.StopIteration;
    return FilterTrailersStatusValues.Continue;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    this.seq.push("response_headers:" + (end_of_stream ? "1" : "0"));
    let response = stream_context.headers.response;
    if (this.status != "") response.replace(":status", this.status);
    let out = new Out();
    let metricStatus = imports.proxy_get_metric((requests as Counter).metric_id, out.valuePtr());
    let metric = metricStatus == WasmResultValues.Ok ? out.value.toString() : "!" + metricStatus.toString();
    let stateResult = getProperty("conf_state");
    let state = stateResult.status == WasmResultValues.Ok ? str(stateResult.value)
      : stateResult.status == WasmResultValues.NotFound ? "" : "!" + stateResult.status.toString();
    response.add("x-conf-sdk", SDK);
    response.add("x-conf-count", this.count.toString());
    response.add("x-conf-metric", metric);
    response.add("x-conf-state", state);
    response.add("x-conf-queue-last", shared("conf.queue_last"));
    response.add("x-conf-ticks", shared("conf.ticks"));
    response.add("x-conf-config", pluginConfig);
    response.add("x-conf-vm-config", vmConfig);
    response.add("x-conf-upstream", response.get("x-upstream"));
    response.add("x-conf-seq", this.seq.join(","));
    if (this.hasRequestTrailer) response.add("x-conf-request-trailer", this.requestTrailer);
    if (this.read != "") response.add("x-conf-read-value", shared(this.read));
    if (this.props) {
      let parts: string[] = [];
      for (let i = 0; i < PROPS.length; i++) {
        parts.push(PROPS[i] + "=" + property(PROPS[i]));
      }
      response.add("x-conf-props", parts.join(";"));
    }
    if (this.phaseAction("response_headers")) return FilterHeadersStatusValues.StopIteration;
    if (this.local == "response_body" || this.call == "response_body") {
      return FilterHeadersStatusValues.StopIteration; // hold the headers: the body phase may replace the response
    }
    return FilterHeadersStatusValues.Continue;
  }

  onResponseBody(body_buffer_length: usize, end_of_stream: bool): FilterDataStatusValues {
    let size = <u32>body_buffer_length;
    this.seq.push("response_body:" + size.toString() + ":" + (end_of_stream ? "1" : "0"));
    if (!end_of_stream) return FilterDataStatusValues.StopIterationAndBuffer;
    this.bodySize = size;
    if (this.body) {
      let suffix = "|" + SDK;
      appendBody(BufferTypeValues.HttpResponseBody, size, suffix);
      this.bodySize += suffix.length;
    }
    if (this.phaseAction("response_body")) return FilterDataStatusValues.StopIterationAndBuffer;
    return FilterDataStatusValues.Continue;
  }

  onResponseTrailers(s: u32): FilterTrailersStatusValues {
    this.seq.push("response_trailers");
    stream_context.trailers.response.add("x-conf-trailer", SDK);
    if (this.phaseAction("response_trailers")) return FilterTrailersStatusValues.StopIteration;
    return FilterTrailersStatusValues.Continue;
  }

  onDone(): bool {
    info("done " + this.context_id.toString());
    if (this.tag != "") {
      setShared("conf.done." + this.tag, buf(this.logged ? "after_log" : "before_log"), 0);
    }
    return true;
  }

  onLog(): void {
    let r = getProperty("response.code");
    let code = "none";
    if (r.status == WasmResultValues.Ok && r.value.byteLength == 8) {
      code = load<u64>(changetype<usize>(r.value)).toString();
    } else if (r.status == WasmResultValues.Ok) {
      code = "bytes:" + hex(r.value);
    } else if (r.status != WasmResultValues.NotFound) {
      code = "!" + r.status.toString();
    }
    let line = "seq=" + this.seq.join(",") + " code=" + code;
    info("log " + this.context_id.toString() + " " + line);
    if (this.tag != "") setShared("conf.log." + this.tag, buf(line), 0);
    this.logged = true;
  }
}

function newRoot(context_id: u32): RootContext {
  return new ConfRoot(context_id);
}

// The default root id (empty, as Envoy's), and a named one for `wasm_root_id=conformance`.
registerRootContext(newRoot, "");
registerRootContext(newRoot, "conformance");
