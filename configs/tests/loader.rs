//! FileLoader: priority merge, hashing, and the polling watch.

use std::fs;
use std::path::Path;
use std::time::Duration;

use configs::{FileLoader, Loaded};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const INTERVAL: Duration = Duration::from_millis(50);
/// Upper bound on waiting for something that should happen within two intervals; generous so
/// a loaded CI machine does not flake, while a missing reload still fails the test.
const DEADLINE: Duration = Duration::from_secs(2);

fn config(version: &str) -> String {
    format!(
        "name: test\nversion: {version}\nendpoints:\n  - path: /a\n    backends: [{{target: '127.0.0.1:8000'}}]\n  - path: /b\n    method: GET\n    backends: [{{target: '127.0.0.1:8001'}}]\n"
    )
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn paths(gateway: &configs::Gateway) -> Vec<(String, String, String)> {
    gateway
        .endpoints
        .iter()
        .map(|e| {
            (
                e.method.clone(),
                e.path.clone(),
                e.backends[0].target.clone(),
            )
        })
        .collect()
}

fn triple(method: &str, path: &str, target: &str) -> (String, String, String) {
    (method.into(), path.into(), target.into())
}

/// Starts `watch` with an `apply` that forwards every config it gets to the returned
/// channel and fails for the versions in `reject`.
fn watch(
    loader: &FileLoader,
    reject: &'static [&'static str],
) -> (
    mpsc::UnboundedReceiver<Loaded>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let handle = loader.watch(INTERVAL, shutdown.clone(), move |loaded: Loaded| {
        let version = loaded.gateway.version.clone();
        let _ = sender.send(loaded);
        if reject.contains(&version.as_str()) {
            Err(format!("cannot build version {version}"))
        } else {
            Ok(())
        }
    });
    (receiver, shutdown, handle)
}

async fn next(receiver: &mut mpsc::UnboundedReceiver<Loaded>) -> Loaded {
    tokio::time::timeout(DEADLINE, receiver.recv())
        .await
        .expect("apply was not called in time")
        .expect("watch ended")
}

/// Asserts nothing reaches `apply` for `ticks` intervals.
async fn nothing_for(receiver: &mut mpsc::UnboundedReceiver<Loaded>, ticks: u32) {
    let quiet = tokio::time::timeout(INTERVAL * ticks, receiver.recv()).await;
    assert!(
        quiet.is_err(),
        "apply was called: {:?}",
        quiet.map(|l| l.map(|l| l.sha256))
    );
}

#[test]
fn loader_is_shareable() {
    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
    assert_shareable::<FileLoader>();
}

#[test]
fn hash_is_the_main_files_sha256_without_priority_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    write(&conf, &config("v1"));
    let loaded = FileLoader::new(&conf, None).load().expect("load");
    assert_eq!(
        loaded.sha256,
        hex::encode(Sha256::digest(config("v1").as_bytes()))
    );
    assert_eq!(loaded.gateway.version, "v1");
}

#[test]
fn priority_files_replace_or_prepend_in_name_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    let priority = dir.path().join("priority.d");
    fs::create_dir(&priority).expect("mkdir");
    write(&conf, &config("v1"));
    // Replaces GET /b (method compared case-insensitively).
    write(
        &priority.join("10-replace.yaml"),
        "name: p1\nversion: v9\nendpoints:\n  - path: /b\n    method: get\n    backends: [{target: '10.0.0.1:80'}]\n",
    );
    // New routes are prepended; the later file's new route ends up first.
    write(
        &priority.join("20-new.yml"),
        "endpoints:\n  - path: /c\n    backends: [{target: '10.0.0.2:80'}]\n",
    );
    write(
        &priority.join("30-new.yaml"),
        "endpoints:\n  - path: /d\n    backends: [{target: '10.0.0.3:80'}]\n",
    );
    // Not YAML, hidden, or a directory: ignored.
    write(&priority.join("notes.txt"), "endpoints: oops");
    write(&priority.join(".hidden.yaml"), "endpoints: oops");
    fs::create_dir(priority.join("sub.yaml")).expect("mkdir");

    let loader = FileLoader::new(&conf, Some(priority.clone()));
    let loaded = loader.load().expect("load");
    assert_eq!(
        paths(&loaded.gateway),
        [
            triple("", "/d", "10.0.0.3:80"),
            triple("", "/c", "10.0.0.2:80"),
            triple("", "/a", "127.0.0.1:8000"),
            triple("get", "/b", "10.0.0.1:80"),
        ]
    );
    // The main file's name and version stay.
    assert_eq!(loaded.gateway.version, "v1");
    // The hash covers the priority files.
    assert_ne!(
        loaded.sha256,
        hex::encode(Sha256::digest(config("v1").as_bytes()))
    );
}

#[test]
fn broken_priority_file_fails_the_load_with_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    let priority = dir.path().join("priority.d");
    fs::create_dir(&priority).expect("mkdir");
    write(&conf, &config("v1"));
    let broken = priority.join("broken.yaml");
    write(
        &broken,
        "endpoints:\n  - path: /x\n    backends:\n      - target: nowhere\n",
    );
    let loader = FileLoader::new(&conf, Some(priority));
    let error = loader.load().expect_err("broken priority file");
    assert_eq!(error.file(), Some(broken.as_path()));
    assert_eq!(error.line(), Some(4));
    let shown = error.to_string();
    assert!(
        shown.starts_with(&format!("{}:4:17: ", broken.display())),
        "{shown}"
    );
    assert_eq!(loader.status().last_error, Some(shown));

    // A priority backend naming a tlsStore entry the main file lacks fails after merging.
    write(
        &broken,
        "endpoints:\n  - path: /x\n    backends: [{target: 'a:1', tlsConfigName: nope}]\n",
    );
    let error = loader.load().expect_err("unknown tls config");
    assert!(
        error
            .to_string()
            .contains("no tlsStore entry named \"nope\""),
        "{error}"
    );
}

#[test]
fn missing_config_file_is_an_io_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("absent.yaml");
    let loader = FileLoader::new(&conf, None);
    let error = loader.load().expect_err("missing file");
    assert!(
        matches!(error, configs::ConfigError::Io { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().starts_with(&conf.display().to_string()),
        "{error}"
    );
    let status = loader.status();
    assert_eq!(status.sha256, "");
    assert_eq!(status.loaded_at, None);
    assert!(status.last_error.is_some());
}

#[tokio::test]
async fn edit_reloads_and_unchanged_file_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    write(&conf, &config("v1"));
    let loader = FileLoader::new(&conf, None);
    let first = loader.load().expect("load");
    let status = loader.status();
    assert_eq!(status.sha256, first.sha256);
    assert_eq!(status.version, "v1");
    assert!(
        status
            .loaded_at
            .as_deref()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 20)
    );
    assert_eq!(status.reloads, 0);

    let (mut applied, shutdown, handle) = watch(&loader, &[]);
    // Unchanged (even rewritten with the same bytes): nothing to apply.
    nothing_for(&mut applied, 3).await;
    write(&conf, &config("v1"));
    nothing_for(&mut applied, 3).await;
    assert_eq!(loader.status().reloads, 0);

    write(&conf, &config("v2"));
    let second = next(&mut applied).await;
    assert_eq!(second.gateway.version, "v2");
    assert_ne!(second.sha256, first.sha256);
    nothing_for(&mut applied, 3).await;
    let status = loader.status();
    assert_eq!((status.version.as_str(), status.reloads), ("v2", 1));
    assert_eq!(status.sha256, second.sha256);
    assert_eq!(status.last_error, None);

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, handle)
        .await
        .expect("watch did not stop")
        .expect("watch panicked");
}

#[tokio::test]
async fn broken_file_keeps_the_running_config_until_fixed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    write(&conf, &config("v1"));
    let loader = FileLoader::new(&conf, None);
    let first = loader.load().expect("load");
    let (mut applied, shutdown, _handle) = watch(&loader, &[]);

    write(&conf, &config("v2").replace("path: /b", "path: b"));
    // Wait until the watcher saw it; apply must not run.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while loader.status().last_error.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "broken file not reported"
        );
        tokio::time::sleep(INTERVAL / 5).await;
    }
    nothing_for(&mut applied, 3).await;
    let status = loader.status();
    let error = status.last_error.expect("last_error");
    assert!(
        error.starts_with(&format!("{}:6:11: ", conf.display())),
        "{error}"
    );
    assert!(error.contains("must start with '/'"), "{error}");
    assert_eq!(
        (status.sha256, status.version, status.reloads),
        (first.sha256.clone(), "v1".into(), 0)
    );

    write(&conf, &config("v3"));
    let fixed = next(&mut applied).await;
    assert_eq!(fixed.gateway.version, "v3");
    nothing_for(&mut applied, 1).await;
    let status = loader.status();
    assert_eq!(
        (status.version.as_str(), status.reloads, status.last_error),
        ("v3", 1, None)
    );
    shutdown.cancel();
}

#[tokio::test]
async fn failed_apply_is_reported_once_and_not_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    write(&conf, &config("v1"));
    let loader = FileLoader::new(&conf, None);
    loader.load().expect("load");
    let (mut applied, shutdown, _handle) = watch(&loader, &["bad"]);

    write(&conf, &config("bad"));
    assert_eq!(next(&mut applied).await.gateway.version, "bad");
    // The same content is not offered again on later ticks.
    nothing_for(&mut applied, 4).await;
    let status = loader.status();
    assert_eq!((status.version.as_str(), status.reloads), ("v1", 0));
    let error = status.last_error.expect("last_error");
    assert!(error.contains("cannot build version bad"), "{error}");

    write(&conf, &config("v2"));
    assert_eq!(next(&mut applied).await.gateway.version, "v2");
    shutdown.cancel();
}

#[tokio::test]
async fn priority_directory_changes_trigger_reloads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    let priority = dir.path().join("priority.d");
    fs::create_dir(&priority).expect("mkdir");
    write(&conf, &config("v1"));
    // No load() first: the watcher applies whatever it finds on its first tick.
    let loader = FileLoader::new(&conf, Some(priority.clone()));
    let (mut applied, shutdown, _handle) = watch(&loader, &[]);
    let initial = next(&mut applied).await;
    assert_eq!(initial.gateway.endpoints.len(), 2);

    let extra = priority.join("extra.yaml");
    write(
        &extra,
        "endpoints:\n  - path: /new\n    backends: [{target: 'n:1'}]\n",
    );
    let added = next(&mut applied).await;
    assert_eq!(paths(&added.gateway)[0], triple("", "/new", "n:1"));

    write(
        &extra,
        "endpoints:\n  - path: /a\n    backends: [{target: 'r:1'}]\n",
    );
    let replaced = next(&mut applied).await;
    assert_eq!(
        paths(&replaced.gateway),
        [
            triple("", "/a", "r:1"),
            triple("GET", "/b", "127.0.0.1:8001")
        ]
    );

    fs::remove_file(&extra).expect("rm");
    let removed = next(&mut applied).await;
    assert_eq!(removed.sha256, initial.sha256);
    assert_eq!(paths(&removed.gateway), paths(&initial.gateway));
    assert_eq!(loader.status().reloads, 4);
    shutdown.cancel();
}
