//! The control service (`--ctrl-service`): go-kratos/gateway's `CtrlConfigLoader`. The
//! gateway asks a control plane for its config and writes what it gets to the config file
//! and the priority directory; the file loader ([`configs::FileLoader`]) then applies it at
//! its next poll, so a released config goes through the same parse, validation and
//! build-and-swap as an edited file (an invalid one is refused there, and the running
//! config stays).
//!
//! ```text
//! every interval (5 s):
//!   GET {ctrl}/v1/control/gateway/release?gateway=NAME&ip_addr=IP&last_version=V
//!     200 {"config": "<JSON>", "version": "...", "priorityConfigs": [{"key","config","version"}]}
//!         -> --conf (YAML), --priority-dir/{key}.yaml; stale *.yaml removed
//!     304 -> nothing changed
//!   GET {ctrl}/v1/control/gateway/features?gateway=NAME&ip_addr=IP
//!     200 {"gateway": "...", "features": {"gw:Retry": true, ...}} -> feature flags
//! ```
//!
//! Kratos' behaviour, kept: the config arrives as JSON text and is written as YAML by a
//! rename; `last_version` is the version of the last release written; any failure of the
//! release call (no connection, a status other than 200/304, a body that is not the JSON
//! above) moves to the next URL of the list; the features call follows a successful
//! release call on the same URL, and its failure is only reported; with the feature
//! `gw:PriorityConfig` the release call also sends `supportPriorityConfig=1` and
//! `lastPriorityVersions=KEY=VERSION`.
//!
//! Where we differ, and why:
//! - Kratos retries the next URL at once, forever, while all fail; here one round tries
//!   each URL once and then waits for the next interval, so a control plane that is down
//!   is not hammered.
//! - Kratos shuffles the URL list; here it is tried in the order given (list the URLs in
//!   different orders on different gateways to spread them), so failover is predictable.
//! - Every exchange is bounded (`timeout`, default 5 s, and 3 s to connect); Kratos'
//!   client has no timeout. Answers above 32 MiB are refused.
//! - The temp file is flushed to disk before the rename, and the directory after it.
//! - A priority key that is not a plain file name (`../x`, `a/b`, hidden) is skipped.
//! - A failed write of the config file (a local problem) does not move to the next URL.
//! - The features call answering 304 keeps the flags (Kratos logs it as an error).
//! - `lastPriorityVersions` is sent once per priority config (Kratos' `url.Values.Set`
//!   keeps only the last one).
//! - Kratos' `POST /debug/ctrl/load` (fetch now) is not offered: the debug views are
//!   read-only; `/debug/ctrl/load` shows the last release instead.

mod advertise;
mod protocol;
mod write;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use advertise::advertise_addr;
pub use protocol::{FEATURES_PATH, FetchError, PriorityItem, RELEASE_PATH, Release, ServiceUrl};

/// Kratos' feature flag that turns retries off when false (default on).
pub const FEATURE_RETRY: &str = "gw:Retry";
/// Kratos' feature flag that makes the release call report priority-config versions
/// (default off).
pub const FEATURE_PRIORITY_CONFIG: &str = "gw:PriorityConfig";

/// Feature flags by name, as the control service sets them.
pub type Features = BTreeMap<String, bool>;

/// The flags Kratos registers, with their defaults.
pub fn default_features() -> Features {
    Features::from([
        (FEATURE_PRIORITY_CONFIG.to_owned(), false),
        (FEATURE_RETRY.to_owned(), true),
    ])
}

/// Default time between two rounds (Kratos' 5 s).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Default bound of one exchange with the control service.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the control-service loader needs.
#[derive(Debug, Clone)]
pub struct CtrlOptions {
    /// Base URLs, tried in order (`--ctrl-service`).
    pub services: Vec<String>,
    /// The gateway's name (`--ctrl-name`, `ADVERTISE_NAME`), sent as `gateway`.
    pub name: String,
    /// The advertised address, sent as `ip_addr` (see [`advertise_addr`]).
    pub advertise_addr: String,
    /// The config file a release is written to (`--conf`).
    pub conf: PathBuf,
    /// Where priority configs are written (`--priority-dir`); None: they are ignored.
    pub priority_dir: Option<PathBuf>,
    /// Time between rounds.
    pub interval: Duration,
    /// Bound of one exchange (connect, answer and body).
    pub timeout: Duration,
}

/// A `--ctrl-service` list that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CtrlError {
    /// No URL at all.
    #[error("--ctrl-service: no URL given")]
    NoService,
    /// A URL that is not `http(s)://host[:port][/prefix]`.
    #[error("--ctrl-service: {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// What one round did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new release was written (its version).
    Released(String),
    /// 304: the config is up to date.
    NotModified,
}

/// Why a round ended without an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoundError {
    /// Every URL failed; the last failure.
    #[error("no control service answered; last: {url}: {error}")]
    Unreachable {
        /// The last URL tried.
        url: String,
        /// Its failure.
        error: FetchError,
    },
    /// The answer could not be written to disk.
    #[error("{0}")]
    Write(String),
}

/// What `/debug/ctrl/inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct CtrlStatus {
    /// Every control-service URL, in the order they are tried.
    pub ctrl_service: Vec<String>,
    /// Index of the URL in use.
    pub ctrl_service_idx: usize,
    /// The URL in use (the next call goes there).
    pub url: String,
    /// The name sent as `gateway` (Kratos calls it hostname).
    pub hostname: String,
    /// The address sent as `ip_addr`.
    pub advertise_addr: String,
    /// The config file releases are written to.
    pub dst_path: String,
    /// The priority directory, if any.
    pub priority_dir: Option<String>,
    /// `last_version` sent with the release call ("" before the first release).
    pub last_version: String,
    /// Key → version of the priority configs of the last release.
    pub last_priority_versions: BTreeMap<String, String>,
    /// When the last call was made (RFC 3339).
    pub last_fetch: Option<String>,
    /// When a control service last answered the release call with 200 or 304.
    pub last_success: Option<String>,
    /// When the last release was written.
    pub last_release: Option<String>,
    /// Releases written since start-up.
    pub releases: u64,
    /// The most recent failure (kept after a later success; compare `last_error_at` with
    /// `last_success`).
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_at: Option<String>,
    /// The feature flags in force.
    pub features: Features,
    /// The last failure of the features call, if its last call failed.
    pub feature_error: Option<String>,
}

/// The control-service loader. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct CtrlLoader {
    inner: Arc<Inner>,
}

type FeatureHook = Box<dyn Fn(&Features) + Send + Sync>;

struct Inner {
    services: Vec<ServiceUrl>,
    options: CtrlOptions,
    http: protocol::HttpClient,
    state: Mutex<State>,
    hook: OnceLock<FeatureHook>,
}

#[derive(Default)]
struct State {
    index: usize,
    last_version: String,
    priority_versions: BTreeMap<String, String>,
    features: Features,
    release: Option<serde_json::Value>,
    last_fetch: Option<SystemTime>,
    last_success: Option<SystemTime>,
    last_release: Option<SystemTime>,
    releases: u64,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    feature_error: Option<String>,
    /// Per URL, the failure last logged for it (None: it last worked), so a URL that stays
    /// down is logged once, not every round.
    logged: Vec<Option<String>>,
    /// The write or priority problem last logged.
    logged_write: Option<String>,
    /// The releases written lately, newest first, for [`CtrlLoader::release_of`].
    written: VecDeque<WrittenRelease>,
}

/// How many written releases [`CtrlLoader::release_of`] remembers.
const WRITTEN_KEPT: usize = 16;

/// A release written to the config file, as [`CtrlLoader::release_of`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenRelease {
    /// The release's `version`.
    pub version: String,
    /// The control-service URL that sent it.
    pub url: String,
    /// Hex sha256 of the config file it was written as.
    pub sha256: String,
}

impl CtrlLoader {
    /// A loader for `options`; fails on an empty or unusable URL list.
    pub fn new(options: CtrlOptions) -> Result<Self, CtrlError> {
        let services = options
            .services
            .iter()
            .flat_map(|list| list.split(','))
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                ServiceUrl::parse(url).map_err(|reason| CtrlError::BadUrl {
                    url: url.to_owned(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if services.is_empty() {
            return Err(CtrlError::NoService);
        }
        let state = State {
            features: default_features(),
            logged: vec![None; services.len()],
            ..State::default()
        };
        Ok(CtrlLoader {
            inner: Arc::new(Inner {
                http: protocol::HttpClient::new(options.timeout),
                services,
                options,
                state: Mutex::new(state),
                hook: OnceLock::new(),
            }),
        })
    }

    /// Calls `hook` with the flags in force now and after every features answer that
    /// changes them. Only the first hook set is kept.
    pub fn on_features(&self, hook: impl Fn(&Features) + Send + Sync + 'static) {
        if self.inner.hook.set(Box::new(hook)).is_ok() {
            let features = self.features();
            if let Some(hook) = self.inner.hook.get() {
                hook(&features);
            }
        }
    }

    /// The feature flags in force.
    pub fn features(&self) -> Features {
        self.state().features.clone()
    }

    /// The gateway name sent to the control service (`--ctrl-name`).
    pub fn name(&self) -> &str {
        &self.inner.options.name
    }

    /// The release (among the last 16 written) whose config file has the hex sha256
    /// `main_sha256`, newest first: tells whether the config in force came from the control
    /// service, and from which release (a release the loader refused is written but never
    /// in force, so the one before it is found).
    pub fn release_of(&self, main_sha256: &str) -> Option<WrittenRelease> {
        self.state()
            .written
            .iter()
            .find(|release| release.sha256 == main_sha256)
            .cloned()
    }

    /// The last release payload received, as the control service sent it.
    pub fn release(&self) -> Option<serde_json::Value> {
        self.state().release.clone()
    }

    /// What `/debug/ctrl/inspect` shows.
    pub fn status(&self) -> CtrlStatus {
        let options = &self.inner.options;
        let state = self.state();
        let time = |t: Option<SystemTime>| t.map(configs::rfc3339);
        CtrlStatus {
            ctrl_service: self
                .inner
                .services
                .iter()
                .map(|url| url.as_str().to_owned())
                .collect(),
            ctrl_service_idx: state.index,
            url: self.inner.services[state.index].as_str().to_owned(),
            hostname: options.name.clone(),
            advertise_addr: options.advertise_addr.clone(),
            dst_path: options.conf.display().to_string(),
            priority_dir: options
                .priority_dir
                .as_ref()
                .map(|dir| dir.display().to_string()),
            last_version: state.last_version.clone(),
            last_priority_versions: state.priority_versions.clone(),
            last_fetch: time(state.last_fetch),
            last_success: time(state.last_success),
            last_release: time(state.last_release),
            releases: state.releases,
            last_error: state.last_error.clone(),
            last_error_at: time(state.last_error_at),
            features: state.features.clone(),
            feature_error: state.feature_error.clone(),
        }
    }

    /// The start-up fetch: one round, given up after the timeout for each URL plus one for
    /// the features call (the gateway then starts from the file on disk, as Kratos does
    /// when its first load fails).
    pub async fn initial(&self) -> Result<Outcome, RoundError> {
        let calls = u32::try_from(self.inner.services.len() + 1).unwrap_or(u32::MAX);
        let bound = self.inner.options.timeout.saturating_mul(calls);
        match tokio::time::timeout(bound, self.round()).await {
            Ok(result) => result,
            Err(_) => {
                let url = self.status().url;
                let error = FetchError::Timeout(bound);
                self.record_error(format!("{url}: {error}"));
                Err(RoundError::Unreachable { url, error })
            }
        }
    }

    /// Runs a round every interval until `shutdown` (the first after one interval: start-up
    /// did the first with [`initial`](Self::initial)).
    pub fn run(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let loader = self.clone();
        tokio::spawn(async move {
            let interval = loader.inner.options.interval;
            tracing::info!(
                services = ?loader.status().ctrl_service,
                gateway = %loader.inner.options.name,
                ip_addr = %loader.inner.options.advertise_addr,
                ?interval,
                "polling the control service"
            );
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(interval) => {}
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = loader.round() => {}
                }
            }
            tracing::debug!("control service polling stopped");
        })
    }

    /// One round: the release call on the URL in use, then on the next ones while they
    /// fail (each at most once); after an answer, the features call on the same URL.
    pub async fn round(&self) -> Result<Outcome, RoundError> {
        let count = self.inner.services.len();
        let mut last = None;
        for _ in 0..count {
            let index = self.state().index;
            let url = &self.inner.services[index];
            match self.release_from(url).await {
                Ok(answer) => {
                    self.note_answer(index);
                    let outcome = self.apply(url, answer).await;
                    self.features_from(url).await;
                    return outcome;
                }
                Err(error) => {
                    let next = (index + 1) % count;
                    self.note_failure(index, next, &error);
                    last = Some((url.as_str().to_owned(), error));
                }
            }
        }
        let (url, error) = last.unwrap_or_else(|| (String::new(), FetchError::Status(0)));
        Err(RoundError::Unreachable { url, error })
    }

    /// The release call; a 200 answer is parsed and its config converted, not yet written.
    async fn release_from(&self, url: &ServiceUrl) -> Result<Answer, FetchError> {
        let query = {
            let state = self.state();
            let options = &self.inner.options;
            let mut query = form_urlencoded::Serializer::new(String::new());
            query
                .append_pair("gateway", &options.name)
                .append_pair("ip_addr", &options.advertise_addr)
                .append_pair("last_version", &state.last_version);
            if state.features.get(FEATURE_PRIORITY_CONFIG) == Some(&true) {
                query.append_pair("supportPriorityConfig", "1");
                for (key, version) in &state.priority_versions {
                    query.append_pair("lastPriorityVersions", &format!("{key}={version}"));
                }
            }
            query.finish()
        };
        self.state().last_fetch = Some(SystemTime::now());
        let (status, body) = self.inner.http.get(url.call(RELEASE_PATH, &query)?).await?;
        match status {
            StatusCode::NOT_MODIFIED => Ok(Answer::NotModified),
            StatusCode::OK => {
                let payload: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|error| FetchError::BadAnswer(format!("not JSON: {error}")))?;
                let release: Release = serde_json::from_value(payload.clone())
                    .map_err(|error| FetchError::BadAnswer(error.to_string()))?;
                let yaml = write::yaml_of(&release.config)
                    .map_err(|error| FetchError::BadAnswer(error.to_string()))?;
                Ok(Answer::Release {
                    release,
                    payload,
                    yaml,
                })
            }
            other => Err(FetchError::Status(other.as_u16())),
        }
    }

    /// Writes a release (off the runtime: file system calls block).
    async fn apply(&self, url: &ServiceUrl, answer: Answer) -> Result<Outcome, RoundError> {
        let (release, payload, yaml) = match answer {
            Answer::NotModified => {
                tracing::debug!(version = %self.state().last_version, "control service: config is up to date");
                return Ok(Outcome::NotModified);
            }
            Answer::Release {
                release,
                payload,
                yaml,
            } => (release, payload, yaml),
        };
        let conf = self.inner.options.conf.clone();
        let priority_dir = self.inner.options.priority_dir.clone();
        let items = release.priority_configs.clone();
        let sha256 = hex::encode(Sha256::digest(yaml.as_bytes()));
        let written = tokio::task::spawn_blocking(move || {
            write::write_atomically(&conf, yaml.as_bytes())
                .map_err(|error| format!("writing {}: {error}", conf.display()))?;
            Ok::<_, String>(priority_dir.map(|dir| write::write_priority(&dir, &items)))
        })
        .await
        .map_err(|error| format!("write task: {error}"))
        .and_then(|result| result);
        let priority = match written {
            Ok(priority) => priority,
            Err(error) => {
                self.note_write_problem(&error);
                return Err(RoundError::Write(error));
            }
        };
        let mut problems = Vec::new();
        {
            let mut state = self.state();
            state.last_version = release.version.clone();
            state.written.push_front(WrittenRelease {
                version: release.version.clone(),
                url: url.as_str().to_owned(),
                sha256,
            });
            state.written.truncate(WRITTEN_KEPT);
            state.release = Some(payload);
            state.last_release = Some(SystemTime::now());
            state.releases += 1;
            match priority {
                Some(priority) => {
                    state.priority_versions = priority.versions;
                    problems = priority.errors;
                }
                None if !release.priority_configs.is_empty() => problems.push(format!(
                    "{} priority config(s) ignored: no --priority-dir",
                    release.priority_configs.len()
                )),
                None => {}
            }
        }
        tracing::info!(
            url = url.as_str(),
            version = %release.version,
            priority_configs = release.priority_configs.len(),
            "control service release written; the config loader applies it at its next poll"
        );
        if problems.is_empty() {
            self.state().logged_write = None;
        } else {
            self.note_write_problem(&problems.join("; "));
        }
        Ok(Outcome::Released(release.version))
    }

    /// The features call; its answer replaces the flags it names.
    async fn features_from(&self, url: &ServiceUrl) {
        let query = {
            let options = &self.inner.options;
            form_urlencoded::Serializer::new(String::new())
                .append_pair("gateway", &options.name)
                .append_pair("ip_addr", &options.advertise_addr)
                .finish()
        };
        let result = async {
            let (status, body) = self
                .inner
                .http
                .get(url.call(FEATURES_PATH, &query)?)
                .await?;
            match status {
                StatusCode::OK => serde_json::from_slice::<protocol::FeaturesAnswer>(&body)
                    .map(|answer| Some(answer.features))
                    .map_err(|error| FetchError::BadAnswer(error.to_string())),
                StatusCode::NOT_MODIFIED => Ok(None),
                other => Err(FetchError::Status(other.as_u16())),
            }
        }
        .await;
        let changed = {
            let mut state = self.state();
            match result {
                Ok(answer) => {
                    if state.feature_error.take().is_some() {
                        tracing::info!(url = url.as_str(), "control service features answer again");
                    }
                    let before = state.features.clone();
                    for (name, enabled) in answer.unwrap_or_default() {
                        state.features.insert(name, enabled);
                    }
                    (state.features != before).then(|| state.features.clone())
                }
                Err(error) => {
                    let error = format!("{}: {error}", url.as_str());
                    if state.feature_error.as_deref() != Some(error.as_str()) {
                        tracing::warn!(%error, "control service features not loaded; the flags in force stay");
                        state.feature_error = Some(error);
                    }
                    None
                }
            }
        };
        if let Some(features) = changed {
            tracing::info!(?features, "feature flags changed");
            if let Some(hook) = self.inner.hook.get() {
                hook(&features);
            }
        }
    }

    fn note_answer(&self, index: usize) {
        let mut state = self.state();
        state.last_success = Some(SystemTime::now());
        if let Some(error) = state.logged[index].take() {
            tracing::info!(
                url = self.inner.services[index].as_str(),
                previous = %error,
                "control service answers again"
            );
        }
    }

    fn note_failure(&self, index: usize, next: usize, error: &FetchError) {
        let url = self.inner.services[index].as_str();
        let text = format!("{url}: {error}");
        let mut state = self.state();
        state.index = next;
        state.last_error = Some(text.clone());
        state.last_error_at = Some(SystemTime::now());
        let error_text = error.to_string();
        if state.logged[index].as_deref() != Some(error_text.as_str()) {
            tracing::warn!(
                url,
                %error,
                next = self.inner.services[next].as_str(),
                "control service failed; trying the next one"
            );
            state.logged[index] = Some(error_text);
        }
    }

    fn note_write_problem(&self, problem: &str) {
        let mut state = self.state();
        state.last_error = Some(problem.to_owned());
        state.last_error_at = Some(SystemTime::now());
        if state.logged_write.as_deref() != Some(problem) {
            tracing::warn!(problem, "control service release not fully written");
            state.logged_write = Some(problem.to_owned());
        }
    }

    fn record_error(&self, error: String) {
        let mut state = self.state();
        state.last_error = Some(error);
        state.last_error_at = Some(SystemTime::now());
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Plain data, valid even if a holder panicked.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A successful release call.
enum Answer {
    NotModified,
    Release {
        release: Release,
        payload: serde_json::Value,
        yaml: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(services: &[&str]) -> CtrlOptions {
        CtrlOptions {
            services: services.iter().map(|s| s.to_string()).collect(),
            name: "gw".into(),
            advertise_addr: "10.0.0.1".into(),
            conf: "gateway.yaml".into(),
            priority_dir: None,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    #[test]
    fn the_list_is_split_on_commas_and_checked() {
        let loader = CtrlLoader::new(options(&["http://a:1, http://b:2", "https://c/x"])).unwrap();
        assert_eq!(
            loader.status().ctrl_service,
            ["http://a:1", "http://b:2", "https://c/x"]
        );
        assert_eq!(loader.status().url, "http://a:1");
        assert_eq!(
            CtrlLoader::new(options(&[" , "])).err(),
            Some(CtrlError::NoService)
        );
        assert!(matches!(
            CtrlLoader::new(options(&["http://a:1,a:2"])).err(),
            Some(CtrlError::BadUrl { url, .. }) if url == "a:2"
        ));
    }

    #[test]
    fn kratos_flags_start_with_their_defaults() {
        let loader = CtrlLoader::new(options(&["http://a:1"])).unwrap();
        assert_eq!(loader.features(), default_features());
        assert!(loader.features()[FEATURE_RETRY]);
        let seen = Arc::new(Mutex::new(None));
        let hook_seen = seen.clone();
        loader.on_features(move |features| {
            *hook_seen.lock().unwrap() = Some(features.clone());
        });
        assert_eq!(*seen.lock().unwrap(), Some(default_features()));
    }
}
