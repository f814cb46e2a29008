//! Tokenizer for xl.cfg text.
//!
//! Tokens are produced on demand so that the first error reported is the first one in the
//! file, whether it is a bad character or a misplaced token.

use std::iter::Peekable;
use std::str::Chars;

use crate::error::{quote, ConfigError};

/// What a token is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum TokenKind {
    /// A key such as `memory`.
    Ident(String),
    /// A quoted string, escapes already resolved.
    Str(String),
    /// An unquoted number as written (`64`, `0x40`); validated but not yet converted, so that
    /// an overlong number only matters if a key that tern uses is given one.
    Num(String),
    Eq,
    LBracket,
    RBracket,
    Comma,
    Semi,
    Newline,
    Eof,
}

impl TokenKind {
    /// How the token is named in an error message.
    pub(super) fn describe(&self) -> String {
        match self {
            TokenKind::Ident(s) | TokenKind::Num(s) => quote(s),
            TokenKind::Str(_) => "a string".to_string(),
            TokenKind::Eq => "'='".to_string(),
            TokenKind::LBracket => "'['".to_string(),
            TokenKind::RBracket => "']'".to_string(),
            TokenKind::Comma => "','".to_string(),
            TokenKind::Semi => "';'".to_string(),
            TokenKind::Newline => "end of line".to_string(),
            TokenKind::Eof => "end of file".to_string(),
        }
    }
}

/// A token and the 1-based line it starts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Token {
    pub kind: TokenKind,
    pub line: usize,
}

/// Splits xl.cfg text into tokens.
pub(super) struct Lexer<'a> {
    chars: Peekable<Chars<'a>>,
    line: usize,
}

impl<'a> Lexer<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Lexer {
            chars: text.chars().peekable(),
            line: 1,
        }
    }

    /// The next token; [`TokenKind::Eof`] again and again once the text is used up.
    pub(super) fn next_token(&mut self) -> Result<Token, ConfigError> {
        self.skip_blanks_and_comments();
        let line = self.line;
        let Some(c) = self.chars.next() else {
            return Ok(Token {
                kind: TokenKind::Eof,
                line,
            });
        };
        let kind = match c {
            '\n' => {
                self.line += 1;
                TokenKind::Newline
            }
            '=' => TokenKind::Eq,
            '[' => TokenKind::LBracket,
            ']' => TokenKind::RBracket,
            ',' => TokenKind::Comma,
            ';' => TokenKind::Semi,
            '\'' | '"' => TokenKind::Str(self.string(c, line)?),
            c if c.is_ascii_digit() => TokenKind::Num(self.number(c, line)?),
            c if c.is_ascii_alphabetic() || c == '_' => TokenKind::Ident(self.ident(c)),
            other => {
                return Err(ConfigError::at(
                    line,
                    format!("unexpected character {}", quote(&other.to_string())),
                ))
            }
        };
        Ok(Token { kind, line })
    }

    /// Skips spaces, tabs, carriage returns (CRLF files) and `#` comments, but not newlines,
    /// which end statements.
    fn skip_blanks_and_comments(&mut self) {
        while let Some(&c) = self.chars.peek() {
            match c {
                ' ' | '\t' | '\r' | '\x0c' => {
                    self.chars.next();
                }
                '#' => while self.chars.next_if(|&c| c != '\n').is_some() {},
                _ => break,
            }
        }
    }

    /// The rest of a string opened by `quote_char` on `line`.
    fn string(&mut self, quote_char: char, line: usize) -> Result<String, ConfigError> {
        let mut out = String::new();
        loop {
            match self.chars.next() {
                None | Some('\n') => return Err(ConfigError::at(line, "unterminated string")),
                Some(c) if c == quote_char => return Ok(out),
                Some('\\') => out.push(self.escape(line)?),
                Some(c) => out.push(c),
            }
        }
    }

    /// The character a backslash escape stands for.
    fn escape(&mut self, line: usize) -> Result<char, ConfigError> {
        match self.chars.next() {
            Some('\\') => Ok('\\'),
            Some('\'') => Ok('\''),
            Some('"') => Ok('"'),
            Some('n') => Ok('\n'),
            Some('t') => Ok('\t'),
            Some('r') => Ok('\r'),
            None | Some('\n') => Err(ConfigError::at(line, "unterminated string")),
            Some(other) => Err(ConfigError::at(
                line,
                format!("invalid escape {} in string", quote(&format!("\\{other}"))),
            )),
        }
    }

    /// A number starting with `first`: decimal digits, or `0x` and hex digits.
    fn number(&mut self, first: char, line: usize) -> Result<String, ConfigError> {
        // Take letters and dots too, so `12abc` or `1.5` is reported whole.
        let text = self.take_word(first);
        let valid = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            Some(hex) => !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            None => text.bytes().all(|b| b.is_ascii_digit()),
        };
        if valid {
            Ok(text)
        } else {
            Err(ConfigError::at(
                line,
                format!("invalid number {}", quote(&text)),
            ))
        }
    }

    /// A key starting with `first`.
    fn ident(&mut self, first: char) -> String {
        self.take_word(first)
    }

    /// `first` and the letters, digits, `_` and `.` after it.
    fn take_word(&mut self, first: char) -> String {
        let mut word = String::from(first);
        while let Some(c) = self
            .chars
            .next_if(|&c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            word.push(c);
        }
        word
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Result<Vec<TokenKind>, ConfigError> {
        let mut lexer = Lexer::new(text);
        let mut out = Vec::new();
        loop {
            let token = lexer.next_token()?;
            if token.kind == TokenKind::Eof {
                return Ok(out);
            }
            out.push(token.kind);
        }
    }

    #[test]
    fn tokens_of_a_statement() {
        use TokenKind::*;
        assert_eq!(
            kinds("memory = 0x40 # comment\nx=['a',\"b\"];").unwrap(),
            vec![
                Ident("memory".into()),
                Eq,
                Num("0x40".into()),
                Newline,
                Ident("x".into()),
                Eq,
                LBracket,
                Str("a".into()),
                Comma,
                Str("b".into()),
                RBracket,
                Semi,
            ]
        );
    }

    #[test]
    fn escapes() {
        assert_eq!(
            kinds(r#"'a\\b\'c\"d\ne\tf' "it's""#).unwrap(),
            vec![
                TokenKind::Str("a\\b'c\"d\ne\tf".into()),
                TokenKind::Str("it's".into())
            ]
        );
    }

    #[test]
    fn errors_carry_the_line() {
        let err = |t: &str| kinds(t).unwrap_err().to_string();
        assert_eq!(err("a = 1\nb = 'x\n"), "line 2: unterminated string");
        assert_eq!(err("a = 1\n\nb = \"x"), "line 3: unterminated string");
        assert_eq!(err("a = '\\q'"), "line 1: invalid escape '\\q' in string");
        assert_eq!(err("a = 12abc"), "line 1: invalid number '12abc'");
        assert_eq!(err("a = 0x"), "line 1: invalid number '0x'");
        assert_eq!(err("\n\na @ 1"), "line 3: unexpected character '@'");
    }

    #[test]
    fn crlf_is_a_newline() {
        assert_eq!(
            kinds("a=1\r\n").unwrap(),
            vec![
                TokenKind::Ident("a".into()),
                TokenKind::Eq,
                TokenKind::Num("1".into()),
                TokenKind::Newline
            ]
        );
    }
}
