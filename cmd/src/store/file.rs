//! `file://DIR`: one YAML file per endpoint, `DIR/<id>.yaml`, in the priority-file format
//! (`name: <id>`, `version: <n>`, `endpoints: [<endpoint>]`), so the same directory can
//! also be the `--priority-dir`. Writes go to a hidden temp file renamed over the old one
//! (atomic on one file system); the version is a counter kept in the file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use configs::{Endpoint, PriorityConfig};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::{ConfigStore, InstanceInfo, Snapshot, StoreError, StoredEndpoint};

/// The directory store. Only this gateway writes it; changes made through the admin API
/// are published at once, edits by hand are read at the next start.
pub(crate) struct FileStore {
    dir: PathBuf,
    /// Serializes writes (read version, compare, write, publish).
    write: tokio::sync::Mutex<()>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    instance: Mutex<Option<InstanceInfo>>,
}

impl FileStore {
    /// Reads `dir` (missing: empty; it is created by the first write).
    pub(crate) fn open(dir: PathBuf) -> Result<FileStore, String> {
        let endpoints =
            read_all(&dir).map_err(|err| format!("--store file://{}: {err}", dir.display()))?;
        let (snapshot, _) = watch::channel(Arc::new(snapshot_of(endpoints)));
        Ok(FileStore {
            dir,
            write: tokio::sync::Mutex::new(()),
            snapshot,
            instance: Mutex::new(None),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.yaml"))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(PathBuf) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || work(dir))
            .await
            .map_err(|err| StoreError::Unavailable(err.to_string()))?
    }

    /// Publishes the snapshot with `id` set to `stored` (removed when `None`). Only the
    /// written file changed (writes are serialized and this gateway is the only writer), so
    /// the others are not read again: with 1,000 endpoints that would be most of a write.
    fn publish(&self, id: &str, stored: Option<StoredEndpoint>) {
        self.snapshot.send_modify(|current| {
            let mut endpoints = current.endpoints.clone();
            let at = endpoints.binary_search_by(|e| e.id.as_str().cmp(id));
            match (at, stored) {
                (Ok(i), Some(stored)) => endpoints[i] = stored,
                (Err(i), Some(stored)) => endpoints.insert(i, stored),
                (Ok(i), None) => {
                    endpoints.remove(i);
                }
                (Err(_), None) => {}
            }
            *current = Arc::new(snapshot_of(endpoints));
        });
    }
}

#[async_trait::async_trait]
impl ConfigStore for FileStore {
    fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    async fn list(&self) -> Result<Vec<StoredEndpoint>, StoreError> {
        self.blocking(|dir| read_all(&dir).map_err(StoreError::Unavailable))
            .await
    }

    async fn get(&self, id: &str) -> Result<StoredEndpoint, StoreError> {
        let path = self.path(id);
        let id = id.to_owned();
        self.blocking(move |_| read_one(&path, &id)?.ok_or(StoreError::NotFound(id)))
            .await
    }

    async fn put(
        &self,
        id: &str,
        endpoint: &Endpoint,
        if_match: Option<&str>,
    ) -> Result<StoredEndpoint, StoreError> {
        let _write = self.write.lock().await;
        let path = self.path(id);
        let (id, endpoint) = (id.to_owned(), endpoint.clone());
        let if_match = if_match.map(str::to_owned);
        let stored = self
            .blocking(move |dir| {
                let current = read_one(&path, &id)?;
                check_version(current.as_ref(), if_match.as_deref())?;
                let version = current
                    .and_then(|c| c.version.parse::<u64>().ok())
                    .unwrap_or(0)
                    + 1;
                let file = PriorityConfig {
                    name: id.clone(),
                    version: version.to_string(),
                    endpoints: vec![endpoint.clone()],
                };
                let text = serde_saphyr::to_string(&file)
                    .map_err(|err| StoreError::Unavailable(format!("encode: {err}")))?;
                write_atomic(&dir, &path, text.as_bytes())?;
                Ok(StoredEndpoint {
                    id,
                    version: version.to_string(),
                    endpoint,
                })
            })
            .await?;
        self.publish(&stored.id, Some(stored.clone()));
        Ok(stored)
    }

    async fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), StoreError> {
        let _write = self.write.lock().await;
        let path = self.path(id);
        let owned = id.to_owned();
        let if_match = if_match.map(str::to_owned);
        self.blocking(move |_| {
            let Some(current) = read_one(&path, &owned)? else {
                return Err(StoreError::NotFound(owned));
            };
            check_version(Some(&current), if_match.as_deref())?;
            std::fs::remove_file(&path)
                .map_err(|err| StoreError::Unavailable(format!("{}: {err}", path.display())))
        })
        .await?;
        self.publish(id, None);
        Ok(())
    }

    fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    async fn register_instance(&self, instance: InstanceInfo) {
        *self.instance.lock().unwrap_or_else(|p| p.into_inner()) = Some(instance);
    }

    async fn instances(&self) -> Result<Vec<InstanceInfo>, StoreError> {
        let instance = self.instance.lock().unwrap_or_else(|p| p.into_inner());
        Ok(instance.iter().cloned().collect())
    }
}

/// 412 unless `if_match` is absent or names the stored version.
fn check_version(
    current: Option<&StoredEndpoint>,
    if_match: Option<&str>,
) -> Result<(), StoreError> {
    let Some(expected) = if_match else {
        return Ok(());
    };
    match current {
        Some(current) if current.version == expected => Ok(()),
        current => Err(StoreError::Conflict {
            expected: expected.to_owned(),
            current: current.map_or_else(|| "none".to_owned(), |c| c.version.clone()),
        }),
    }
}

fn write_atomic(dir: &Path, path: &Path, content: &[u8]) -> Result<(), StoreError> {
    let io = |err: std::io::Error| StoreError::Unavailable(format!("{}: {err}", path.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).map_err(io)?;
    if let Ok(file) = std::fs::File::open(&tmp) {
        let _ = file.sync_all();
    }
    std::fs::rename(&tmp, path).map_err(io)
}

fn read_one(path: &Path, id: &str) -> Result<Option<StoredEndpoint>, StoreError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(StoreError::Unavailable(format!(
                "{}: {err}",
                path.display()
            )));
        }
    };
    let file = configs::parse_priority(&text, path)
        .map_err(|err| StoreError::Unavailable(err.to_string()))?;
    let Some(endpoint) = file.endpoints.into_iter().next() else {
        return Ok(None);
    };
    Ok(Some(StoredEndpoint {
        id: id.to_owned(),
        version: file.version,
        endpoint,
    }))
}

/// Every `<id>.yaml` of `dir`, sorted by id; broken files are skipped with a warning.
fn read_all(dir: &Path) -> Result<Vec<StoredEndpoint>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err.to_string()),
    };
    let mut endpoints = Vec::new();
    for entry in entries {
        let path = entry.map_err(|err| err.to_string())?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let Some(id) = name.strip_suffix(".yaml") else {
            continue;
        };
        if super::check_id(id).is_err() {
            continue;
        }
        match read_one(&path, id) {
            Ok(Some(stored)) => endpoints.push(stored),
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "skipping a broken file in the store"),
        }
    }
    endpoints.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(endpoints)
}

fn snapshot_of(endpoints: Vec<StoredEndpoint>) -> Snapshot {
    let mut hasher = Sha256::new();
    for stored in &endpoints {
        hasher.update(stored.id.as_bytes());
        hasher.update([0]);
        hasher.update(stored.version.as_bytes());
        hasher.update([0]);
    }
    Snapshot {
        revision: hex::encode(&hasher.finalize()[..6]),
        endpoints,
    }
}
