//! Reading a program's stdout and stderr with bounded memory. A pipe is
//! always read to its end, whatever is kept, because a program blocked on a
//! full pipe would never exit; what is kept is capped (the head of stdout,
//! the tail of stderr), and what is dropped is counted so the result can
//! say so. The state lives outside the reading future, so whatever was read
//! before a reader is abandoned is still there.

use std::collections::VecDeque;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::spec::{MAX_LINE, OutputLine, Stream};

/// Bytes asked of a pipe per read (the size of a Linux pipe's page).
const READ_CHUNK: usize = 8 * 1024;

/// What is kept of one stream, and its optional line sink.
#[derive(Debug)]
pub(crate) struct Capture {
    pub(crate) keep: Keep,
    pub(crate) lines: Lines,
}

impl Capture {
    /// Takes one chunk just read from the pipe.
    fn take(&mut self, data: &[u8]) {
        self.keep.push(data);
        self.lines.feed(data);
    }
}

/// Which part of a stream is kept.
#[derive(Debug)]
pub(crate) enum Keep {
    /// The first `cap` bytes (stdout: the result).
    Head {
        cap: usize,
        bytes: Vec<u8>,
        dropped: u64,
    },
    /// The last `cap` bytes (stderr: where the error usually is).
    Tail {
        cap: usize,
        bytes: VecDeque<u8>,
        total: u64,
    },
}

impl Keep {
    pub(crate) fn head(cap: usize) -> Self {
        Self::Head {
            cap,
            bytes: Vec::new(),
            dropped: 0,
        }
    }

    pub(crate) fn tail(cap: usize) -> Self {
        Self::Tail {
            cap,
            bytes: VecDeque::new(),
            total: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        match self {
            Self::Head {
                cap,
                bytes,
                dropped,
            } => {
                let kept = data.len().min(cap.saturating_sub(bytes.len()));
                bytes.extend_from_slice(&data[..kept]);
                *dropped += (data.len() - kept) as u64;
            }
            Self::Tail { cap, bytes, total } => {
                *total += data.len() as u64;
                let data = &data[data.len().saturating_sub(*cap)..];
                let overflow = (bytes.len() + data.len()).saturating_sub(*cap);
                bytes.drain(..overflow);
                bytes.extend(data);
            }
        }
    }
}

/// Cuts a stream into lines for a sink, never waiting for room in it.
#[derive(Debug)]
pub(crate) struct Lines {
    stream: Stream,
    sink: Option<mpsc::Sender<OutputLine>>,
    /// The start of a line whose `\n` has not come yet (< `MAX_LINE`
    /// bytes, or exactly `MAX_LINE` while the next byte is unknown).
    pending: Vec<u8>,
    /// Lines the sink had no room for (or had closed).
    pub(crate) dropped: u64,
}

impl Lines {
    pub(crate) fn new(stream: Stream, sink: Option<mpsc::Sender<OutputLine>>) -> Self {
        Self {
            stream,
            sink,
            pending: Vec::new(),
            dropped: 0,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        if self.sink.is_none() {
            return;
        }
        while !data.is_empty() {
            let room = MAX_LINE - self.pending.len();
            // One byte past the room, so that a line of exactly MAX_LINE
            // bytes followed by its `\n` is one line, not a full one and
            // an empty one.
            let window = &data[..data.len().min(room + 1)];
            if let Some(newline) = window.iter().position(|&byte| byte == b'\n') {
                self.pending.extend_from_slice(&window[..newline]);
                self.send();
                data = &data[newline + 1..];
            } else if window.len() > room {
                self.pending.extend_from_slice(&window[..room]);
                self.send();
                data = &data[room..];
            } else {
                self.pending.extend_from_slice(window);
                data = &data[window.len()..];
            }
        }
    }

    /// The stream ended: a last line without `\n` is still a line.
    fn finish(&mut self) {
        if !self.pending.is_empty() {
            self.send();
        }
    }

    fn send(&mut self) {
        let bytes = std::mem::take(&mut self.pending);
        if let Some(sink) = &self.sink {
            let line = OutputLine {
                stream: self.stream,
                bytes,
            };
            match sink.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Closed(_)) => self.dropped += 1,
            }
        }
    }
}

/// Reads `pipe` to its end into `capture`.
pub(crate) async fn drain<R: AsyncRead + Unpin>(
    mut pipe: R,
    capture: &mut Capture,
) -> io::Result<()> {
    let mut buf = vec![0; READ_CHUNK];
    loop {
        let read = pipe.read(&mut buf).await?;
        if read == 0 {
            capture.lines.finish();
            return Ok(());
        }
        capture.take(&buf[..read]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_keeps_the_first_bytes_and_counts_the_rest() {
        let mut keep = Keep::head(5);
        keep.push(b"abc");
        keep.push(b"defg");
        keep.push(b"hi");
        let Keep::Head { bytes, dropped, .. } = keep else {
            unreachable!()
        };
        assert_eq!((bytes.as_slice(), dropped), (&b"abcde"[..], 4));
    }

    #[test]
    fn tail_keeps_the_last_bytes_and_counts_all() {
        let mut keep = Keep::tail(4);
        keep.push(b"ab");
        keep.push(b"cde");
        keep.push(b"f");
        keep.push(b"0123456789");
        keep.push(b"x");
        let Keep::Tail { bytes, total, .. } = keep else {
            unreachable!()
        };
        assert_eq!((Vec::from(bytes), total), (b"789x".to_vec(), 17));
    }

    fn lines_of(chunks: &[&[u8]], capacity: usize) -> (Vec<Vec<u8>>, u64) {
        let (tx, mut rx) = mpsc::channel(capacity);
        let mut lines = Lines::new(Stream::Stdout, Some(tx));
        for chunk in chunks {
            lines.feed(chunk);
        }
        lines.finish();
        let mut got = Vec::new();
        while let Ok(line) = rx.try_recv() {
            got.push(line.bytes);
        }
        (got, lines.dropped)
    }

    #[test]
    fn lines_are_cut_at_newlines_across_chunks() {
        let (got, dropped) = lines_of(&[b"a\nb", b"c\n\nd\xff"], 10);
        assert_eq!(
            got,
            [
                b"a".to_vec(),
                b"bc".to_vec(),
                b"".to_vec(),
                b"d\xff".to_vec()
            ]
        );
        assert_eq!(dropped, 0);
    }

    #[test]
    fn long_lines_are_split_at_max_line() {
        let exact = vec![b'x'; MAX_LINE];
        // Exactly MAX_LINE bytes then `\n`, in one chunk and across two.
        for chunks in [
            vec![[exact.as_slice(), b"\n"].concat()],
            vec![exact.clone(), b"\n".to_vec()],
        ] {
            let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let (got, _) = lines_of(&chunks, 10);
            assert_eq!(got, std::slice::from_ref(&exact));
        }
        let long = vec![b'y'; 2 * MAX_LINE + 3];
        let (got, _) = lines_of(&[&long, b"\nz"], 10);
        let lengths: Vec<usize> = got.iter().map(Vec::len).collect();
        assert_eq!(lengths, [MAX_LINE, MAX_LINE, 3, 1]);
    }

    #[test]
    fn a_full_sink_drops_and_counts() {
        let (got, dropped) = lines_of(&[b"1\n2\n3\n4"], 2);
        assert_eq!(got, [b"1".to_vec(), b"2".to_vec()]);
        assert_eq!(dropped, 2);
    }
}
