//! The one error type of this crate.
//!
//! Every message is a single line a user can act on: either `line N: what is wrong`, `missing
//! 'key'`, or one of those prefixed with the file it came from. Values quoted in messages go
//! through a quoting helper so that a control character in the input cannot break the line.

use std::path::PathBuf;

/// Why a configuration could not be parsed or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A problem found on one line of the input (1-based).
    #[error("line {line}: {message}")]
    Line {
        /// The 1-based line of the offending token or value.
        line: usize,
        /// What is wrong, without the line prefix.
        message: String,
    },
    /// A required key is absent. It has no line: there is nothing to point at.
    #[error("missing '{key}'")]
    Missing {
        /// The key that must be given.
        key: &'static str,
    },
    /// A problem that the input did not tie to a line.
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
    },
    /// The configuration file could not be read.
    // The io::Error is part of the message rather than a `source`, so that chained printing
    // (`{:#}` in anyhow) does not repeat it.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// An error in the named file.
    #[error("{}: {error}", path.display())]
    InFile {
        /// The file the error was found in.
        path: PathBuf,
        /// The error itself.
        error: Box<ConfigError>,
    },
}

impl ConfigError {
    /// An error on a given line.
    pub(crate) fn at(line: usize, message: impl Into<String>) -> Self {
        ConfigError::Line {
            line,
            message: message.into(),
        }
    }

    /// The 1-based line the error points at, if it points at one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Line { line, .. } => Some(*line),
            ConfigError::InFile { error, .. } => error.line(),
            _ => None,
        }
    }

    /// Wraps the error so that its message starts with `path`.
    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> Self {
        ConfigError::InFile {
            path: path.into(),
            error: Box::new(self),
        }
    }
}

/// Quotes a user-supplied value for a message: `'value'`, with control characters escaped so
/// the message stays on one line.
pub(crate) fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_error_display() {
        let e = ConfigError::at(4, "expected '=' after 'memory'");
        assert_eq!(e.to_string(), "line 4: expected '=' after 'memory'");
        assert_eq!(e.line(), Some(4));
    }

    #[test]
    fn in_file_prefixes_path() {
        let e = ConfigError::at(2, "bad").in_file("/etc/tern/x.cfg");
        assert_eq!(e.to_string(), "/etc/tern/x.cfg: line 2: bad");
        assert_eq!(e.line(), Some(2));
    }

    #[test]
    fn quote_escapes_control_characters() {
        assert_eq!(quote("a\nb\t'"), "'a\\nb\\t''");
    }
}
