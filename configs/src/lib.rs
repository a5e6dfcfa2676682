//! The gateway's config: the YAML model (compatible with go-kratos/gateway files), its
//! validation, and the file loader that re-reads it when its content hash changes.
//!
//! ```text
//! parse(text, file)  -> Gateway          parse + validate one file, errors as file:line:col
//! FileLoader::load   -> Loaded           main file + priority directory, merged, validated
//! FileLoader::watch                      poll the hash, load and apply on change
//! ```
//!
//! Field names are accepted in camelCase (Kratos/protojson) and snake_case; unknown fields
//! are errors; durations are Go strings (`1s`, `0.1s`, `250ms`); protojson's quoted 64-bit
//! integers (`weight: "10"`) load like plain ones. See `configs/examples/` for files to start
//! from.

mod duration;
mod error;
mod loader;
mod model;
mod parse;
mod validate;

pub use duration::{DurationError, format_duration, parse_duration};
pub use error::{ConfigError, Position};
pub use loader::{FileLoader, Loaded, LoaderStatus};
pub use model::{
    Backend, Condition, Endpoint, Gateway, HeaderCondition, HealthCheck, Middleware, Protocol,
    Retry, StatusRange, StatusRangeError, Tls,
};
pub use parse::{PriorityConfig, merge_priority, parse, parse_priority};
pub use validate::{SELECTORS, validate};
