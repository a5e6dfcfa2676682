//! The gateway's config: the YAML model (compatible with go-kratos/gateway files), its
//! validation, and the file loader that re-reads it when its content hash changes.
//!
//! ```text
//! parse(text, file)  -> Gateway          parse + validate one file, errors as file:line:col
//! FileLoader::load   -> Loaded           main file + priority directory, merged, validated
//! FileLoader::watch                      poll the hash, load and apply on change
//! RemoteLoader::{load, watch}            the same for an http(s):// URL (ETag, 304)
//! ConfigLoader::new(conf, priority_dir)  one or the other, by the scheme of `conf`
//! ```
//!
//! Field names are accepted in camelCase (Kratos/protojson) and snake_case; unknown fields
//! are errors; durations are Go strings (`1s`, `0.1s`, `250ms`); protojson's quoted 64-bit
//! integers (`weight: "10"`) load like plain ones. See `configs/examples/` for files to start
//! from.
//!
//! Choices where Kratos is silent or where we differ on purpose:
//! - Validation is strict (Kratos discards unknown fields and checks little): see
//!   [`validate`] for the rules; each error names `file:line:col` and the field path.
//! - An empty or comment-only text parses as an empty config, but the loader refuses such a
//!   main file: it is most likely one caught mid-write, and would drop every route. Write
//!   `endpoints: []` for a gateway with no routes. The loader also uses new content only
//!   once two reads a settle delay apart (50 ms) agree.
//! - Priority directory: `*.yaml` and `*.yml` files, sorted by name, hidden files skipped; a
//!   directory that does not exist holds no files. An endpoint replaces the one with the same
//!   method (case-insensitive), path *and host* in the list built so far, else it is put in
//!   front. A broken priority file fails the whole load (Kratos skips it silently).
//! - The hash is sha256 of the main file alone when there are no priority files.

mod duration;
mod error;
mod loader;
mod model;
mod parse;
mod remote;
mod source;
mod validate;

pub use duration::{DurationError, format_duration, parse_duration};
pub use error::{ConfigError, Position};
pub use loader::{FileLoader, Loaded, LoaderStatus, rfc3339};
pub use model::{
    Backend, Condition, Endpoint, Gateway, HeaderCondition, HealthCheck, Matcher, Middleware,
    Protocol, Retry, StatusRange, StatusRangeError, Tls,
};
pub use parse::{
    PriorityConfig, merge_priority, parse, parse_endpoint, parse_priority, validate_endpoint,
};
pub use remote::{DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_BODY, RemoteLoader, redact_url};
pub use source::ConfigLoader;
pub use validate::{SELECTORS, validate};
