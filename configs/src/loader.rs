//! The file loader: reads the main config and the priority directory, hashes them, and
//! polls for changes (Kratos' `FileLoader`, driven by content hash rather than mtime).
//!
//! An editor or a shell `>` truncates a file and then writes it, so a poll can catch it
//! empty or half written. Two guards keep such a file out: new content is used only when a
//! second read, a settle delay later, finds the same bytes; and an empty main file is an
//! error rather than a config with no routes.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::error::ConfigError;
use crate::model::Gateway;
use crate::parse::{is_blank_document, merge_priority, parse, parse_priority};
use crate::validate::validate;

/// How long new content must stay unchanged before it is used, unless
/// [`FileLoader::with_settle_delay`] says otherwise.
const DEFAULT_SETTLE_DELAY: Duration = Duration::from_millis(50);

/// How many settle delays `load` waits for changing files before it gives up.
const LOAD_SETTLE_ATTEMPTS: u32 = 20;

/// A config read from disk: the merged, validated gateway and the hash of what it was read
/// from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The main config with the priority directory merged in.
    pub gateway: Gateway,
    /// Hex sha256 of the inputs: of the main file alone when there are no priority files
    /// (so it equals `sha256sum gateway.yaml`), else also over each priority file's name and
    /// content.
    pub sha256: String,
    /// Hex sha256 of the main config's bytes alone (equal to `sha256` without priority
    /// files): how a control-service release written to the file is recognised.
    pub main_sha256: String,
    /// The `ETag` the server sent with a remote config, as sent (`None` for a file, or when
    /// the server sent none).
    pub etag: Option<String>,
    /// When the files were read.
    pub loaded_at: SystemTime,
    /// Priority files left out because they failed to parse or validate on their own, each
    /// as its error (`FILE:LINE:COL: message`); the others were merged, as Kratos does.
    pub skipped: Vec<String>,
}

/// What the loader knows, for `/debug/config/inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct LoaderStatus {
    /// The main config file.
    pub path: String,
    /// Hash of the config in force ("" before the first successful load).
    pub sha256: String,
    /// `version` of the config in force.
    pub version: String,
    /// When the config in force was loaded, RFC 3339 UTC.
    pub loaded_at: Option<String>,
    /// How many times `watch` applied a changed config.
    pub reloads: u64,
    /// The last load or apply failure; the config in force stayed.
    pub last_error: Option<String>,
    /// Priority files the config in force left out (they failed to parse or validate), as
    /// their errors.
    pub skipped_priority_files: Vec<String>,
}

/// Loads the config file (plus an optional priority directory) and watches it for changes.
/// Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct FileLoader {
    inner: Arc<Inner>,
    settle: Duration,
}

#[derive(Debug)]
struct Inner {
    conf: PathBuf,
    priority_dir: Option<PathBuf>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) sha256: String,
    pub(crate) version: String,
    pub(crate) loaded_at: Option<SystemTime>,
    pub(crate) reloads: u64,
    pub(crate) last_error: Option<String>,
    pub(crate) skipped: Vec<String>,
    /// The hash (or read error) that last failed, so `watch` reports it once, not every tick.
    pub(crate) rejected: Option<String>,
}

/// The bytes of every input file, read once so the hash and the parse see the same content.
pub(crate) struct Sources {
    main: Vec<u8>,
    priority: Vec<(PathBuf, Vec<u8>)>,
    pub(crate) sha256: String,
    main_sha256: String,
}

impl Sources {
    /// The main config's bytes and the priority files', hashed as [`Loaded::sha256`] says.
    pub(crate) fn new(main: Vec<u8>, priority: Vec<(PathBuf, Vec<u8>)>) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(&main);
        let main_sha256 = hex::encode(hasher.clone().finalize());
        for (path, content) in &priority {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update((content.len() as u64).to_le_bytes());
            hasher.update(content);
        }
        Sources {
            main,
            priority,
            sha256: hex::encode(hasher.finalize()),
            main_sha256,
        }
    }

    /// Same bytes in every file (the hash is not trusted for this: it is what is compared).
    fn same_content(&self, other: &Sources) -> bool {
        self.main == other.main && self.priority == other.priority
    }
}

/// What one poll found.
enum Poll {
    Unchanged,
    /// New content that changed again within the settle delay: still being written.
    Unsettled,
    Changed(Box<Loaded>),
    Failed {
        key: String,
        error: String,
    },
}

impl FileLoader {
    /// A loader for the config file `conf` and, if given, the priority directory whose
    /// `*.yaml`/`*.yml` files are merged over it. Nothing is read until `load` or `watch`.
    pub fn new(conf: impl Into<PathBuf>, priority_dir: Option<PathBuf>) -> Self {
        FileLoader {
            inner: Arc::new(Inner {
                conf: conf.into(),
                priority_dir,
                state: Mutex::new(State::default()),
            }),
            settle: DEFAULT_SETTLE_DELAY,
        }
    }

    /// How long new content must stay byte-for-byte unchanged before it is used (default
    /// 50 ms): long enough for a writer to finish, short enough not to be noticed.
    pub fn with_settle_delay(mut self, delay: Duration) -> Self {
        self.settle = delay;
        self
    }

    /// Reads, parses, merges the priority directory and validates. A success becomes the
    /// config in force for `status` and `watch`; a failure is recorded as `last_error`.
    ///
    /// Content other than the config in force is read twice, a settle delay apart, until
    /// two reads agree (so this blocks for at least that delay); files that keep changing
    /// for 20 delays are an error. An empty main file is an error.
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        let result = self.read_settled().and_then(|sources| self.build(&sources));
        let mut state = self.state();
        match &result {
            Ok(loaded) => state.record_success(loaded),
            Err(error) => state.last_error = Some(error.to_string()),
        }
        result
    }

    /// What the loader knows now.
    pub fn status(&self) -> LoaderStatus {
        let state = self.state();
        LoaderStatus {
            path: self.inner.conf.display().to_string(),
            sha256: state.sha256.clone(),
            version: state.version.clone(),
            loaded_at: state.loaded_at.map(rfc3339),
            reloads: state.reloads,
            last_error: state.last_error.clone(),
            skipped_priority_files: state.skipped.clone(),
        }
    }

    /// Polls every `interval`: re-hashes the main file and the priority directory and, when
    /// the hash differs from the config in force, reads them again after the settle delay;
    /// if both reads agree it loads them and calls `apply`, else (a file caught mid-write)
    /// it waits for the next tick without reporting anything.
    ///
    /// A load error or an `apply` error is logged, stored as `last_error`, and the config in
    /// force stays; the failing hash is remembered, so the same broken file is reported once
    /// rather than every tick. A success bumps `reloads`. Ends when `shutdown` is cancelled.
    pub fn watch<F>(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
        mut apply: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut(Loaded) -> Result<(), String> + Send + 'static,
    {
        let loader = self.clone();
        tokio::spawn(async move {
            tracing::info!(path = %loader.inner.conf.display(), ?interval, "watching config");
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(interval) => {}
                }
                let poller = loader.clone();
                let poll = match tokio::task::spawn_blocking(move || poller.poll()).await {
                    Ok(poll) => poll,
                    Err(error) => {
                        tracing::error!(%error, "config poll task failed");
                        continue;
                    }
                };
                match poll {
                    Poll::Unchanged => {}
                    Poll::Unsettled => tracing::debug!(
                        path = %loader.inner.conf.display(),
                        "config is being written; waiting for it to settle"
                    ),
                    Poll::Failed { key, error } => loader.record_failure(key, error),
                    Poll::Changed(loaded) => {
                        let sha256 = loaded.sha256.clone();
                        let summary = Summary::of(&loaded);
                        match apply(*loaded) {
                            Ok(()) => {
                                tracing::info!(
                                    sha256 = %sha256,
                                    version = %summary.version,
                                    "config reloaded"
                                );
                                loader.state().record_reload(&summary);
                            }
                            Err(error) => loader.record_failure(
                                sha256.clone(),
                                format!("config {sha256} was not applied: {error}"),
                            ),
                        }
                    }
                }
            }
            tracing::debug!("config watch stopped");
        })
    }

    /// One polling step: read and hash; load only when the hash is new and a second read,
    /// a settle delay later, finds the same content. Runs on a blocking thread.
    fn poll(&self) -> Poll {
        let sources = match self.read_sources() {
            Ok(sources) => sources,
            Err(error) => {
                let error = error.to_string();
                return Poll::Failed {
                    key: error.clone(),
                    error,
                };
            }
        };
        {
            let mut state = self.state();
            if sources.sha256 == state.sha256 {
                // Back to the config in force: a later break of the same kind is news again.
                state.rejected = None;
                return Poll::Unchanged;
            }
            if state.rejected.as_deref() == Some(sources.sha256.as_str()) {
                return Poll::Unchanged;
            }
        }
        thread::sleep(self.settle);
        // A failed second read is a file replaced or removed under us: also not settled.
        match self.read_sources() {
            Ok(again) if again.same_content(&sources) => {}
            _ => return Poll::Unsettled,
        }
        match self.build(&sources) {
            Ok(loaded) => Poll::Changed(Box::new(loaded)),
            Err(error) => Poll::Failed {
                key: sources.sha256,
                error: error.to_string(),
            },
        }
    }

    /// Logs and records a failure, once per distinct failing input.
    fn record_failure(&self, key: String, error: String) {
        let mut state = self.state();
        if state.rejected.as_deref() == Some(key.as_str()) {
            return;
        }
        tracing::error!(path = %self.inner.conf.display(), %error, "config not reloaded; the running config stays");
        state.rejected = Some(key);
        state.last_error = Some(error);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is plain data, valid even if a holder panicked.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads until two reads a settle delay apart agree; a single read when the content is
    /// the config in force.
    fn read_settled(&self) -> Result<Sources, ConfigError> {
        let mut sources = self.read_sources()?;
        if sources.sha256 == self.state().sha256 {
            return Ok(sources);
        }
        for _ in 0..LOAD_SETTLE_ATTEMPTS {
            thread::sleep(self.settle);
            let again = self.read_sources()?;
            if again.same_content(&sources) {
                return Ok(again);
            }
            sources = again;
        }
        Err(ConfigError::Unsettled {
            path: self.inner.conf.clone(),
        })
    }

    /// Reads the main file and every priority file, and hashes them.
    fn read_sources(&self) -> Result<Sources, ConfigError> {
        let conf = &self.inner.conf;
        let main = fs::read(conf).map_err(|source| ConfigError::Io {
            path: conf.clone(),
            source,
        })?;
        let priority = match &self.inner.priority_dir {
            Some(dir) => read_priority_dir(dir)?,
            None => Vec::new(),
        };
        Ok(Sources::new(main, priority))
    }

    /// Parses, merges and validates what `read_sources` read. An empty main file is refused:
    /// it is far more likely a file caught mid-write than a wish to drop every route.
    fn build(&self, sources: &Sources) -> Result<Loaded, ConfigError> {
        build(
            &self.inner.conf,
            self.inner.priority_dir.as_deref(),
            sources,
        )
    }
}

/// Parses, merges and validates `sources`: `conf` names the main config in errors (a path
/// or a URL), `priority_dir` the directory its priority files came from.
pub(crate) fn build(
    conf: &Path,
    priority_dir: Option<&Path>,
    sources: &Sources,
) -> Result<Loaded, ConfigError> {
    let text = utf8(&sources.main, conf)?;
    if is_blank_document(text) {
        return Err(ConfigError::Empty {
            path: conf.to_path_buf(),
        });
    }
    let mut gateway = parse(text, conf)?;
    let mut skipped = Vec::new();
    let mut merged = 0;
    for (path, content) in &sources.priority {
        let priority = match utf8(content, path).and_then(|text| parse_priority(text, path)) {
            Ok(priority) => priority,
            Err(error) => {
                tracing::warn!(%error, "priority config skipped; the other files are merged");
                skipped.push(error.to_string());
                continue;
            }
        };
        merged += 1;
        tracing::debug!(
            file = %path.display(),
            endpoints = priority.endpoints.len(),
            "merging priority config"
        );
        merge_priority(&mut gateway, priority.endpoints);
    }
    if merged > 0 {
        // Each file was checked on its own; this catches what only the merge reveals
        // (e.g. a priority backend naming a tlsStore entry the main file lacks).
        validate(&gateway).map_err(|error| match error {
            ConfigError::Invalid { field, message, .. } => ConfigError::Invalid {
                file: priority_dir.map(Path::to_path_buf),
                position: None,
                field,
                message: format!("{message} (after merging the priority directory)"),
            },
            other => other,
        })?;
    }
    Ok(Loaded {
        gateway,
        sha256: sources.sha256.clone(),
        main_sha256: sources.main_sha256.clone(),
        etag: None,
        loaded_at: SystemTime::now(),
        skipped,
    })
}

/// The parts of a `Loaded` the status keeps after `apply` consumed it.
pub(crate) struct Summary {
    sha256: String,
    version: String,
    loaded_at: SystemTime,
    skipped: Vec<String>,
}

impl Summary {
    pub(crate) fn of(loaded: &Loaded) -> Self {
        Summary {
            sha256: loaded.sha256.clone(),
            version: loaded.gateway.version.clone(),
            loaded_at: loaded.loaded_at,
            skipped: loaded.skipped.clone(),
        }
    }
}

impl State {
    pub(crate) fn record_success(&mut self, loaded: &Loaded) {
        self.record(&Summary::of(loaded));
    }

    pub(crate) fn record_reload(&mut self, summary: &Summary) {
        self.record(summary);
        self.reloads += 1;
    }

    fn record(&mut self, summary: &Summary) {
        self.sha256 = summary.sha256.clone();
        self.version = summary.version.clone();
        self.loaded_at = Some(summary.loaded_at);
        self.skipped = summary.skipped.clone();
        self.last_error = None;
        self.rejected = None;
    }
}

/// The `*.yaml`/`*.yml` files of `dir` (not hidden, not directories), sorted by name, with
/// their content. A directory that does not exist holds no files.
pub(crate) fn read_priority_dir(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, ConfigError> {
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConfigError::Io { path, source }
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(dir)(error)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_error(dir))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if is_yaml && !name.starts_with('.') && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let content = fs::read(&path).map_err(io_error(&path))?;
            Ok((path, content))
        })
        .collect()
}

fn utf8<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a str, ConfigError> {
    std::str::from_utf8(bytes).map_err(|error| ConfigError::Parse {
        file: path.to_path_buf(),
        position: None,
        message: format!("not UTF-8 text: {error}"),
    })
}

/// `2024-05-06T07:08:09Z` (UTC, whole seconds), as the debug views show times.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (hour, minute, second) = (secs % 86_400 / 3_600, secs % 3_600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_661); // 2000-02-29 01:01:01
        assert_eq!(rfc3339(t), "2000-02-29T01:01:01Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_735_689_599); // 2024-12-31 23:59:59
        assert_eq!(rfc3339(t), "2024-12-31T23:59:59Z");
    }
}
