//! Parser for xl.cfg statements: `key = value`, ended by a newline or `;`.
//!
//! This only checks the shape of the file; what the keys mean is left to the caller.

use super::lexer::{Lexer, Token, TokenKind};
use crate::error::ConfigError;

/// A string or number, as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Scalar {
    /// The line the value is on (lists may span lines).
    pub line: usize,
    /// The string's contents, or the number as written.
    pub text: String,
}

/// The right-hand side of an assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Value {
    Scalar(Scalar),
    List(Vec<Scalar>),
}

/// One `key = value` statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Assignment {
    pub key: String,
    /// The line of the key.
    pub line: usize,
    pub value: Value,
}

/// Parses the statements of `text`, in file order.
pub(super) fn parse(text: &str) -> Result<Vec<Assignment>, ConfigError> {
    Parser {
        lexer: Lexer::new(text),
    }
    .statements()
}

struct Parser<'a> {
    lexer: Lexer<'a>,
}

impl Parser<'_> {
    fn next(&mut self) -> Result<Token, ConfigError> {
        self.lexer.next_token()
    }

    /// The next token that is not a newline (lists ignore line breaks, as in Python).
    fn next_skipping_newlines(&mut self) -> Result<Token, ConfigError> {
        loop {
            let token = self.next()?;
            if token.kind != TokenKind::Newline {
                return Ok(token);
            }
        }
    }

    fn statements(&mut self) -> Result<Vec<Assignment>, ConfigError> {
        let mut out = Vec::new();
        loop {
            let token = self.next_skipping_newlines()?;
            match token.kind {
                TokenKind::Eof => return Ok(out),
                TokenKind::Ident(key) => out.push(self.assignment(key, token.line)?),
                other => {
                    return Err(ConfigError::at(
                        token.line,
                        format!("expected a key, found {}", other.describe()),
                    ))
                }
            }
        }
    }

    /// The rest of a statement whose key has been read.
    fn assignment(&mut self, key: String, line: usize) -> Result<Assignment, ConfigError> {
        let eq = self.next()?;
        if eq.kind != TokenKind::Eq {
            return Err(ConfigError::at(
                eq.line,
                format!("expected '=' after '{key}'"),
            ));
        }
        let value = self.value(&key)?;
        self.end_of_statement(&key)?;
        Ok(Assignment { key, line, value })
    }

    fn value(&mut self, key: &str) -> Result<Value, ConfigError> {
        let token = self.next()?;
        match token.kind {
            TokenKind::Str(text) | TokenKind::Num(text) => Ok(Value::Scalar(Scalar {
                line: token.line,
                text,
            })),
            TokenKind::LBracket => self.list(token.line).map(Value::List),
            other => Err(ConfigError::at(
                token.line,
                format!(
                    "expected a string, number or list after '{key} =', found {}",
                    other.describe()
                ),
            )),
        }
    }

    /// The items of a list whose `[` is on `start`, up to and including its `]`.
    fn list(&mut self, start: usize) -> Result<Vec<Scalar>, ConfigError> {
        let mut items = Vec::new();
        loop {
            // An item, or the end (allowed right after `[` or after a trailing comma).
            let token = self.next_skipping_newlines()?;
            match token.kind {
                TokenKind::RBracket => return Ok(items),
                TokenKind::Str(text) | TokenKind::Num(text) => items.push(Scalar {
                    line: token.line,
                    text,
                }),
                TokenKind::Eof => return Err(unterminated_list(start)),
                other => {
                    return Err(ConfigError::at(
                        token.line,
                        format!(
                        "expected a string or number in the list started on line {start}, found {}",
                        other.describe()
                    ),
                    ))
                }
            }
            // A separator, or the end.
            let token = self.next_skipping_newlines()?;
            match token.kind {
                TokenKind::Comma => {}
                TokenKind::RBracket => return Ok(items),
                TokenKind::Eof => return Err(unterminated_list(start)),
                other => {
                    return Err(ConfigError::at(
                        token.line,
                        format!(
                            "expected ',' or ']' in the list started on line {start}, found {}",
                            other.describe()
                        ),
                    ))
                }
            }
        }
    }

    fn end_of_statement(&mut self, key: &str) -> Result<(), ConfigError> {
        let token = self.next()?;
        match token.kind {
            TokenKind::Newline | TokenKind::Semi | TokenKind::Eof => Ok(()),
            other => Err(ConfigError::at(
                token.line,
                format!(
                    "expected end of line after the value of '{key}', found {}",
                    other.describe()
                ),
            )),
        }
    }
}

fn unterminated_list(start: usize) -> ConfigError {
    ConfigError::at(start, "unterminated list (missing ']')")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(line: usize, text: &str) -> Scalar {
        Scalar {
            line,
            text: text.to_string(),
        }
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn statements_and_lists() {
        let parsed = parse("a = 1; b='x'\n\n c = [\n 'p', # one\n 2,\n]\nd=[]").unwrap();
        assert_eq!(
            parsed,
            vec![
                Assignment {
                    key: "a".into(),
                    line: 1,
                    value: Value::Scalar(scalar(1, "1"))
                },
                Assignment {
                    key: "b".into(),
                    line: 1,
                    value: Value::Scalar(scalar(1, "x"))
                },
                Assignment {
                    key: "c".into(),
                    line: 3,
                    value: Value::List(vec![scalar(4, "p"), scalar(5, "2")])
                },
                Assignment {
                    key: "d".into(),
                    line: 7,
                    value: Value::List(vec![])
                },
            ]
        );
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(
            err("name = 'x'\n\n\nmemory 64"),
            "line 4: expected '=' after 'memory'"
        );
        assert_eq!(
            err("memory =\n64"),
            "line 1: expected a string, number or list after 'memory =', found end of line"
        );
        assert_eq!(
            err("memory = 64 65"),
            "line 1: expected end of line after the value of 'memory', found '65'"
        );
        assert_eq!(err("= 3"), "line 1: expected a key, found '='");
        assert_eq!(err("a = 1;;"), "line 1: expected a key, found ';'");
        assert_eq!(
            err("disk = [ 'a',\n 'b'\n"),
            "line 1: unterminated list (missing ']')"
        );
        assert_eq!(
            err("disk = [ 'a'\nname = 'x'\n"),
            "line 2: expected ',' or ']' in the list started on line 1, found 'name'"
        );
        assert_eq!(
            err("disk = [ , ]"),
            "line 1: expected a string or number in the list started on line 1, found ','"
        );
        assert_eq!(
            err("disk = [ [ 'a' ] ]"),
            "line 1: expected a string or number in the list started on line 1, found '['"
        );
        assert_eq!(
            err("a = b"),
            "line 1: expected a string, number or list after 'a =', found 'b'"
        );
    }
}
