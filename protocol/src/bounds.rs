//! What the server keeps of what an agent sends: every text storable and
//! bounded, every list capped, all decided here.
//!
//! A node token proves which node is talking, nothing more, so anything in
//! a frame may be hostile: PostgreSQL `text` and `jsonb` cannot hold NUL, a
//! newline in a log line lets the sender forge the next line, an escape
//! sequence repaints an operator's terminal, and one string may fill a
//! whole 256 KiB frame. The ingress passes every message through these
//! rules right after decoding it, before anything of it reaches an event, a
//! table or a log line:
//!
//! - **Descriptive texts** (agent version, GPU names, a stage, a failure
//!   message, host command output and errors) are *cleaned*: NUL and every
//!   other control character becomes U+FFFD, and the text is cut at its
//!   limit on a character boundary, ending in `…`. A [`line`] keeps no line
//!   break (tab, CR and LF become spaces); a multi-line [`text`] keeps `\n`
//!   and `\t` and drops CR.
//! - **Identifiers** (a container id, label keys and values, transfer
//!   names, upload ids, ETags, hashes) are *checked*: one that is empty, too
//!   long or holds a control character refuses the message, with an
//!   [`Invalid`] naming the field. Changing an identifier would store
//!   another thing than the node meant.
//! - **Lists** (GPUs, labels, running attempts, upload parts) longer than
//!   their limit refuse the message. The cache lists, only a hint for
//!   placement, are cut at theirs instead and lose entries that are not
//!   identifiers.
//! - **Output** (log chunk data) keeps its length in bytes, because chunk
//!   offsets count them: see [`output`].
//! - **Quoting**: agent text in a log line or in a reason the server writes
//!   goes through [`quoted`] (Debug-escaped, at most [`MAX_QUOTED_CHARS`]
//!   characters), so it can neither break the line nor bloat it.
//!
//! The limits are far above what a real node sends (the agent lists at most
//! 1,000 cached images and commits, a large machine has 8 or 16 GPUs, and
//! runs a few dozen attempts at once) and far below what would bloat an
//! event: the largest `NodeConnected` a hello can produce is under 32 KiB.

use std::borrow::Cow;
use std::fmt;

use crate::{
    Cache, HostSshResult, LogChunk, Status, TransferOp, TransferRequest, MAX_HOST_SSH_OUTPUT_BYTES,
    MAX_LOG_CHUNK_BYTES, MAX_UPLOAD_PARTS,
};

/// The longest `agent_version` of a hello.
pub const MAX_AGENT_VERSION_BYTES: usize = 128;

/// The most GPUs a hello may list.
pub const MAX_GPUS: usize = 64;

/// The longest GPU name kept; longer ones are cut.
pub const MAX_GPU_NAME_BYTES: usize = 128;

/// The most labels a hello may declare (the same as a node's labels may
/// number).
pub const MAX_LABELS: usize = 64;

/// The longest label key or value.
pub const MAX_LABEL_BYTES: usize = 63;

/// The most attempts a hello may say are running. Each one the platform
/// does not want there is answered with a `cancel_task`, so this also
/// bounds the answer to a hello.
pub const MAX_RUNNING_ATTEMPTS: usize = 256;

/// The longest container id.
pub const MAX_CONTAINER_BYTES: usize = 256;

/// The longest stage of a `preparing` report kept; longer ones are cut.
pub const MAX_STAGE_BYTES: usize = 256;

/// The longest message of a report kept; longer ones are cut.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// The most entries of each cache list kept.
pub const MAX_CACHE_ENTRIES: usize = 1000;

/// The longest cache entry (an image tag or a commit id) kept.
pub const MAX_CACHE_ENTRY_BYTES: usize = 256;

/// The longest input or output name of a transfer request.
pub const MAX_TRANSFER_NAME_BYTES: usize = 512;

/// The longest upload id of a transfer request.
pub const MAX_UPLOAD_ID_BYTES: usize = 1024;

/// The longest ETag of an uploaded part, or SHA-256 of a transfer request.
pub const MAX_TAG_BYTES: usize = 256;

/// The longest error text of a host command result kept.
pub const MAX_HOST_SSH_ERROR_BYTES: usize = 1024;

/// The longest reason the server writes about a session or a frame (into
/// `NodeDisconnected`, an `error` frame, a `received` error), quoting
/// agent text only through [`quoted`].
pub const MAX_REASON_BYTES: usize = 512;

/// The most characters of agent text [`quoted`] shows.
pub const MAX_QUOTED_CHARS: usize = 64;

/// A message, or part of one, that cannot be stored: names the field and
/// says why. Its text never holds the offending value itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    /// The field, such as `resources.gpus` or `parts[3].etag`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl Invalid {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// `text` as one line of at most `max` bytes: control characters replaced
/// (tab, CR and LF by a space, the others by U+FFFD), cut on a character
/// boundary with `…` when longer.
pub fn line(text: &str, max: usize) -> String {
    clean(text, max, |c| match c {
        '\t' | '\n' | '\r' => Some(' '),
        c if c.is_control() => Some('\u{fffd}'),
        c => Some(c),
    })
    .0
}

/// `text` as lines of at most `max` bytes in all: `\n` and `\t` kept, CR
/// dropped, other control characters replaced by U+FFFD, cut on a
/// character boundary with `…` when longer.
pub fn text(value: &str, max: usize) -> String {
    text_cut(value, max).0
}

/// [`text`], and whether it was cut.
fn text_cut(text: &str, max: usize) -> (String, bool) {
    clean(text, max, |c| match c {
        '\n' | '\t' => Some(c),
        '\r' => None,
        c if c.is_control() => Some('\u{fffd}'),
        c => Some(c),
    })
}

/// `text` mapped character by character and cut to `max` bytes; whether
/// it was cut.
fn clean(text: &str, max: usize, map: impl Fn(char) -> Option<char>) -> (String, bool) {
    const MORE: char = '…';
    let mut out = String::with_capacity(text.len().min(max));
    // Where the text would end if what follows does not fit.
    let mut fits_with_more = 0;
    for c in text.chars().filter_map(map) {
        if out.len() + c.len_utf8() > max {
            out.truncate(fits_with_more);
            if out.len() + MORE.len_utf8() <= max {
                out.push(MORE);
            }
            return (out, true);
        }
        out.push(c);
        if out.len() + MORE.len_utf8() <= max {
            fits_with_more = out.len();
        }
    }
    (out, false)
}

/// Log chunk data made storable without changing its length in bytes (the
/// offsets of later chunks count them): `\n` and `\t` are kept; CR becomes
/// a newline, or a space right before one, so progress bars read as lines;
/// every other control character (NUL, escape sequences' ESC, …) becomes
/// as many spaces as its UTF-8 bytes.
pub fn output(data: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !data.chars().any(unsafe_char) {
        return Cow::Borrowed(data);
    }
    let mut out = String::with_capacity(data.len());
    let mut chars = data.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => out.push(' '),
            '\r' => out.push('\n'),
            c if unsafe_char(c) => out.extend(std::iter::repeat_n(' ', c.len_utf8())),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Agent text as it may appear in a log line or a reason: in quotes,
/// Debug-escaped (no raw newline, escape or NUL), at most
/// [`MAX_QUOTED_CHARS`] characters and then how long it was.
pub fn quoted(text: &str) -> Quoted<'_> {
    Quoted(text)
}

/// See [`quoted`].
#[derive(Debug, Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        let mut chars = self.0.char_indices();
        for (_, c) in chars.by_ref().take(MAX_QUOTED_CHARS) {
            write!(f, "{}", c.escape_debug())?;
        }
        f.write_str("\"")?;
        if chars.next().is_some() {
            write!(f, "… ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

/// Checks an identifier: 1 to `max` bytes, no control character, no white
/// space unless `spaces`.
fn identifier(field: &str, value: &str, max: usize, spaces: bool) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field, "is empty"));
    }
    if value.len() > max {
        return Err(Invalid::new(
            field,
            format!("is {} bytes long; at most {max}", value.len()),
        ));
    }
    let bad = |c: char| c.is_control() || (!spaces && c.is_whitespace());
    if let Some(at) = value.find(bad) {
        let what = if spaces {
            "a control character"
        } else {
            "a control character or white space"
        };
        return Err(Invalid::new(field, format!("holds {what} at byte {at}")));
    }
    Ok(())
}

fn at_most(field: &str, len: usize, max: usize, what: &str) -> Result<(), Invalid> {
    if len > max {
        return Err(Invalid::new(
            field,
            format!("lists {len} {what}; at most {max}"),
        ));
    }
    Ok(())
}

impl crate::Hello {
    /// The hello as the server may store it: texts cleaned and cut, the
    /// cache lists cut.
    ///
    /// # Errors
    /// [`Invalid`] naming the first field that cannot be stored: an empty
    /// or too long `agent_version`, a number of cores that is no number,
    /// more than [`MAX_GPUS`] GPUs, [`MAX_LABELS`] labels or
    /// [`MAX_RUNNING_ATTEMPTS`] running attempts, a label key or value that
    /// is too long or holds a control character.
    pub fn bounded(mut self) -> Result<Self, Invalid> {
        let version = self.agent_version.trim();
        if version.is_empty() || version.len() > MAX_AGENT_VERSION_BYTES {
            return Err(Invalid::new(
                "agent_version",
                format!("must be 1 to {MAX_AGENT_VERSION_BYTES} bytes"),
            ));
        }
        self.agent_version = line(version, MAX_AGENT_VERSION_BYTES);
        let r = &mut self.resources;
        if !r.cpus.is_finite() || r.cpus < 0.0 {
            return Err(Invalid::new(
                "resources.cpus",
                "must be a number of cores, 0 or more",
            ));
        }
        at_most("resources.gpus", r.gpus.len(), MAX_GPUS, "GPUs")?;
        for gpu in &mut r.gpus {
            gpu.name = line(&gpu.name, MAX_GPU_NAME_BYTES);
        }
        at_most("labels", self.labels.len(), MAX_LABELS, "labels")?;
        for (key, value) in &self.labels {
            identifier("labels (a key)", key, MAX_LABEL_BYTES, false)?;
            if !value.is_empty() {
                identifier(&format!("labels.{key}"), value, MAX_LABEL_BYTES, false)?;
            }
        }
        at_most(
            "running",
            self.running.len(),
            MAX_RUNNING_ATTEMPTS,
            "attempts",
        )?;
        for running in &mut self.running {
            if let Some(container) = running.container.as_mut() {
                *container = line(container, MAX_CONTAINER_BYTES);
            }
        }
        self.cache = std::mem::take(&mut self.cache).bounded();
        Ok(self)
    }
}

impl Cache {
    /// The lists as the server keeps them: at most [`MAX_CACHE_ENTRIES`]
    /// each, without entries that are empty, longer than
    /// [`MAX_CACHE_ENTRY_BYTES`] or hold a control character or white
    /// space. The cache is a hint for placement, so nothing here refuses.
    pub fn bounded(self) -> Self {
        let keep = |list: Vec<String>| -> Vec<String> {
            list.into_iter()
                .filter(|e| identifier("cache", e, MAX_CACHE_ENTRY_BYTES, false).is_ok())
                .take(MAX_CACHE_ENTRIES)
                .collect()
        };
        Cache {
            images: keep(self.images),
            commits: keep(self.commits),
        }
    }
}

impl Status {
    /// The report as the server may store it: `stage` and `message`
    /// cleaned and cut.
    ///
    /// # Errors
    /// [`Invalid`] when `container` is empty, longer than
    /// [`MAX_CONTAINER_BYTES`] or anything but printable ASCII, or when a
    /// report other than `failed` says `node_fault`.
    pub fn bounded(mut self) -> Result<Self, Invalid> {
        if self.node_fault && self.state != crate::ReportedState::Failed {
            return Err(Invalid::new(
                "node_fault",
                "only a failed report may say the node kept the attempt from its end",
            ));
        }
        if let Some(container) = &self.container {
            identifier("container", container, MAX_CONTAINER_BYTES, false)?;
            if !container.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Invalid::new(
                    "container",
                    "must be printable ASCII, as a Docker container id is",
                ));
            }
        }
        if let Some(stage) = self.stage.as_mut() {
            *stage = line(stage, MAX_STAGE_BYTES);
        }
        if let Some(message) = self.message.as_mut() {
            *message = text(message, MAX_MESSAGE_BYTES);
        }
        Ok(self)
    }
}

impl LogChunk {
    /// The chunk as the server may store it: see [`output`].
    ///
    /// # Errors
    /// [`Invalid`] when `data` is longer than [`MAX_LOG_CHUNK_BYTES`].
    pub fn bounded(mut self) -> Result<Self, Invalid> {
        if self.data.len() > MAX_LOG_CHUNK_BYTES {
            return Err(Invalid::new(
                "data",
                format!(
                    "is {} bytes long; a log chunk holds at most {MAX_LOG_CHUNK_BYTES}",
                    self.data.len()
                ),
            ));
        }
        if let Cow::Owned(clean) = output(&self.data) {
            self.data = clean;
        }
        Ok(self)
    }
}

impl HostSshResult {
    /// The result as the server may store it: `output` cleaned and cut at
    /// [`MAX_HOST_SSH_OUTPUT_BYTES`] (then `truncated`), `error` cleaned
    /// and cut at [`MAX_HOST_SSH_ERROR_BYTES`]. Never refused: an admin
    /// waits for it.
    pub fn bounded(mut self) -> Self {
        let (output, cut) = text_cut(&self.output, MAX_HOST_SSH_OUTPUT_BYTES);
        self.truncated |= cut;
        self.output = output;
        if let Some(error) = self.error.as_mut() {
            *error = text(error, MAX_HOST_SSH_ERROR_BYTES);
        }
        self
    }
}

impl TransferRequest {
    /// Checks the request's names, ids and hashes.
    ///
    /// # Errors
    /// [`Invalid`] naming the first field that is empty, too long or holds
    /// a control character, or more than [`MAX_UPLOAD_PARTS`] parts.
    pub fn bounded(self) -> Result<Self, Invalid> {
        let name = |field: &str, v: &str| identifier(field, v, MAX_TRANSFER_NAME_BYTES, true);
        let tag = |field: &str, v: &str| identifier(field, v, MAX_TAG_BYTES, false);
        match &self.op {
            TransferOp::Secrets => {}
            TransferOp::Download { input } => name("input", input)?,
            TransferOp::Upload { output, sha256, .. } => {
                name("output", output)?;
                if let Some(sha256) = sha256 {
                    tag("sha256", sha256)?;
                }
            }
            TransferOp::UploadPart {
                output,
                upload_id,
                sha256,
                ..
            } => {
                name("output", output)?;
                identifier("upload_id", upload_id, MAX_UPLOAD_ID_BYTES, false)?;
                tag("sha256", sha256)?;
            }
            TransferOp::Complete {
                output,
                upload_id,
                parts,
                sha256,
                ..
            } => {
                name("output", output)?;
                if let Some(upload_id) = upload_id {
                    identifier("upload_id", upload_id, MAX_UPLOAD_ID_BYTES, false)?;
                }
                at_most("parts", parts.len(), MAX_UPLOAD_PARTS as usize, "parts")?;
                for (i, part) in parts.iter().enumerate() {
                    tag(&format!("parts[{i}].etag"), &part.etag)?;
                }
                tag("sha256", sha256)?;
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Gpu, Hello, ReportedState, RunningAttempt, UploadedPart};
    use uuid::Uuid;

    fn hello() -> Hello {
        Hello {
            agent_version: "0.1.0".into(),
            ..Hello::default()
        }
    }

    fn storable(s: &str) -> bool {
        !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
    }

    #[test]
    fn a_line_has_no_control_character_and_fits_its_limit() {
        assert_eq!(
            line("a\0b\nc\td\x1b[31m", 100),
            "a\u{fffd}b c d\u{fffd}[31m"
        );
        assert_eq!(line("plain", 5), "plain");
        assert_eq!(line("abcdef", 5), "ab…");
        let cut = line(&"é".repeat(100), 11);
        assert!(cut.len() <= 11 && cut.ends_with('…'), "{cut}");
        // NUL grows to three bytes, and the limit still holds.
        let nuls = line(&"\0".repeat(10), 10);
        assert!(nuls.len() <= 10, "{nuls:?}");
        assert_eq!(line("", 0), "");
        assert_eq!(line("abc", 0), "");
        assert_eq!(line("abc", 2), "");
    }

    #[test]
    fn a_text_keeps_its_lines_and_tabs_only() {
        assert_eq!(
            text("one\r\ntwo\tthree\0\u{9b}31m\u{7f}", 100),
            "one\ntwo\tthree\u{fffd}\u{fffd}31m\u{fffd}"
        );
        assert!(storable(&text(&"\u{1}\n".repeat(1000), 64)));
        assert!(text(&"x".repeat(5000), MAX_MESSAGE_BYTES).len() <= MAX_MESSAGE_BYTES);
    }

    #[test]
    fn output_keeps_its_length_in_bytes() {
        for data in [
            "plain\n",
            "nul\0here",
            "\x1b[31mred\x1b[0m\n",
            "50%\r100%\r\n",
            "c1 \u{85} \u{9b}",
            "\r",
        ] {
            let clean = output(data);
            assert_eq!(clean.len(), data.len(), "{data:?}");
            assert!(storable(&clean), "{clean:?}");
        }
        assert_eq!(output("50%\r100%\r\n"), "50%\n100% \n");
        assert_eq!(output("a\0b"), "a b");
        assert!(matches!(output("fine\tand\n"), Cow::Borrowed(_)));
    }

    #[test]
    fn quoted_text_stays_on_one_short_line() {
        let q = quoted("x\nERROR forged\u{1b}[0m\0").to_string();
        assert_eq!(q, r#""x\nERROR forged\u{1b}[0m\0""#);
        let long = quoted(&"a".repeat(100_000)).to_string();
        assert!(long.len() < 120, "{long}");
        assert!(long.ends_with("… (100000 bytes)"), "{long}");
        assert!(!long.contains('\n'));
    }

    #[test]
    fn a_hello_is_cleaned_or_refused_naming_the_field() {
        let mut h = hello();
        h.agent_version = " 1.0\0\n ".into();
        h.resources.gpus = vec![Gpu {
            index: 0,
            name: format!("A100\0\n{}", "x".repeat(1000)),
            memory_mb: 1,
        }];
        h.cache.images = vec!["ok".into(), "bad\0".into(), String::new(), "x".repeat(300)];
        h.cache.commits = (0..5000).map(|i| format!("{i:040}")).collect();
        let b = h.bounded().unwrap();
        assert_eq!(b.agent_version, "1.0\u{fffd}");
        assert!(b.resources.gpus[0].name.len() <= MAX_GPU_NAME_BYTES);
        assert!(b.resources.gpus[0].name.starts_with("A100\u{fffd} x"));
        assert_eq!(b.cache.images, ["ok"]);
        assert_eq!(b.cache.commits.len(), MAX_CACHE_ENTRIES);

        let field = |h: Hello| h.bounded().unwrap_err().field;
        let mut h = hello();
        h.agent_version = "v".repeat(MAX_AGENT_VERSION_BYTES + 1);
        assert_eq!(field(h), "agent_version");
        let mut h = hello();
        h.resources.cpus = f64::NAN;
        assert_eq!(field(h), "resources.cpus");
        let mut h = hello();
        h.resources.gpus = (0..=MAX_GPUS as u32)
            .map(|index| Gpu {
                index,
                name: "g".into(),
                memory_mb: 1,
            })
            .collect();
        assert_eq!(field(h), "resources.gpus");
        let mut h = hello();
        h.labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(field(h), "labels");
        let mut h = hello();
        h.labels = [("gpu".to_string(), "a\0b".to_string())].into();
        let e = h.bounded().unwrap_err();
        assert_eq!(e.field, "labels.gpu");
        assert!(!e.to_string().contains('\0'));
        let mut h = hello();
        h.labels = [("bad\nkey".to_string(), "v".to_string())].into();
        let e = h.bounded().unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
        let mut h = hello();
        h.running = (0..=MAX_RUNNING_ATTEMPTS as u32)
            .map(|attempt| RunningAttempt {
                task_id: Uuid::nil(),
                attempt,
                container: None,
            })
            .collect();
        assert_eq!(field(h), "running");
    }

    #[test]
    fn a_report_is_cleaned_but_a_bad_container_id_refuses_it() {
        let status = |container: Option<&str>| Status {
            id: 1,
            task_id: Uuid::nil(),
            attempt: 1,
            state: ReportedState::Failed,
            stage: Some("build\0ing\n".into()),
            container: container.map(Into::into),
            exit_code: Some(1),
            message: Some(format!("error\0\x1b[31m\r\n{}", "x".repeat(10_000))),
            node_fault: false,
        };
        let b = status(Some("abc123")).bounded().unwrap();
        assert_eq!(b.stage.as_deref(), Some("build\u{fffd}ing "));
        let message = b.message.unwrap();
        assert!(
            message.starts_with("error\u{fffd}\u{fffd}[31m\nxx"),
            "{message}"
        );
        assert!(message.len() <= MAX_MESSAGE_BYTES);
        for bad in [
            "",
            "abc\0def",
            "abc def",
            &"c".repeat(MAX_CONTAINER_BYTES + 1),
        ] {
            let e = status(Some(bad)).bounded().unwrap_err();
            assert_eq!(e.field, "container", "{bad:?}");
            assert!(!e.to_string().contains('\0'));
        }
        let mut fault = status(None);
        fault.node_fault = true;
        assert!(fault.clone().bounded().unwrap().node_fault);
        for state in [
            ReportedState::Accepted,
            ReportedState::Preparing,
            ReportedState::Running,
            ReportedState::Succeeded,
            ReportedState::Cancelled,
            ReportedState::TimedOut,
        ] {
            fault.state = state;
            let e = fault.clone().bounded().unwrap_err();
            assert_eq!(e.field, "node_fault", "{state:?}");
        }
    }

    #[test]
    fn node_fault_is_left_out_of_a_report_without_it_and_read_as_false_when_absent() {
        let status = Status {
            id: 1,
            task_id: Uuid::nil(),
            attempt: 1,
            state: ReportedState::Failed,
            stage: None,
            container: None,
            exit_code: None,
            message: None,
            node_fault: false,
        };
        let text = serde_json::to_string(&status).unwrap();
        assert!(!text.contains("node_fault"), "{text}");
        assert_eq!(serde_json::from_str::<Status>(&text).unwrap(), status);
        let fault = Status {
            node_fault: true,
            ..status
        };
        let text = serde_json::to_string(&fault).unwrap();
        assert!(text.contains(r#""node_fault":true"#), "{text}");
        assert_eq!(serde_json::from_str::<Status>(&text).unwrap(), fault);
    }

    #[test]
    fn log_chunks_and_host_results_are_bounded() {
        let chunk = |data: String| LogChunk {
            id: 1,
            task_id: Uuid::nil(),
            attempt: 1,
            offset: 0,
            data,
        };
        let b = chunk("a\0b".into()).bounded().unwrap();
        assert_eq!(b.data, "a b");
        let e = chunk("x".repeat(MAX_LOG_CHUNK_BYTES + 1))
            .bounded()
            .unwrap_err();
        assert_eq!(e.field, "data");
        let r = HostSshResult {
            id: 1,
            request_id: Uuid::nil(),
            exit_code: None,
            output: format!("a\0{}", "é".repeat(MAX_HOST_SSH_OUTPUT_BYTES)),
            truncated: false,
            timed_out: false,
            duration_ms: 0,
            error: Some("e\n\0".repeat(1000)),
        }
        .bounded();
        assert!(r.truncated);
        assert!(r.output.len() <= MAX_HOST_SSH_OUTPUT_BYTES);
        assert!(r.output.starts_with("a\u{fffd}é"));
        assert!(r.error.unwrap().len() <= MAX_HOST_SSH_ERROR_BYTES);
    }

    #[test]
    fn transfer_requests_name_their_bad_field() {
        let request = |op| TransferRequest {
            id: 1,
            task_id: Uuid::nil(),
            attempt: 1,
            op,
        };
        assert!(request(TransferOp::Download {
            input: "data/my file.csv".into()
        })
        .bounded()
        .is_ok());
        let e = request(TransferOp::Download {
            input: "a\nb".into(),
        })
        .bounded()
        .unwrap_err();
        assert_eq!(e.field, "input");
        let e = request(TransferOp::Complete {
            output: "model".into(),
            upload_id: Some("u".into()),
            parts: vec![UploadedPart {
                part_number: 1,
                etag: "x".repeat(MAX_TAG_BYTES + 1),
            }],
            size: 1,
            sha256: "a".repeat(64),
        })
        .bounded()
        .unwrap_err();
        assert_eq!(e.field, "parts[0].etag");
        let e = request(TransferOp::Complete {
            output: "model".into(),
            upload_id: Some("u".into()),
            parts: (0..=MAX_UPLOAD_PARTS)
                .map(|n| UploadedPart {
                    part_number: n,
                    etag: "e".into(),
                })
                .collect(),
            size: 1,
            sha256: "a".repeat(64),
        })
        .bounded()
        .unwrap_err();
        assert_eq!(e.field, "parts");
    }
}
