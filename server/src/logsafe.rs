//! Client-controlled text made safe to log.
//!
//! Paths, queries, header values, Origins, subprotocols and close reasons
//! all come from the peer. Logged raw, a `\n` forges a second log line and an
//! ANSI escape rewrites the operator's terminal; logged whole, a 64 KiB header
//! turns every refused request into 64 KiB of log. [`Escaped`] writes control
//! bytes, `\` and invalid UTF-8 as `\xNN` and stops after a byte cap,
//! marking the cut with `…(N bytes)`. It formats lazily: nothing is
//! allocated unless the event is actually written.

use std::fmt;

/// The default cap for one logged client value, in input bytes.
pub const DEFAULT_CAP: usize = 256;

/// A client-controlled value, escaped and capped when displayed.
#[derive(Clone, Copy)]
pub struct Escaped<'a> {
    bytes: &'a [u8],
    cap: usize,
}

/// `value` escaped and capped at [`DEFAULT_CAP`] bytes when displayed.
pub fn esc<T: AsRef<[u8]> + ?Sized>(value: &T) -> Escaped<'_> {
    Escaped {
        bytes: value.as_ref(),
        cap: DEFAULT_CAP,
    }
}

/// `value` escaped and capped at `cap` bytes when displayed.
pub fn esc_cap<T: AsRef<[u8]> + ?Sized>(value: &T, cap: usize) -> Escaped<'_> {
    Escaped {
        bytes: value.as_ref(),
        cap,
    }
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.bytes[..self.bytes.len().min(self.cap)];
        for chunk in shown.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c == '\\' {
                    f.write_str("\\\\")?;
                } else if c.is_control() {
                    // C0, DEL and C1 controls: \n, \r, ESC (ANSI), NEL...
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        write!(f, "\\x{b:02x}")?;
                    }
                } else {
                    fmt::Write::write_char(f, c)?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        if self.bytes.len() > shown.len() {
            write!(f, "…({} bytes)", self.bytes.len())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_ansi_are_escaped() {
        let forged = "bye\n2026-01-01T00:00:00Z  INFO forged\x1b[31m";
        let s = esc(forged).to_string();
        assert!(!s.contains('\n') && !s.contains('\x1b'), "{s}");
        assert_eq!(
            s,
            "bye\\x0a2026-01-01T00:00:00Z  INFO forged\\x1b[31m".to_string()
        );
    }

    #[test]
    fn invalid_utf8_and_backslash() {
        assert_eq!(esc(b"a\xffb\\").to_string(), "a\\xffb\\\\");
        // C1 control (U+0085, NEL) is written as its UTF-8 bytes.
        assert_eq!(esc("x\u{85}y").to_string(), "x\\xc2\\x85y");
        assert_eq!(esc("€ ok").to_string(), "€ ok");
    }

    #[test]
    fn long_values_are_capped_without_splitting_characters_unsafely() {
        let long = "€".repeat(1000);
        let s = esc_cap(&long, 10).to_string();
        // 10 bytes = three whole € (9 bytes) and one cut byte, shown escaped.
        assert!(s.starts_with("€€€\\xe2"), "{s}");
        assert!(s.ends_with("…(3000 bytes)"), "{s}");
        assert_eq!(esc("short").to_string(), "short");
    }
}
