//! A double of a go-kratos/gateway control service, answering the two calls of Kratos'
//! ctrl loader (`config/config-loader/ctrl-loader.go`) over real HTTP on 127.0.0.1.
//!
//! # Reproduced behaviours
//! - `GET /v1/control/gateway/release?gateway=&ip_addr=&last_version=`: 200 with
//!   `{"config": "<JSON text>", "version": "...", "priorityConfigs": [{"key","config","version"}]}`
//!   for the release set by [`CtrlDouble::release`], or 304 with no body when
//!   `last_version` equals its version. Before any release: 404.
//! - `GET /v1/control/gateway/features?gateway=&ip_addr=`: 200 with
//!   `{"gateway": NAME, "features": {...}}` (the map set by [`CtrlDouble::set_features`],
//!   empty by default).
//! - Any other path: 404.
//!
//! # Test controls
//! [`CtrlDouble::fail_with`] makes every call answer a status (e.g. 500);
//! [`CtrlDouble::answer_garbage`] makes release calls answer 200 with a body that is not
//! JSON; [`CtrlDouble::calls`] lists the calls received (path, query pairs and the status
//! answered).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::harness::{Upstream, UpstreamBody, text};

/// The release path of Kratos' protocol.
pub const RELEASE: &str = "/v1/control/gateway/release";
/// The features path of Kratos' protocol.
pub const FEATURES: &str = "/v1/control/gateway/features";

/// One call the double received.
#[derive(Debug, Clone)]
pub struct Call {
    /// The request path.
    pub path: String,
    /// The query pairs, in order (repeated keys repeated).
    pub query: Vec<(String, String)>,
    /// The status answered.
    pub status: u16,
}

impl Call {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Every value of query parameter `name`.
    pub fn params(&self, name: &str) -> Vec<&str> {
        self.query
            .iter()
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }
}

#[derive(Default)]
struct State {
    /// The release payload and its version.
    release: Option<(Value, String)>,
    features: BTreeMap<String, bool>,
    fail: Option<u16>,
    garbage: bool,
    calls: Vec<Call>,
}

/// A running control-service double; stops when dropped.
pub struct CtrlDouble {
    server: Upstream,
    state: Arc<Mutex<State>>,
}

impl CtrlDouble {
    /// Starts the double on 127.0.0.1:0 with no release and no features.
    pub async fn start() -> CtrlDouble {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let server = Upstream::start(move |req: Request<Incoming>| {
            let shared = shared.clone();
            async move { answer(&shared, &req) }
        })
        .await;
        CtrlDouble { server, state }
    }

    /// `http://127.0.0.1:PORT`, for `--ctrl-service`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// Sets the release: `config` (a gateway config, sent as JSON text), its `version`,
    /// and priority configs as `(key, config, version)`.
    pub fn release(&self, version: &str, config: &Value, priority: &[(&str, Value, &str)]) {
        self.release_text(version, &config.to_string(), priority);
    }

    /// [`release`](Self::release) with the config text as given (it may be anything).
    pub fn release_text(&self, version: &str, config: &str, priority: &[(&str, Value, &str)]) {
        let priority: Vec<Value> = priority
            .iter()
            .map(|(key, config, version)| {
                json!({"key": key, "config": config.to_string(), "version": version})
            })
            .collect();
        let payload = json!({"config": config, "version": version, "priorityConfigs": priority});
        self.state().release = Some((payload, version.to_owned()));
    }

    /// The release payload as the double sends it.
    pub fn payload(&self) -> Option<Value> {
        self.state()
            .release
            .as_ref()
            .map(|(payload, _)| payload.clone())
    }

    /// Sets the feature flags the features call answers.
    pub fn set_features(&self, features: &[(&str, bool)]) {
        self.state().features = features
            .iter()
            .map(|(name, enabled)| (name.to_string(), *enabled))
            .collect();
    }

    /// Every call answers `status` (None: back to normal).
    pub fn fail_with(&self, status: Option<u16>) {
        self.state().fail = status;
    }

    /// Release calls answer 200 with a body that is not JSON.
    pub fn answer_garbage(&self, garbage: bool) {
        self.state().garbage = garbage;
    }

    /// The calls received so far on `path`.
    pub fn calls(&self, path: &str) -> Vec<Call> {
        self.state()
            .calls
            .iter()
            .filter(|call| call.path == path)
            .cloned()
            .collect()
    }

    /// Stops serving (connections are then refused).
    pub fn stop(&self) {
        self.server.stop();
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn answer(shared: &Mutex<State>, req: &Request<Incoming>) -> Response<UpstreamBody> {
    let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
    let path = req.uri().path().to_owned();
    let query: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let param = |name: &str| {
        query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
            .unwrap_or_default()
    };
    let (status, body) = match (state.fail, path.as_str()) {
        (Some(status), _) => (status, format!("failing with {status}\n")),
        (None, RELEASE) => match &state.release {
            _ if state.garbage => (200, "<html>not json</html>".to_owned()),
            None => (404, "no release for this gateway\n".to_owned()),
            Some((_, version)) if *version == param("last_version") => (304, String::new()),
            Some((payload, _)) => (200, payload.to_string()),
        },
        (None, FEATURES) => (
            200,
            json!({"gateway": param("gateway"), "features": state.features}).to_string(),
        ),
        (None, _) => (404, "404 page not found\n".to_owned()),
    };
    state.calls.push(Call {
        path,
        query,
        status,
    });
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(text(body))
        .expect("response")
}
