//! [`ConfigLoader`]: the file loader or the remote loader, picked by the `--conf` value.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::ConfigError;
use crate::loader::{FileLoader, Loaded, LoaderStatus};
use crate::remote::RemoteLoader;

/// Where the config comes from: a file ([`FileLoader`]) or an `http(s)://` URL
/// ([`RemoteLoader`]). Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub enum ConfigLoader {
    /// A local file, re-hashed every interval.
    File(FileLoader),
    /// A URL, polled with conditional GETs.
    Remote(RemoteLoader),
}

impl ConfigLoader {
    /// A [`RemoteLoader`] when `conf` starts with `http://` or `https://` (any case), else a
    /// [`FileLoader`]. The priority directory is local either way.
    pub fn new(conf: &str, priority_dir: Option<PathBuf>) -> Self {
        let lower = conf.get(..8).unwrap_or(conf).to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            ConfigLoader::Remote(RemoteLoader::new(conf, priority_dir))
        } else {
            ConfigLoader::File(FileLoader::new(conf, priority_dir))
        }
    }

    /// The first load (a file is read off the runtime, since it waits for the file to
    /// settle).
    pub async fn load(&self) -> Result<Loaded, ConfigError> {
        match self {
            ConfigLoader::File(loader) => {
                let loader = loader.clone();
                match tokio::task::spawn_blocking(move || loader.load()).await {
                    Ok(result) => result,
                    Err(error) => Err(ConfigError::Io {
                        path: PathBuf::new(),
                        source: std::io::Error::other(error.to_string()),
                    }),
                }
            }
            ConfigLoader::Remote(loader) => loader.load().await,
        }
    }

    /// What the loader knows now (`path` is the file or the URL).
    pub fn status(&self) -> LoaderStatus {
        match self {
            ConfigLoader::File(loader) => loader.status(),
            ConfigLoader::Remote(loader) => loader.status(),
        }
    }

    /// Polls every `interval` and calls `apply` with each new valid config; see
    /// [`FileLoader::watch`] and [`RemoteLoader::watch`].
    pub fn watch<F>(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
        apply: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut(Loaded) -> Result<(), String> + Send + 'static,
    {
        match self {
            ConfigLoader::File(loader) => loader.watch(interval, shutdown, apply),
            ConfigLoader::Remote(loader) => loader.watch(interval, shutdown, apply),
        }
    }
}
