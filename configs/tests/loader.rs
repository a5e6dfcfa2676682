//! FileLoader: priority merge, hashing, and the polling watch.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Writes `text` atomically (a hidden temp file in the same directory, then a rename), so the
/// poller never sees the file half written unless a test means it to.
fn write(path: &Path, text: &str) {
    let name = path
        .file_name()
        .unwrap_or_else(|| panic!("{} has no file name", path.display()));
    let temp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    fs::write(&temp, text).unwrap_or_else(|e| panic!("{}: {e}", temp.display()));
    fs::rename(&temp, path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Truncates `path` and writes `text[..cut]`, like the first `write` of an editor or of a
/// shell `>`; the caller writes the rest with [`write_rest`].
fn write_first_part(path: &Path, text: &str, cut: usize) -> fs::File {
    let mut file = fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.write_all(&text.as_bytes()[..cut])
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.flush().expect("flush");
    file
}

/// Writes the rest of `text` after [`write_first_part`].
fn write_rest(mut file: fs::File, text: &str, cut: usize) {
    file.write_all(&text.as_bytes()[cut..]).expect("write");
    file.flush().expect("flush");
}

/// Where `config(version)` can be cut so the first part is itself a valid config (only `/a`).
fn valid_cut(text: &str) -> usize {
    text.find("  - path: /b").expect("a second endpoint")
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
    watch_every(loader, INTERVAL, reject)
}

/// [`watch`] polling every `interval`.
fn watch_every(
    loader: &FileLoader,
    interval: Duration,
    reject: &'static [&'static str],
) -> (
    mpsc::UnboundedReceiver<Loaded>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let handle = loader.watch(interval, shutdown.clone(), move |loaded: Loaded| {
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

/// Waits (up to `DEADLINE`) until `done` holds for the loader's status.
async fn until(loader: &FileLoader, what: &str, done: impl Fn(&configs::LoaderStatus) -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if done(&loader.status()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not seen in time; status {:?}",
            loader.status()
        );
        tokio::time::sleep(INTERVAL / 5).await;
    }
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

/// As in Kratos, a priority file that fails on its own is skipped with a warning and the
/// others are merged; the error (with its position) is in the status.
#[test]
fn broken_priority_file_is_skipped_with_its_position() {
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
    write(
        &priority.join("good.yaml"),
        "endpoints:\n  - path: /good\n    backends:\n      - target: 127.0.0.1:9\n",
    );
    write(
        &priority.join("unparsable.yaml"),
        "endpoints: [ {path: /y\n",
    );
    let loader = FileLoader::new(&conf, Some(priority.clone()));
    let loaded = loader.load().expect("the good files load");
    let paths: Vec<&str> = loaded
        .gateway
        .endpoints
        .iter()
        .map(|endpoint| endpoint.path.as_str())
        .collect();
    assert!(paths.contains(&"/good"), "{paths:?}");
    assert!(
        !paths.contains(&"/x") && !paths.contains(&"/y"),
        "{paths:?}"
    );
    assert_eq!(loaded.skipped.len(), 2, "{:?}", loaded.skipped);
    assert!(
        loaded.skipped[0].starts_with(&format!("{}:4:17: ", broken.display())),
        "{:?}",
        loaded.skipped
    );
    assert!(
        loaded.skipped[1].starts_with(&priority.join("unparsable.yaml").display().to_string()),
        "{:?}",
        loaded.skipped
    );
    let status = loader.status();
    assert_eq!(status.skipped_priority_files, loaded.skipped);
    assert_eq!(status.last_error, None);

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

#[test]
fn empty_main_file_is_refused_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    for text in ["", "\n", "  \n\t\n", "# all routes go here\n---\n"] {
        write(&conf, text);
        let loader = FileLoader::new(&conf, None);
        let error = loader.load().expect_err("an empty file is refused");
        assert!(
            matches!(error, configs::ConfigError::Empty { .. }),
            "{text:?}: {error:?}"
        );
        assert_eq!(error.file(), Some(conf.as_path()));
        let shown = error.to_string();
        assert_eq!(
            shown,
            format!(
                "config file is empty (caught mid-write?): {}",
                conf.display()
            )
        );
        assert_eq!(loader.status().last_error, Some(shown));
        assert_eq!(loader.status().sha256, "");
    }
    // No routes on purpose is still possible.
    write(&conf, "endpoints: []\n");
    let loaded = FileLoader::new(&conf, None)
        .load()
        .expect("explicitly empty");
    assert!(loaded.gateway.endpoints.is_empty());
}

#[test]
fn empty_priority_file_is_no_override() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    let priority = dir.path().join("priority.d");
    fs::create_dir(&priority).expect("mkdir");
    write(&conf, &config("v1"));
    write(&priority.join("empty.yaml"), "");
    let loaded = FileLoader::new(&conf, Some(priority))
        .load()
        .expect("an empty priority file overrides nothing");
    assert_eq!(loaded.gateway.endpoints.len(), 2);
}

#[tokio::test]
async fn empty_file_during_watch_keeps_the_running_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    write(&conf, &config("v1"));
    let loader = FileLoader::new(&conf, None);
    let first = loader.load().expect("load");
    let (mut applied, shutdown, _handle) = watch(&loader, &[]);

    // Like `: > gateway.yaml`: truncated, and nothing written after.
    fs::File::create(&conf).expect("truncate");
    until(&loader, "empty file reported", |status| {
        status.last_error.is_some()
    })
    .await;
    nothing_for(&mut applied, 3).await;
    let status = loader.status();
    assert_eq!(
        status.last_error,
        Some(format!(
            "config file is empty (caught mid-write?): {}",
            conf.display()
        ))
    );
    assert_eq!(
        (status.sha256, status.version.as_str(), status.reloads),
        (first.sha256, "v1", 0)
    );

    write(&conf, &config("v2"));
    assert_eq!(next(&mut applied).await.gateway.version, "v2");
    let status = loader.status();
    assert_eq!((status.reloads, status.last_error), (1, None));
    shutdown.cancel();
}

#[tokio::test]
async fn file_caught_mid_write_is_never_applied() {
    // Poll often, settle long: every poll between the two writes sees the first part, and
    // the pause between the writes is far shorter than the settle delay.
    const POLL: Duration = Duration::from_millis(5);
    const SETTLE: Duration = Duration::from_millis(100);
    const PAUSE: Duration = Duration::from_millis(15);
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    write(&conf, &config("v1"));
    let loader = FileLoader::new(&conf, None).with_settle_delay(SETTLE);
    loader.load().expect("load");
    let (mut applied, shutdown, _handle) = watch_every(&loader, POLL, &[]);

    let mut versions = vec!["v1".to_owned()];
    for round in 2..=6 {
        let version = format!("v{round}");
        let text = config(&version);
        // The first part alone is a valid config with one route: applying it would drop /b.
        let cut = valid_cut(&text);
        let file = write_first_part(&conf, &text, cut);
        tokio::time::sleep(PAUSE).await;
        write_rest(file, &text, cut);
        until(&loader, &format!("{version} applied"), |status| {
            status.version == version
        })
        .await;
        versions.push(version);
    }
    shutdown.cancel();

    let mut seen = 0;
    while let Ok(loaded) = applied.try_recv() {
        seen += 1;
        let version = &loaded.gateway.version;
        assert!(versions.contains(version), "unknown version {version:?}");
        assert_eq!(
            paths(&loaded.gateway),
            paths(&configs::parse(&config(version), &conf).expect("full config")),
            "{version} was applied half written"
        );
    }
    assert_eq!(seen, 5, "each full version applied once");
    assert_eq!(loader.status().last_error, None);
}

#[tokio::test]
async fn priority_file_caught_mid_write_is_never_applied() {
    const POLL: Duration = Duration::from_millis(5);
    const SETTLE: Duration = Duration::from_millis(100);
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    let priority = dir.path().join("priority.d");
    fs::create_dir(&priority).expect("mkdir");
    write(&conf, &config("v1"));
    let loader = FileLoader::new(&conf, Some(priority.clone())).with_settle_delay(SETTLE);
    let initial = loader.load().expect("load");
    let (mut applied, shutdown, _handle) = watch_every(&loader, POLL, &[]);

    let text = "endpoints:\n  - path: /x\n    backends: [{target: 'x:1'}]\n  - path: /y\n    backends: [{target: 'y:1'}]\n";
    let cut = text.find("  - path: /y").expect("second endpoint");
    let extra = priority.join("extra.yaml");
    let file = write_first_part(&extra, text, cut);
    tokio::time::sleep(Duration::from_millis(15)).await;
    write_rest(file, text, cut);
    let loaded = next(&mut applied).await;
    assert_eq!(
        paths(&loaded.gateway),
        [
            triple("", "/y", "y:1"),
            triple("", "/x", "x:1"),
            triple("", "/a", "127.0.0.1:8000"),
            triple("GET", "/b", "127.0.0.1:8001"),
        ]
    );
    assert_ne!(loaded.sha256, initial.sha256);
    nothing_for(&mut applied, 10).await;
    shutdown.cancel();
}

#[test]
fn load_waits_for_a_file_being_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    let text = config("v1");
    let cut = valid_cut(&text);
    let file = write_first_part(&conf, &text, cut);
    let (started, ready) = std::sync::mpsc::channel();
    let writer = {
        let text = text.clone();
        std::thread::spawn(move || {
            let _ = ready.recv();
            std::thread::sleep(Duration::from_millis(30));
            write_rest(file, &text, cut);
        })
    };
    let loader = FileLoader::new(&conf, None).with_settle_delay(Duration::from_millis(150));
    started.send(()).expect("writer waits");
    let loaded = loader.load().expect("load");
    writer.join().expect("writer");
    assert_eq!(loaded.gateway.endpoints.len(), 2, "loaded half written");
    assert_eq!(loaded.sha256, hex::encode(Sha256::digest(text.as_bytes())));
}

#[test]
fn load_gives_up_on_files_that_keep_changing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    write(&conf, &config("v0"));
    let stop = Arc::new(AtomicBool::new(false));
    let (started, running) = std::sync::mpsc::channel();
    let writer = {
        let (conf, stop) = (conf.clone(), stop.clone());
        std::thread::spawn(move || {
            // Bounded in time even if the test fails before it stops the writer (the loader
            // gives up after 20 settle delays, 5 s).
            let end = std::time::Instant::now() + Duration::from_secs(12);
            let mut version = 0u64;
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                version += 1;
                write(&conf, &config(&format!("v{version}")));
                if version == 1 {
                    let _ = started.send(());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    running.recv().expect("writer started");
    // The writer would have to stall for a whole settle delay to fool the loader: 250 ms,
    // so a busy machine (CI on 2 cores) does not stall it that long (100 ms did, once).
    let loader = FileLoader::new(&conf, None).with_settle_delay(Duration::from_millis(250));
    let result = loader.load();
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let error = result.expect_err("never settled");
    assert!(
        matches!(error, configs::ConfigError::Unsettled { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("kept changing"), "{error}");
    assert!(loader.status().last_error.is_some());
    // Once the writer is done, the file loads.
    loader.load().expect("settled");
}
