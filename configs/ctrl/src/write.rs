//! Writing a release to disk: the config text turned into YAML, each file replaced by an
//! atomic rename so the file loader never reads half of one.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use crate::protocol::PriorityItem;

/// Tells temp files of one process apart.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A release's config text that cannot be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConvertError {
    /// The text is not JSON.
    #[error("config is not JSON: {0}")]
    NotJson(serde_json::Error),
    /// JSON, but not an object (a gateway config is a map).
    #[error("config is not a JSON object")]
    NotObject,
}

/// The YAML form of a release's `config` (JSON text), as Kratos writes it
/// (`yaml.JSONToYAML`). Keys come out sorted. When the YAML does not read back as the same
/// value (a serializer corner case), the JSON itself is written, pretty-printed: YAML
/// reads JSON too.
pub(crate) fn yaml_of(config: &str) -> Result<String, ConvertError> {
    let value: Value = serde_json::from_str(config).map_err(ConvertError::NotJson)?;
    if !value.is_object() {
        return Err(ConvertError::NotObject);
    }
    if let Ok(yaml) = serde_saphyr::to_string(&value)
        && serde_saphyr::from_str::<Value>(&yaml).is_ok_and(|back| back == value)
    {
        return Ok(yaml);
    }
    // Pretty JSON of a value that came from JSON always encodes.
    let mut json = serde_json::to_string_pretty(&value).unwrap_or_else(|_| config.to_owned());
    json.push('\n');
    Ok(json)
}

/// Replaces `path` with `content` atomically: writes a hidden temp file in the same
/// directory, flushes it to disk, renames it over `path`, then flushes the directory. A
/// reader sees the old file or the new one, never a mix; one that opened the old file
/// keeps reading it whole.
pub(crate) fn write_atomically(path: &Path, content: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
        .to_string_lossy();
    let temp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = File::create_new(&temp)?;
        file.write_all(content)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if let Err(error) = written {
        let _ = fs::remove_file(&temp);
        return Err(error);
    }
    // The rename itself reaches the disk with the directory; a failure here leaves a
    // complete file either way, so it is not an error.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// What writing the priority configs did.
#[derive(Debug, Default)]
pub(crate) struct PriorityWrite {
    /// Key → version of every file written.
    pub(crate) versions: BTreeMap<String, String>,
    /// Problems met (a bad key or config, a failed write or removal); the rest was written.
    pub(crate) errors: Vec<String>,
}

/// Writes each priority config to `dir/{key}.yaml` (atomically) and removes the `*.yaml`
/// files of `dir` whose key is not in the release, as Kratos does. An item whose key is not
/// a plain file name or whose config cannot be converted is skipped (and reported); its
/// old file, if any, is removed with the stale ones.
pub(crate) fn write_priority(dir: &Path, items: &[PriorityItem]) -> PriorityWrite {
    let mut outcome = PriorityWrite::default();
    if let Err(error) = fs::create_dir_all(dir) {
        outcome
            .errors
            .push(format!("creating {}: {error}", dir.display()));
        return outcome;
    }
    for item in items {
        if !is_plain_key(&item.key) {
            outcome.errors.push(format!(
                "priority config key {:?} is not a plain file name; skipped",
                item.key
            ));
            continue;
        }
        let yaml = match yaml_of(&item.config) {
            Ok(yaml) => yaml,
            Err(error) => {
                outcome
                    .errors
                    .push(format!("priority config {:?}: {error}; skipped", item.key));
                continue;
            }
        };
        let path = dir.join(format!("{}.yaml", item.key));
        match write_atomically(&path, yaml.as_bytes()) {
            Ok(()) => {
                outcome
                    .versions
                    .insert(item.key.clone(), item.version.clone());
            }
            Err(error) => outcome
                .errors
                .push(format!("writing {}: {error}", path.display())),
        }
    }
    remove_stale(dir, &outcome.versions, &mut outcome.errors);
    outcome
}

/// Removes `dir/*.yaml` files (not directories) whose stem is not a key of `keep`.
fn remove_stale(dir: &Path, keep: &BTreeMap<String, String>, errors: &mut Vec<String>) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            errors.push(format!("reading {}: {error}", dir.display()));
            return;
        }
    };
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(key) = name.strip_suffix(".yaml") else {
            continue;
        };
        if keep.contains_key(key) || !entry.file_type().is_ok_and(|kind| kind.is_file()) {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => tracing::info!(file = %path.display(), "stale priority config removed"),
            Err(error) => errors.push(format!("removing {}: {error}", path.display())),
        }
    }
}

/// A key that names a file inside the directory: no separator, not hidden, not `..`.
fn is_plain_key(key: &str) -> bool {
    !key.is_empty() && !key.starts_with('.') && !key.contains(['/', '\\', '\0']) && key.len() <= 200
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    fn item(key: &str, config: &str, version: &str) -> PriorityItem {
        PriorityItem {
            key: key.to_owned(),
            config: config.to_owned(),
            version: version.to_owned(),
        }
    }

    #[test]
    fn yaml_of_a_kratos_config_parses_as_the_same_gateway() {
        let json = r#"{"name":"helloworld","version":"v1","endpoints":[{"path":"/a/*","method":"GET",
            "timeout":"1s","protocol":"HTTP","backends":[{"target":"127.0.0.1:8000","weight":"10"}],
            "retry":{"attempts":3,"conditions":[{"byStatusCode":"502-504"},
            {"byHeader":{"name":"Grpc-Status","value":"[\"14\"]"}}]},
            "metadata":{"yes":"no","n":"10"},
            "middlewares":[{"name":"cors","options":{"@type":"type.googleapis.com/x","allowOrigins":["*"]}}]}]}"#;
        let yaml = yaml_of(json).unwrap();
        assert!(
            !yaml.trim_start().starts_with('{'),
            "YAML, not JSON: {yaml}"
        );
        let from_yaml = configs::parse(&yaml, Path::new("a.yaml")).unwrap();
        let from_json = configs::parse(json, Path::new("a.json")).unwrap();
        assert_eq!(from_yaml, from_json);
        assert_eq!(from_yaml.endpoints[0].metadata["yes"], "no");
        assert_eq!(from_yaml.endpoints[0].metadata["n"], "10");
    }

    #[test]
    fn yaml_of_refuses_what_is_not_a_json_object() {
        assert!(matches!(yaml_of("name: x"), Err(ConvertError::NotJson(_))));
        assert!(matches!(yaml_of("[1]"), Err(ConvertError::NotObject)));
        assert!(matches!(yaml_of(""), Err(ConvertError::NotJson(_))));
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.yaml");
        fs::write(&path, "old").unwrap();
        let mut reader = File::open(&path).unwrap();
        write_atomically(&path, b"new content").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new content");
        // A reader that opened the old file still reads it whole (a rename, not a rewrite).
        let mut old = String::new();
        io::Read::read_to_string(&mut reader, &mut old).unwrap();
        assert_eq!(old, "old");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["gateway.yaml"]);
    }

    #[test]
    fn a_concurrent_reader_never_sees_a_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.yaml");
        let versions: Vec<Vec<u8>> = (0..40u8)
            .map(|i| vec![b'a' + (i % 26); 256 * 1024])
            .collect();
        write_atomically(&path, &versions[0]).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (path, done) = (path.clone(), done.clone());
            std::thread::spawn(move || {
                let mut reads = 0u32;
                while !done.load(Ordering::Relaxed) || reads == 0 {
                    let content = fs::read(&path).unwrap();
                    assert_eq!(content.len(), 256 * 1024, "partial file read");
                    assert!(content.iter().all(|b| *b == content[0]), "mixed file read");
                    reads += 1;
                }
                reads
            })
        };
        for version in &versions[1..] {
            write_atomically(&path, version).unwrap();
        }
        done.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }

    #[test]
    fn priority_files_are_written_and_stale_ones_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("old.yaml"), "endpoints: []").unwrap();
        fs::write(dir.path().join("manual.yml"), "endpoints: []").unwrap();
        fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let config = r#"{"endpoints":[{"path":"/p","backends":[{"target":"127.0.0.1:1"}]}]}"#;
        let outcome = write_priority(
            dir.path(),
            &[
                item("canary", config, "3"),
                item("../escape", config, "1"),
                item("broken", "not json", "1"),
            ],
        );
        assert_eq!(
            outcome.versions,
            BTreeMap::from([("canary".to_owned(), "3".to_owned())])
        );
        assert_eq!(outcome.errors.len(), 2, "{:?}", outcome.errors);
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        // Kratos removes only `*.yaml` files it does not know.
        assert_eq!(names, ["canary.yaml", "manual.yml", "notes.txt"]);
        let written = fs::read_to_string(dir.path().join("canary.yaml")).unwrap();
        let parsed = configs::parse_priority(&written, Path::new("canary.yaml")).unwrap();
        assert_eq!(parsed.endpoints[0].path, "/p");
        assert!(!dir.path().parent().unwrap().join("escape.yaml").exists());
    }
}
