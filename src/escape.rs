//! What a guest says, made safe for an operator's terminal: a guest (or
//! whoever runs in it) may print escape sequences that retitle the window,
//! clear the screen, move the cursor over earlier lines or, on some
//! terminals, answer back into the shell. `logs` and `agent` print control
//! characters as visible escapes (`\e`, `\x07`, `\u{9b}`) unless `--raw`.

/// Escapes a stream of bytes cut anywhere: a UTF-8 sequence or a CR LF
/// split across two reads is escaped as if it had come in one.
#[derive(Debug, Default)]
pub struct Escaper {
    carry: Vec<u8>,
}

impl Escaper {
    /// Appends the escaped form of `bytes` to `out`, keeping an unfinished
    /// UTF-8 sequence or a final CR for the next call.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let mut input = std::mem::take(&mut self.carry);
        input.extend_from_slice(bytes);
        let mut rest = &input[..];
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    if let Some(before) = text.strip_suffix('\r') {
                        escape_text(before, out);
                        self.carry.push(b'\r');
                    } else {
                        escape_text(text, out);
                    }
                    return;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    // Valid by construction of `valid_up_to`.
                    escape_text(std::str::from_utf8(good).unwrap_or_default(), out);
                    match e.error_len() {
                        Some(n) => {
                            for b in &bad[..n] {
                                out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                            }
                            rest = &bad[n..];
                        }
                        // Cut short: the rest may come with the next read.
                        None => {
                            self.carry.extend_from_slice(bad);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Escapes what was kept back: the stream ended.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let carry = std::mem::take(&mut self.carry);
        for b in carry {
            if b == b'\r' {
                out.extend_from_slice(b"\\r");
            } else {
                out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
            }
        }
    }
}

/// `text` with every control character but tab and newline escaped; CR LF
/// (what a serial console ends its lines with) becomes LF.
pub fn escape_text(text: &str, out: &mut Vec<u8>) {
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\t' => out.push(c as u8),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\r' => out.extend_from_slice(b"\\r"),
            '\u{1b}' => out.extend_from_slice(b"\\e"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.extend_from_slice(format!("\\x{:02x}", c as u32).as_bytes());
            }
            // C1 controls: CSI (U+009B) alone starts a sequence on many
            // terminals. Other invisible formatting characters are left.
            c if (0x80..0xa0).contains(&(c as u32)) => {
                out.extend_from_slice(format!("\\u{{{:x}}}", c as u32).as_bytes());
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// [`escape_text`] into a new string.
pub fn escaped(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    escape_text(text, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> String {
        let mut e = Escaper::default();
        let mut out = Vec::new();
        for c in chunks {
            e.push(c, &mut out);
        }
        e.finish(&mut out);
        String::from_utf8(out).expect("escaped output is UTF-8")
    }

    #[test]
    fn terminal_sequences_are_shown_not_obeyed() {
        assert_eq!(
            all(&[b"\x1b]0;owned\x07\x1b[2J\x1b[H"]),
            "\\e]0;owned\\x07\\e[2J\\e[H"
        );
        assert_eq!(all(&["\u{9b}31m".as_bytes()]), "\\u{9b}31m");
        assert_eq!(all(&[b"a\x7fb\x00c"]), "a\\x7fb\\x00c");
        assert_eq!(all(&[b"over\rwrite"]), "over\\rwrite");
    }

    #[test]
    fn text_lines_and_tabs_are_left_as_they_are() {
        assert_eq!(
            all(&[b"Linux 6.1\r\n\tok \xc3\xa9t\xc3\xa9\n"]),
            "Linux 6.1\n\tok été\n"
        );
    }

    #[test]
    fn a_sequence_cut_between_reads_is_escaped_whole() {
        assert_eq!(all(&[b"caf\xc3", b"\xa9\r", b"\nx\r"]), "café\nx\\r");
        assert_eq!(all(&[b"\xc2", b"\x9b"]), "\\u{9b}");
        assert_eq!(all(&[b"\xff\xfeok"]), "\\xff\\xfeok");
        assert_eq!(all(&[b"end\xe2\x82"]), "end\\xe2\\x82");
    }
}
