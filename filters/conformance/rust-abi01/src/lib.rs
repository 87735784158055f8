//! A conformance filter for Proxy-Wasm ABI 0.1.0, built with the Rust `proxy-wasm` crate 0.1.4
//! (the last release of that ABI): it reads its configuration with `proxy_get_configuration`,
//! gets its header callbacks without `end_of_stream`, and sees a missing header as empty.
//! What it does is in ../README.md ("The ABI 0.1.0 filter").

use log::info;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;
use std::time::Duration;

#[no_mangle]
pub fn _start() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: String::new() })
    });
}

struct Root {
    config: String,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, size: usize) -> bool {
        info!("conf[rust01] vm_start size={}", size);
        true
    }

    fn on_configure(&mut self, size: usize) -> bool {
        if let Some(bytes) = self.get_configuration() {
            self.config = String::from_utf8_lossy(&bytes).into_owned();
        }
        info!("conf[rust01] configure size={} config={}", size, self.config);
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { id: context_id, config: self.config.clone() }))
    }
}

struct Stream {
    id: u32,
    config: String,
}

impl Context for Stream {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, size: usize, _trailers: usize) {
        let body = self.get_http_call_response_body(0, size).unwrap_or_default();
        let body = String::from_utf8_lossy(&body).into_owned();
        self.set_http_request_header("x-conf-call", Some(&body));
        self.resume_http_request();
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, headers: usize) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let missing = match self.get_http_request_header("x-conf-absent") {
            None => "none".to_string(),
            Some(v) => format!("some:{}", v),
        };
        self.set_http_request_header("x-conf-cfg", Some(&self.config));
        self.set_http_request_header("x-conf-absent-was", Some(&missing));
        self.set_http_request_header("x-conf-headers", Some(&headers.to_string()));
        match path.as_str() {
            "/local" => {
                self.send_http_response(418, vec![("x-conf-abi", "0.1.0")], Some(b"teapot"));
                Action::Pause
            }
            "/call" => {
                let call = self.dispatch_http_call(
                    "conf",
                    vec![(":method", "GET"), (":path", "/ping"), (":authority", "conf")],
                    None,
                    vec![],
                    Duration::from_secs(5),
                );
                match call {
                    Ok(_) => Action::Pause,
                    Err(_) => {
                        self.send_http_response(502, vec![], Some(b"call failed"));
                        Action::Pause
                    }
                }
            }
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize) -> Action {
        self.set_http_response_header("x-conf-abi", Some("0.1.0"));
        Action::Continue
    }

    fn on_log(&mut self) {
        info!("conf[rust01] log context={}", self.id);
    }
}
