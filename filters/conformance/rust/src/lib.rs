// Conformance filter against the Rust proxy-wasm SDK (crates.io `proxy-wasm`).
//
// It does what filters/conformance/README.md ("The behaviour every conformance filter has")
// says, through the SDK's traits; the Go and AssemblyScript filters do the same through theirs.
// Where the SDK returns a `Result` the filter reports the status instead of panicking, so that
// a host gap shows up as a value the test can name.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, Bytes, ContextType, LogLevel, MetricType, Status};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

const SDK: &str = "rust";
const CLUSTER: &str = "conf";
const QUEUE: &str = "conf.queue";
const TICK_MS: u64 = 200;
const PROPS: &[&str] = &[
    "request.path",
    "request.url_path",
    "request.host",
    "request.scheme",
    "request.method",
    "request.protocol",
    "request.id",
    "source.address",
    "source.port",
    "destination.address",
    "destination.port",
    "connection.id",
    "response.code",
    "plugin_name",
    "plugin_root_id",
    "plugin_vm_id",
    "cluster_name",
    "upstream.address",
];

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

fn log(message: &str) {
    let _ = hostcalls::log(LogLevel::Info, &format!("conf[{SDK}] {message}"));
}

fn text(bytes: Option<Bytes>) -> String {
    bytes.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn status_code(s: Status) -> u32 {
    s as u32
}

/// A property as the report shows it: hex of its bytes, or `!N` for a failing status N.
fn property(path: &str) -> String {
    match hostcalls::get_property(path.split('.').collect()) {
        Ok(Some(b)) => hex(&b),
        Ok(None) => String::new(),
        Err(s) => format!("!{}", status_code(s)),
    }
}

fn shared(key: &str) -> String {
    match hostcalls::get_shared_data(key) {
        Ok((value, _)) => text(value),
        Err(s) => format!("!{}", status_code(s)),
    }
}

#[derive(Default)]
struct Metrics {
    requests: Cell<u32>,
    headers: Cell<u32>,
    body_bytes: Cell<u32>,
}

#[derive(Default)]
struct Root {
    config: Rc<RefCell<(String, String)>>, // (plugin configuration, VM configuration)
    metrics: Rc<Metrics>,
    ticks: u64,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, size: usize) -> bool {
        let vm_config = text(self.get_vm_configuration());
        log(&format!("vm_start size={size} vm_config={vm_config}"));
        self.config.borrow_mut().1 = vm_config;
        true
    }

    fn on_configure(&mut self, size: usize) -> bool {
        let config = text(self.get_plugin_configuration());
        log(&format!("configure size={size} config={config}"));
        self.config.borrow_mut().0 = config;
        let define = |t, name| hostcalls::define_metric(t, name).unwrap_or(0);
        self.metrics.requests.set(define(MetricType::Counter, "conf_requests"));
        self.metrics.headers.set(define(MetricType::Gauge, "conf_request_headers"));
        self.metrics.body_bytes.set(define(MetricType::Histogram, "conf_body_bytes"));
        match hostcalls::register_shared_queue(QUEUE) {
            Ok(id) => log(&format!("registered queue {QUEUE} as {id}")),
            Err(s) => log(&format!("register_shared_queue failed: {}", status_code(s))),
        }
        self.set_tick_period(Duration::from_millis(TICK_MS));
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        let _ = hostcalls::set_shared_data("conf.ticks", Some(self.ticks.to_string().as_bytes()), None);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(item)) = hostcalls::dequeue_shared_queue(queue_id) {
            log(&format!("dequeued {}", String::from_utf8_lossy(&item)));
            let _ = hostcalls::set_shared_data("conf.queue_last", Some(&item), None);
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            id: context_id,
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            ..Default::default()
        }))
    }
}

#[derive(Default)]
struct Stream {
    id: u32,
    config: Rc<RefCell<(String, String)>>,
    metrics: Rc<Metrics>,
    seq: Vec<String>,
    local: String,
    call: String,
    body: bool,
    props: bool,
    status: Option<String>,
    count: u64,
    body_size: usize,
    request_trailer: Option<String>,
    pending: Option<String>,
    tag: String,
    read: String,
    logged: bool,
}

impl Stream {
    /// The local response or the outbound call that the request asked for in `phase`.
    fn phase_action(&mut self, phase: &str) -> Option<Action> {
        if self.local == phase {
            let body = format!("local {SDK} {phase}");
            self.send_http_response(
                418,
                vec![("x-conf-local", phase), ("x-conf-sdk", SDK)],
                Some(body.as_bytes()),
            );
            return Some(Action::Pause);
        }
        if self.call == phase {
            let path = format!("/call/{phase}");
            let headers = vec![
                (":method", "GET"),
                (":path", path.as_str()),
                (":authority", "conf-call.test"),
                (":scheme", "http"),
                ("x-conf-sdk", SDK),
            ];
            match self.dispatch_http_call(CLUSTER, headers, None, vec![], Duration::from_secs(5)) {
                Ok(token) => {
                    log(&format!("{phase}: http call {token} dispatched"));
                    self.pending = Some(phase.to_string());
                    return Some(Action::Pause);
                }
                Err(s) => log(&format!("{phase}: dispatch_http_call failed: {}", status_code(s))),
            }
        }
        None
    }

    fn append_body(&self, response: bool, size: usize, suffix: &str) {
        if response {
            let mut body = self.get_http_response_body(0, size).unwrap_or_default();
            body.extend_from_slice(suffix.as_bytes());
            self.set_http_response_body(0, size, &body);
        } else {
            let mut body = self.get_http_request_body(0, size).unwrap_or_default();
            body.extend_from_slice(suffix.as_bytes());
            self.set_http_request_body(0, size, &body);
        }
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        self.seq.push("http_call_response".to_string());
        let result = if num_headers == 0 {
            "failed".to_string()
        } else {
            let status = self.get_http_call_response_header(":status").unwrap_or_default();
            let body = text(self.get_http_call_response_body(0, body_size));
            format!("{status} {body}")
        };
        log(&format!("http call {token} answered: {result}"));
        match self.pending.take().as_deref() {
            Some("request_headers") => {
                self.add_http_request_header("x-conf-call-result", &result);
                self.resume_http_request();
            }
            Some("request_body") => {
                self.append_body(false, self.body_size, &format!("|call={result}"));
                self.resume_http_request();
            }
            Some("request_trailers") => {
                self.add_http_request_trailer("x-conf-call-result", &result);
                self.resume_http_request();
            }
            Some("response_headers") => {
                self.add_http_response_header("x-conf-call-result", &result);
                self.resume_http_response();
            }
            Some("response_body") => {
                self.append_body(true, self.body_size, &format!("|call={result}"));
                self.resume_http_response();
            }
            Some("response_trailers") => {
                self.add_http_response_trailer("x-conf-call-result", &result);
                self.resume_http_response();
            }
            _ => log("http call answered with no phase waiting"),
        }
    }

    fn on_done(&mut self) -> bool {
        log(&format!("done {}", self.id));
        if !self.tag.is_empty() {
            let order = if self.logged { "after_log" } else { "before_log" };
            let _ = hostcalls::set_shared_data(&format!("conf.done.{}", self.tag), Some(order.as_bytes()), None);
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        self.seq.push(format!("request_headers:{}", end_of_stream as u8));
        let get = |s: &Self, name: &str| s.get_http_request_header(name).unwrap_or_default();
        self.local = get(self, "x-conf-local");
        self.call = get(self, "x-conf-call");
        self.body = !get(self, "x-conf-body").is_empty();
        self.props = !get(self, "x-conf-props").is_empty();
        self.tag = get(self, "x-conf-tag");
        self.read = get(self, "x-conf-read");
        let enqueue = self.get_http_request_header("x-conf-enqueue");
        self.status = self.get_http_request_header("x-conf-status");
        let path = get(self, ":path");
        log(&format!("request_headers {} {} {}", self.id, get(self, ":method"), path));

        self.add_http_request_header("x-conf-sdk", SDK);
        self.remove_http_request_header("x-conf-drop");
        if self.get_http_request_header("x-conf-replace").is_some() {
            self.set_http_request_header("x-conf-replace", Some(&format!("replaced-{SDK}")));
        }
        if let Some(new_path) = self.get_http_request_header("x-conf-path") {
            self.set_http_request_header(":path", Some(&new_path));
        }

        let _ = hostcalls::increment_metric(self.metrics.requests.get(), 1);
        let _ = hostcalls::record_metric(self.metrics.headers.get(), num_headers as u64);

        // A counter in shared data, updated with compare-and-swap.
        for _ in 0..16 {
            let (value, cas) = hostcalls::get_shared_data("conf.count").unwrap_or((None, None));
            let n: u64 = text(value).parse().unwrap_or(0) + 1;
            match hostcalls::set_shared_data("conf.count", Some(n.to_string().as_bytes()), cas) {
                Ok(()) => {
                    self.count = n;
                    break;
                }
                Err(Status::CasMismatch) => continue,
                Err(s) => {
                    log(&format!("set_shared_data failed: {}", status_code(s)));
                    break;
                }
            }
        }

        let state = format!("{SDK}:{}", self.id);
        if let Err(s) = hostcalls::set_property(vec!["conf_state"], Some(state.as_bytes())) {
            log(&format!("set_property failed: {}", status_code(s)));
        }

        if let Some(item) = enqueue {
            let vm_id = text(hostcalls::get_property(vec!["plugin_vm_id"]).unwrap_or(None));
            match hostcalls::resolve_shared_queue(&vm_id, QUEUE) {
                Ok(Some(queue)) => {
                    if let Err(s) = hostcalls::enqueue_shared_queue(queue, Some(format!("{SDK} {item}").as_bytes())) {
                        log(&format!("enqueue_shared_queue failed: {}", status_code(s)));
                    }
                }
                Ok(None) => log(&format!("queue {QUEUE} not found")),
                Err(s) => log(&format!("resolve_shared_queue failed: {}", status_code(s))),
            }
        }

        self.phase_action("request_headers").unwrap_or(Action::Continue)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.seq.push(format!("request_body:{}:{}", body_size, end_of_stream as u8));
        if !end_of_stream {
            return Action::Pause;
        }
        self.body_size = body_size;
        let _ = hostcalls::record_metric(self.metrics.body_bytes.get(), body_size as u64);
        if self.body {
            let suffix = format!("|{SDK}");
            self.append_body(false, body_size, &suffix);
            self.body_size += suffix.len();
        }
        self.phase_action("request_body").unwrap_or(Action::Continue)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.seq.push("request_trailers".to_string());
        self.request_trailer = self.get_http_request_trailer("x-trailer-in");
        self.add_http_request_trailer("x-conf-trailer", SDK);
        self.phase_action("request_trailers").unwrap_or(Action::Continue)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.seq.push(format!("response_headers:{}", end_of_stream as u8));
        if let Some(status) = self.status.clone() {
            self.set_http_response_header(":status", Some(&status));
        }
        let (config, vm_config) = self.config.borrow().clone();
        let metric = hostcalls::get_metric(self.metrics.requests.get())
            .map(|v| v.to_string())
            .unwrap_or_else(|s| format!("!{}", status_code(s)));
        let state = match hostcalls::get_property(vec!["conf_state"]) {
            Ok(v) => text(v),
            Err(s) => format!("!{}", status_code(s)),
        };
        let upstream = self.get_http_response_header("x-upstream").unwrap_or_default();
        let mut report = vec![
            ("x-conf-sdk", SDK.to_string()),
            ("x-conf-count", self.count.to_string()),
            ("x-conf-metric", metric),
            ("x-conf-state", state),
            ("x-conf-queue-last", shared("conf.queue_last")),
            ("x-conf-ticks", shared("conf.ticks")),
            ("x-conf-config", config),
            ("x-conf-vm-config", vm_config),
            ("x-conf-upstream", upstream),
            ("x-conf-seq", self.seq.join(",")),
        ];
        if let Some(t) = self.request_trailer.clone() {
            report.push(("x-conf-request-trailer", t));
        }
        if !self.read.is_empty() {
            report.push(("x-conf-read-value", shared(&self.read)));
        }
        if self.props {
            let props: Vec<String> = PROPS.iter().map(|p| format!("{p}={}", property(p))).collect();
            report.push(("x-conf-props", props.join(";")));
        }
        for (name, value) in &report {
            self.add_http_response_header(name, value);
        }
        if let Some(action) = self.phase_action("response_headers") {
            return action;
        }
        if self.local == "response_body" || self.call == "response_body" {
            return Action::Pause; // hold the headers: the body phase may replace the response
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.seq.push(format!("response_body:{}:{}", body_size, end_of_stream as u8));
        if !end_of_stream {
            return Action::Pause;
        }
        self.body_size = body_size;
        if self.body {
            let suffix = format!("|{SDK}");
            self.append_body(true, body_size, &suffix);
            self.body_size += suffix.len();
        }
        self.phase_action("response_body").unwrap_or(Action::Continue)
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.seq.push("response_trailers".to_string());
        self.add_http_response_trailer("x-conf-trailer", SDK);
        self.phase_action("response_trailers").unwrap_or(Action::Continue)
    }

    fn on_log(&mut self) {
        let code = match hostcalls::get_property(vec!["response", "code"]) {
            Ok(Some(b)) if b.len() == 8 => u64::from_le_bytes(b[..8].try_into().unwrap()).to_string(),
            Ok(Some(b)) => format!("bytes:{}", hex(&b)),
            Ok(None) => "none".to_string(),
            Err(s) => format!("!{}", status_code(s)),
        };
        let line = format!("seq={} code={code}", self.seq.join(","));
        log(&format!("log {} {line}", self.id));
        if !self.tag.is_empty() {
            let _ = hostcalls::set_shared_data(&format!("conf.log.{}", self.tag), Some(line.as_bytes()), None);
        }
        self.logged = true;
    }
}
