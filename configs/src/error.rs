//! Errors of loading a config: I/O, YAML/shape problems and failed validation, each naming the
//! file and, when known, the line and column.

use std::fmt;
use std::path::{Path, PathBuf};

/// A 1-based line and column in a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Line, starting at 1.
    pub line: u32,
    /// Column (in characters), starting at 1.
    pub column: u32,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Why a config could not be loaded. `Display` reads `<file>:<line>:<col>: <message>`
/// whenever a position is known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file or the priority directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid YAML or does not fit the model: syntax error, unknown field,
    /// wrong type, bad duration, bad status range, unknown protocol.
    #[error("{}", Located { file: Some(file), position: *position, message })]
    Parse {
        /// The file being parsed.
        file: PathBuf,
        /// Where the problem is, when the parser knows.
        position: Option<Position>,
        /// What is wrong.
        message: String,
    },
    /// The main config file is empty or holds only comments: most likely it was caught
    /// between an editor's (or a shell `>`'s) truncate and its write, and applying it would
    /// drop every route. `endpoints: []` says "no routes" on purpose.
    #[error("config file is empty (caught mid-write?): {}", path.display())]
    Empty {
        /// The main config file.
        path: PathBuf,
    },
    /// The config files kept changing between reads, so no consistent content could be
    /// read (a writer still at work).
    #[error("config kept changing while being read (a writer still at work?): {}", path.display())]
    Unsettled {
        /// The main config file.
        path: PathBuf,
    },
    /// A remote config (`--conf http(s)://...`) could not be fetched: refused, timed out,
    /// a non-2xx answer, a body over the limit.
    #[error("{url}: {message}")]
    Fetch {
        /// The URL.
        url: String,
        /// What went wrong, on one line.
        message: String,
    },
    /// The config parsed but breaks a rule: bad target, duplicate route, missing backends...
    #[error("{}", Located { file: file.as_deref(), position: *position, message: &format!("{field}: {message}") })]
    Invalid {
        /// The file, when the config came from one.
        file: Option<PathBuf>,
        /// Where the offending value is, when the config came from a file.
        position: Option<Position>,
        /// Path of the offending field, e.g. `endpoints[1].backends[0].target`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The file the error is about, if any.
    pub fn file(&self) -> Option<&Path> {
        match self {
            ConfigError::Io { path, .. }
            | ConfigError::Empty { path }
            | ConfigError::Unsettled { path } => Some(path),
            ConfigError::Parse { file, .. } => Some(file),
            ConfigError::Invalid { file, .. } => file.as_deref(),
            ConfigError::Fetch { url, .. } => Some(Path::new(url)),
        }
    }

    /// Line and column of the error, if known.
    pub fn position(&self) -> Option<Position> {
        match self {
            ConfigError::Io { .. }
            | ConfigError::Empty { .. }
            | ConfigError::Unsettled { .. }
            | ConfigError::Fetch { .. } => None,
            ConfigError::Parse { position, .. } | ConfigError::Invalid { position, .. } => {
                *position
            }
        }
    }

    /// Line of the error (1-based), if known.
    pub fn line(&self) -> Option<u32> {
        self.position().map(|p| p.line)
    }

    /// Column of the error (1-based), if known.
    pub fn column(&self) -> Option<u32> {
        self.position().map(|p| p.column)
    }

    /// A validation error with no file or position yet.
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: None,
            position: None,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `file:line:col: message`, leaving out the parts that are unknown.
struct Located<'a> {
    file: Option<&'a Path>,
    position: Option<Position>,
    message: &'a str,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = self.file {
            write!(f, "{}:", file.display())?;
            if let Some(position) = self.position {
                write!(f, "{position}:")?;
            }
            f.write_str(" ")?;
        }
        f.write_str(self.message)
    }
}
