//! Turning a container's output bytes into log chunks.
//!
//! Offsets count the bytes of the text the server receives, from 0 for each
//! attempt, so `offset + data.len()` of one chunk is the `offset` of the
//! next. Output that is valid UTF-8 keeps its byte offsets exactly; a
//! multi-byte character split across two reads is held back until its end
//! arrives, and only truly invalid bytes become U+FFFD.
//!
//! A chunk holds at most [`protocol::MAX_LOG_CHUNK_BYTES`] bytes and is cut
//! earlier if its JSON escaping would push the frame past
//! [`protocol::MAX_FRAME_BYTES`] (control characters take six bytes each).
//!
//! A chunker made [`LogChunker::masking`] the values of the attempt's
//! secrets writes [`MASK`] in place of each, also when a value arrives
//! split across reads: text that could be the start of a value is held
//! back until the rest shows whether it is one.

use protocol::{MAX_FRAME_BYTES, MAX_LOG_CHUNK_BYTES};

/// Room left in a frame for the chunk's other fields.
const FRAME_OVERHEAD: usize = 1024;

/// One piece of output, ready to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Byte offset of `data` in the attempt's output.
    pub offset: u64,
    /// The text.
    pub data: String,
}

/// What a secret's value is replaced with in output.
pub const MASK: &str = "***";

/// Collects output and cuts it into [`Chunk`]s.
#[derive(Default)]
pub struct LogChunker {
    /// The start of a UTF-8 sequence whose end has not arrived yet.
    partial: Vec<u8>,
    /// Decoded text not yet taken.
    text: String,
    /// Offset of the first byte of `text`.
    offset: u64,
    /// Values to mask, longest first.
    secrets: Vec<zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for LogChunker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogChunker")
            .field("offset", &self.offset)
            .field("waiting", &self.text.len())
            .field("masking", &self.secrets.len())
            .finish_non_exhaustive()
    }
}

impl LogChunker {
    /// A chunker at offset 0.
    pub fn new() -> Self {
        LogChunker::default()
    }

    /// The same chunker writing [`MASK`] in place of every one of
    /// `values` (empty ones are ignored).
    pub fn masking(mut self, values: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<zeroize::Zeroizing<String>> = values
            .into_iter()
            .filter(|v| !v.is_empty())
            .map(zeroize::Zeroizing::new)
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        self.secrets = secrets;
        self
    }

    /// Adds output bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        let mut input = std::mem::take(&mut self.partial);
        input.extend_from_slice(bytes);
        let mut rest = input.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    self.text.push_str(valid);
                    return;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // Checked by from_utf8 just above.
                    self.text
                        .push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            self.text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            self.partial = after.to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// How many bytes of text were taken as chunks: the next chunk's
    /// offset.
    pub fn taken(&self) -> u64 {
        self.offset
    }

    /// Whether enough text is waiting to fill a chunk (besides what may be
    /// held back as the start of a secret).
    pub fn has_full_chunk(&self) -> bool {
        self.text.len() >= MAX_LOG_CHUNK_BYTES + self.longest_secret()
    }

    /// Takes one chunk from the waiting text, if there is any.
    pub fn take(&mut self) -> Option<Chunk> {
        self.take_upto(false)
    }

    fn longest_secret(&self) -> usize {
        self.secrets.first().map_or(0, |s| s.len())
    }

    /// Replaces every whole secret in the waiting text.
    fn mask(&mut self) {
        for secret in &self.secrets {
            if self.text.contains(secret.as_str()) {
                self.text = self.text.replace(secret.as_str(), MASK);
            }
        }
    }

    /// Where the waiting text may end in the start of a secret: from there
    /// on, it waits for more.
    fn held_back(&self) -> usize {
        let Some(longest) = self.secrets.first().map(|s| s.len()) else {
            return self.text.len();
        };
        let from = self.text.len().saturating_sub(longest.saturating_sub(1));
        self.text
            .char_indices()
            .map(|(i, _)| i)
            .filter(|i| *i >= from)
            .find(|i| {
                let tail = &self.text[*i..];
                self.secrets.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.text.len())
    }

    /// Takes one chunk; `all` takes what is held back too (the output has
    /// ended).
    fn take_upto(&mut self, all: bool) -> Option<Chunk> {
        self.mask();
        let end = if all {
            self.text.len()
        } else {
            self.held_back()
        };
        if end == 0 {
            return None;
        }
        let cut = chunk_end(&self.text[..end]);
        let rest = self.text.split_off(cut);
        let data = std::mem::replace(&mut self.text, rest);
        let chunk = Chunk {
            offset: self.offset,
            data,
        };
        self.offset += chunk.data.len() as u64;
        Some(chunk)
    }

    /// Ends the output: an unfinished UTF-8 sequence becomes U+FFFD, and all
    /// waiting text is returned as chunks.
    pub fn finish(&mut self) -> Vec<Chunk> {
        if !self.partial.is_empty() {
            let partial = std::mem::take(&mut self.partial);
            self.text.push_str(&String::from_utf8_lossy(&partial));
        }
        std::iter::from_fn(|| self.take_upto(true)).collect()
    }
}

/// Where the first chunk of `text` ends: within both size limits, on a
/// character boundary, and never at 0 for non-empty text.
fn chunk_end(text: &str) -> usize {
    let mut escaped = 0;
    for (at, c) in text.char_indices() {
        escaped += json_escaped_len(c);
        let end = at + c.len_utf8();
        if at > 0 && (end > MAX_LOG_CHUNK_BYTES || escaped > MAX_FRAME_BYTES - FRAME_OVERHEAD) {
            return at;
        }
    }
    text.len()
}

/// The bytes serde_json writes for one character inside a string.
fn json_escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunker: &mut LogChunker) -> Vec<Chunk> {
        chunker.finish()
    }

    #[test]
    fn offsets_follow_the_text_bytes() {
        let mut c = LogChunker::new();
        c.push(b"hello\n");
        let first = c.take().unwrap();
        c.push(b"world\n");
        let second = c.take().unwrap();
        assert_eq!((first.offset, first.data.as_str()), (0, "hello\n"));
        assert_eq!((second.offset, second.data.as_str()), (6, "world\n"));
        assert!(c.take().is_none());
    }

    #[test]
    fn a_character_split_across_reads_is_kept_whole() {
        let mut c = LogChunker::new();
        let snow = "☃".as_bytes();
        c.push(&snow[..1]);
        assert!(c.take().is_none());
        c.push(&snow[1..]);
        assert_eq!(c.take().unwrap().data, "☃");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut c = LogChunker::new();
        c.push(b"a\xffb\xe2\x98");
        let chunks = all(&mut c);
        let text: String = chunks.iter().map(|c| c.data.as_str()).collect();
        assert_eq!(text, "a\u{fffd}b\u{fffd}");
    }

    fn text(chunks: &[Chunk]) -> String {
        chunks.iter().map(|c| c.data.as_str()).collect()
    }

    #[test]
    fn secrets_are_masked_also_when_split_across_reads_and_chunks() {
        let secret = "tok-Zq8vN3kLp0xR";
        let mut c = LogChunker::new().masking(["", secret, "short-tok"].map(String::from));
        let mut sent = Vec::new();
        // Split at every place, and flushed in between as the pump does.
        for cut in 0..secret.len() {
            c.push(format!("key={}", &secret[..cut]).as_bytes());
            sent.extend(c.take());
            c.push(format!("{} end\n", &secret[cut..]).as_bytes());
            sent.extend(c.take());
        }
        c.push(b"short-tok and short-to");
        sent.extend(c.take());
        sent.extend(c.finish());
        let all = text(&sent);
        assert!(!all.contains(secret), "{all}");
        assert_eq!(all.matches("key=*** end\n").count(), secret.len());
        assert!(
            all.ends_with("*** and short-to"),
            "a prefix at the very end is no secret: {all}"
        );
        let mut next = 0;
        for chunk in &sent {
            assert_eq!(chunk.offset, next, "offsets count the masked text");
            next += chunk.data.len() as u64;
        }
    }

    #[test]
    fn a_full_chunk_of_output_is_taken_even_with_a_long_secret_pending() {
        let secret = "s".repeat(1000) + "!";
        let mut c = LogChunker::new().masking([secret.clone()]);
        c.push(&vec![b's'; MAX_LOG_CHUNK_BYTES * 2]);
        while c.has_full_chunk() {
            assert!(c.take().is_some(), "a full chunk never waits");
        }
        let all = text(&c.finish());
        assert!(!all.contains('*'));
    }

    #[test]
    fn big_output_is_cut_within_the_limits_without_gaps() {
        let mut c = LogChunker::new();
        c.push(&vec![b'x'; MAX_LOG_CHUNK_BYTES * 2 + 10]);
        c.push(&vec![1u8; MAX_LOG_CHUNK_BYTES]);
        assert!(c.has_full_chunk());
        let chunks = all(&mut c);
        let mut next = 0;
        for chunk in &chunks {
            assert_eq!(chunk.offset, next);
            assert!(chunk.data.len() <= MAX_LOG_CHUNK_BYTES);
            let frame = serde_json::to_string(&chunk.data).unwrap();
            assert!(frame.len() < MAX_FRAME_BYTES - FRAME_OVERHEAD + 8);
            next += chunk.data.len() as u64;
        }
        assert_eq!(next, (MAX_LOG_CHUNK_BYTES * 3 + 10) as u64);
    }
}
