//! Mutation fuzzing without extra dependencies: sample configs are mutated with a seeded
//! xorshift generator, and every result must parse or fail cleanly: no panic, one-line
//! errors, and a config that parses must survive `to_xl` unchanged. The seed is fixed, so a
//! failure reproduces.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::{DAEMON, FULL_GUEST, LVM_GUEST, NFS_GUEST};
use tern_config::{parse_daemon_config, parse_domain_config, ConfigError};

/// Bytes that matter to the parsers, so mutations reach past the first token more often than
/// random bytes would.
const INTERESTING: &[u8] = b"'\"[]=,;:#\\\n\r\t 0x9afz-._/@{}()^$*+?nrtw";

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        if self.below(4) == 0 {
            self.next() as u8
        } else {
            INTERESTING[self.below(INTERESTING.len())]
        }
    }
}

fn mutate(rng: &mut XorShift, input: &mut Vec<u8>) {
    let len = input.len();
    match rng.below(7) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = rng.byte();
        }
        2 => {
            let i = rng.below(len + 1);
            let b = rng.byte();
            input.insert(i, b);
        }
        3 if len > 0 => {
            let start = rng.below(len);
            let end = (start + 1 + rng.below(8)).min(len);
            input.drain(start..end);
        }
        4 if len > 0 => {
            let start = rng.below(len);
            let end = (start + 1 + rng.below(32)).min(len);
            let chunk = input[start..end].to_vec();
            let at = rng.below(len + 1);
            input.splice(at..at, chunk);
        }
        5 => input.truncate(rng.below(len + 1)),
        _ => {
            let at = rng.below(len + 1);
            let b = rng.byte();
            let n = 1 + rng.below(16);
            input.splice(at..at, std::iter::repeat_n(b, n));
        }
    }
}

/// One mutated input: 1 to 4 mutations of `sample`, or now and then plain random bytes.
fn generate(rng: &mut XorShift, sample: &str) -> String {
    let mut bytes = if rng.below(20) == 0 {
        (0..rng.below(200)).map(|_| rng.byte()).collect()
    } else {
        sample.as_bytes().to_vec()
    };
    for _ in 0..1 + rng.below(4) {
        mutate(rng, &mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check_error(input: &str, error: &ConfigError) {
    let message = error.to_string();
    assert!(
        !message.contains('\n'),
        "multi-line error {message:?} for {input:?}"
    );
    if let Some(line) = error.line() {
        assert!(
            line >= 1 && line <= input.lines().count() + 1,
            "line {line} out of range in {message:?} for {input:?}"
        );
    }
}

fn check_domain(input: &str) {
    let base = Path::new("/etc/tern");
    for base_dir in [None, Some(base)] {
        match parse_domain_config(input, base_dir) {
            Ok(parsed) => {
                for warning in &parsed.warnings {
                    assert!(!warning.contains('\n'), "{warning:?} for {input:?}");
                }
                let written = parsed.config.to_xl();
                let again = parse_domain_config(&written, None).unwrap_or_else(|e| {
                    panic!("to_xl output fails: {e}\n{written}\nfrom {input:?}")
                });
                assert_eq!(again.config, parsed.config, "{written}\nfrom {input:?}");
            }
            Err(e) => check_error(input, &e),
        }
    }
}

fn check_daemon(input: &str) {
    if let Err(e) = parse_daemon_config(input) {
        check_error(input, &e);
    }
}

/// Runs `check` on `iterations` mutations of each sample, naming the input on a panic.
fn fuzz(seed: u64, samples: &[&str], iterations: usize, check: fn(&str)) {
    let mut rng = XorShift(seed);
    for sample in samples {
        check(sample);
        for _ in 0..iterations {
            let input = generate(&mut rng, sample);
            if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
                panic!("check failed for input {input:?}");
            }
        }
    }
}

#[test]
fn fuzz_domain_config() {
    fuzz(
        0x9e37_79b9_7f4a_7c15,
        &[LVM_GUEST, NFS_GUEST, FULL_GUEST],
        5000,
        check_domain,
    );
}

#[test]
fn fuzz_daemon_config() {
    fuzz(0x2545_f491_4f6c_dd1d, &[DAEMON], 5000, check_daemon);
}
