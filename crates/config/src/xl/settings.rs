//! The assignments of a file, looked up by key and read as the types tern expects.

use std::collections::HashMap;
use std::ops::RangeInclusive;

use super::syntax::{Assignment, Scalar, Value};
use crate::error::{quote, ConfigError};

/// Warnings gathered while reading a file, each tied to a line.
#[derive(Debug, Default)]
pub(super) struct Warnings(Vec<(usize, String)>);

impl Warnings {
    pub(super) fn push(&mut self, line: usize, message: impl Into<String>) {
        self.0.push((line, message.into()));
    }

    /// `line N: ...` messages in line order (stable, so one line's warnings keep their order).
    pub(super) fn into_messages(mut self) -> Vec<String> {
        self.0.sort_by_key(|(line, _)| *line);
        self.0
            .into_iter()
            .map(|(line, message)| format!("line {line}: {message}"))
            .collect()
    }
}

/// The last assignment of each key.
pub(super) struct Settings {
    /// Every assignment, in file order.
    assignments: Vec<Assignment>,
    /// Index in `assignments` of the last assignment of each key.
    last: HashMap<String, usize>,
}

impl Settings {
    /// Keeps the last assignment of each key, warning about the ones it overrides.
    pub(super) fn new(assignments: Vec<Assignment>, warnings: &mut Warnings) -> Self {
        let mut last: HashMap<String, usize> = HashMap::new();
        for (index, assignment) in assignments.iter().enumerate() {
            if let Some(earlier) = last.insert(assignment.key.clone(), index) {
                warnings.push(
                    assignment.line,
                    format!(
                        "'{}' is set again; the value on line {} is ignored",
                        assignment.key, assignments[earlier].line
                    ),
                );
            }
        }
        Settings { assignments, last }
    }

    /// The assignments that count, in file order.
    fn effective(&self) -> impl Iterator<Item = &Assignment> {
        self.assignments
            .iter()
            .enumerate()
            .filter(|(index, a)| self.last.get(&a.key) == Some(index))
            .map(|(_, a)| a)
    }

    fn get(&self, key: &str) -> Option<&Assignment> {
        self.last
            .get(key)
            .and_then(|&index| self.assignments.get(index))
    }

    /// Warns about every key not in `supported`, at the line where it is (last) set.
    pub(super) fn warn_unsupported(&self, supported: &[&str], warnings: &mut Warnings) {
        for assignment in self.effective() {
            if !supported.contains(&assignment.key.as_str()) {
                warnings.push(
                    assignment.line,
                    format!(
                        "'{}' is not supported by tern and is ignored",
                        assignment.key
                    ),
                );
            }
        }
    }

    /// A single value. Numbers are taken as written, as xl does (`name = 1234` is a name).
    pub(super) fn scalar(&self, key: &str) -> Result<Option<&Scalar>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Assignment {
                value: Value::Scalar(s),
                ..
            }) => Ok(Some(s)),
            Some(Assignment { line, .. }) => Err(ConfigError::at(
                *line,
                format!("'{key}' must be a single value, not a list"),
            )),
        }
    }

    /// A list; a single value is taken as a one-item list.
    pub(super) fn list(&self, key: &str) -> Vec<Scalar> {
        match self.get(key).map(|a| &a.value) {
            None => Vec::new(),
            Some(Value::Scalar(s)) => vec![s.clone()],
            Some(Value::List(items)) => items.clone(),
        }
    }

    /// A number within `range`, given bare or as a string (`memory = "64"`). `unit` is
    /// appended to the range in the error message.
    pub(super) fn number(
        &self,
        key: &str,
        range: RangeInclusive<u64>,
        unit: &str,
    ) -> Result<Option<u64>, ConfigError> {
        let Some(scalar) = self.scalar(key)? else {
            return Ok(None);
        };
        let text = scalar.text.trim();
        let out_of_range = || {
            ConfigError::at(
                scalar.line,
                format!(
                    "{key} must be between {} and {}{unit}, got {text}",
                    range.start(),
                    range.end()
                ),
            )
        };
        match parse_u64(text) {
            Number::Value(n) if range.contains(&n) => Ok(Some(n)),
            Number::Value(_) | Number::TooLarge => Err(out_of_range()),
            Number::Invalid => Err(ConfigError::at(
                scalar.line,
                format!("{key} must be a number, got {}", quote(&scalar.text)),
            )),
        }
    }
}

/// What a piece of text is, read as an unsigned number.
enum Number {
    Value(u64),
    TooLarge,
    Invalid,
}

/// Decimal or `0x` hex, as the lexer accepts bare numbers.
fn parse_u64(text: &str) -> Number {
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => (hex, 16),
        Some(_) => return Number::Invalid,
        None if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => (text, 10),
        None => return Number::Invalid,
    };
    // Only overflow can fail now that the digits are checked.
    match u64::from_str_radix(digits, radix) {
        Ok(n) => Number::Value(n),
        Err(_) => Number::TooLarge,
    }
}

#[cfg(test)]
mod tests {
    use super::super::syntax::parse;
    use super::*;

    fn settings(text: &str) -> (Settings, Vec<String>) {
        let mut warnings = Warnings::default();
        let s = Settings::new(parse(text).unwrap(), &mut warnings);
        (s, warnings.into_messages())
    }

    #[test]
    fn last_assignment_wins_with_a_warning() {
        let (s, warnings) = settings("memory = 64\nname='a'\nmemory = 128\n");
        assert_eq!(s.number("memory", 16..=1024, " MiB").unwrap(), Some(128));
        assert_eq!(
            warnings,
            vec!["line 3: 'memory' is set again; the value on line 1 is ignored"]
        );
    }

    #[test]
    fn numbers_bare_hex_and_quoted() {
        let (s, _) = settings("a = 0x40\nb = ' 64 '\nc = 'x'\nd = 99999999999999999999999\ne=[1]");
        assert_eq!(s.number("a", 0..=100, "").unwrap(), Some(64));
        assert_eq!(s.number("b", 0..=100, "").unwrap(), Some(64));
        assert_eq!(s.number("z", 0..=100, "").unwrap(), None);
        assert_eq!(
            s.number("c", 0..=100, "").unwrap_err().to_string(),
            "line 3: c must be a number, got 'x'"
        );
        assert_eq!(
            s.number("d", 16..=1048576, " MiB").unwrap_err().to_string(),
            "line 4: d must be between 16 and 1048576 MiB, got 99999999999999999999999"
        );
        assert_eq!(
            s.number("e", 0..=100, "").unwrap_err().to_string(),
            "line 5: 'e' must be a single value, not a list"
        );
    }
}
