//! `--ack-log FILE`: every acknowledged DERIVE and ROTATE, one line each, written as the
//! acknowledgements come (a buffered writer, flushed at the end: memory stays bounded for
//! a run of any length). Fault tests compare it with the store that survived: every line
//! must be found there.
//!
//! The format: tab-separated, a `#` header line first, then one line per acknowledgement
//! in the order they were recorded:
//!
//! ```text
//! # ms	endpoint	op	asset	counter	shard	seq	hash
//! 1234.567	127.0.0.1:7443	DERIVE	6f1c…-…	0	3	1187	9a0b…(64 hex digits)
//! ```
//!
//! - `ms`: when the acknowledgement was received, milliseconds since the run's start
//!   (before the warm-up), three decimals;
//! - `endpoint`: the `--addr` endpoint that acknowledged it;
//! - `op`: DERIVE or ROTATE; `asset`: the asset id; `counter`: the counter derived at, or
//!   a ROTATE's new counter;
//! - `shard`, `seq`, `hash`: the receipt (the audit record's place and its hash, hex).
//!
//! `--failure-log FILE` ([`FailureLog`]) is its counterpart for the requests that were not
//! acknowledged (refused, of unknown outcome, not sent), so that a fault test can count
//! them around each fault: a `#` header line, then one line per failure as it came:
//!
//! ```text
//! # ms    op    outcome          (tab-separated)
//! 2345.678    DERIVE    NOT_ACTIVE
//! ```
//!
//! `ms` is on the same clock as the ack log's; `outcome` is the status name, or
//! OUTCOME_UNKNOWN, NOT_SENT, or CLIENT: and the client's error.

use crate::target::AckedRecord;
use crate::workload::Op;
use anyhow::Context;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The writer's buffer: a few hundred lines between two writes.
const ACK_LOG_BUFFER_BYTES: usize = 256 * 1024;

/// The ack log being written.
pub struct AckLog {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    start: Instant,
    endpoints: Vec<SocketAddr>,
    pub lines: u64,
    /// The first write error: the log is then incomplete, and the run says so at the end.
    error: Option<std::io::Error>,
}

impl AckLog {
    /// Creates (truncates) `path` and writes the header; times count from `start`.
    pub fn create(path: &Path, start: Instant, endpoints: &[SocketAddr]) -> anyhow::Result<AckLog> {
        let file =
            std::fs::File::create(path).with_context(|| format!("--ack-log {}", path.display()))?;
        let mut out = std::io::BufWriter::with_capacity(ACK_LOG_BUFFER_BYTES, file);
        writeln!(out, "# ms\tendpoint\top\tasset\tcounter\tshard\tseq\thash")?;
        Ok(AckLog {
            path: path.to_owned(),
            out,
            start,
            endpoints: endpoints.to_vec(),
            lines: 0,
            error: None,
        })
    }

    /// One acknowledgement received at `at` from endpoint `endpoint` (an index of
    /// `--addr`). Allocates nothing: the line is formatted into the buffer.
    pub fn write(&mut self, at: Instant, endpoint: u16, record: &AckedRecord) {
        if self.error.is_some() {
            return;
        }
        let us = at.saturating_duration_since(self.start).as_micros() as u64;
        let op = op_name(record.op);
        let mut hash = [0u8; 64];
        hex_into(&record.receipt.hash, &mut hash);
        let hash = std::str::from_utf8(&hash).unwrap_or("");
        let written = match self.endpoints.get(usize::from(endpoint)) {
            Some(addr) => writeln!(
                self.out,
                "{}.{:03}\t{addr}\t{op}\t{}\t{}\t{}\t{}\t{hash}",
                us / 1000,
                us % 1000,
                record.asset,
                record.counter,
                record.receipt.shard,
                record.receipt.seq
            ),
            None => writeln!(
                self.out,
                "{}.{:03}\t#{endpoint}\t{op}\t{}\t{}\t{}\t{}\t{hash}",
                us / 1000,
                us % 1000,
                record.asset,
                record.counter,
                record.receipt.shard,
                record.receipt.seq
            ),
        };
        match written {
            Ok(()) => self.lines += 1,
            Err(e) => self.error = Some(e),
        }
    }

    /// Flushes the log; an error if any line could not be written.
    pub fn finish(mut self) -> anyhow::Result<(PathBuf, u64)> {
        let lines = self.flush()?;
        Ok((self.path, lines))
    }

    /// Flushes what is written so far: the lines, or the first error of any write.
    pub fn flush(&mut self) -> anyhow::Result<u64> {
        if let Some(e) = self.error.take() {
            return Err(e).with_context(|| format!("--ack-log {}", self.path.display()));
        }
        self.out
            .flush()
            .with_context(|| format!("--ack-log {}", self.path.display()))?;
        Ok(self.lines)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The failure log being written (`--failure-log`). Only failures reach it: a run where
/// nothing fails writes its header alone, and the successful requests' cost is unchanged.
pub struct FailureLog {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    start: Instant,
    pub lines: u64,
    /// The first write error, reported at the end.
    error: Option<std::io::Error>,
}

impl FailureLog {
    /// Creates (truncates) `path` and writes the header; times count from `start`.
    pub fn create(path: &Path, start: Instant) -> anyhow::Result<FailureLog> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("--failure-log {}", path.display()))?;
        let mut out = std::io::BufWriter::with_capacity(ACK_LOG_BUFFER_BYTES, file);
        writeln!(out, "# ms\top\toutcome")?;
        Ok(FailureLog {
            path: path.to_owned(),
            out,
            start,
            lines: 0,
            error: None,
        })
    }

    /// One request of `op` that ended at `at` with `outcome` (not acknowledged).
    pub fn write(&mut self, at: Instant, op: Op, outcome: &str) {
        if self.error.is_some() {
            return;
        }
        let us = at.saturating_duration_since(self.start).as_micros() as u64;
        match writeln!(
            self.out,
            "{}.{:03}\t{}\t{outcome}",
            us / 1000,
            us % 1000,
            op_name(op)
        ) {
            Ok(()) => self.lines += 1,
            Err(e) => self.error = Some(e),
        }
    }

    /// Flushes the log: its path and lines, or the first error of any write.
    pub fn finish(&mut self) -> anyhow::Result<(PathBuf, u64)> {
        if let Some(e) = self.error.take() {
            return Err(e).with_context(|| format!("--failure-log {}", self.path.display()));
        }
        self.out
            .flush()
            .with_context(|| format!("--failure-log {}", self.path.display()))?;
        Ok((self.path.clone(), self.lines))
    }
}

/// The operation as the logs name it (the wire's names).
fn op_name(op: Op) -> &'static str {
    match op {
        Op::Derive => "DERIVE",
        Op::Rotate => "ROTATE",
        Op::Status => "STATUS",
    }
}

/// `bytes` as lower-case hex into `out` (twice as long).
fn hex_into(bytes: &[u8; 32], out: &mut [u8; 64]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody::wire::Receipt;
    use std::time::Duration;

    #[test]
    fn lines_are_tab_separated_with_the_receipt_in_hex() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks.tsv");
        let start = Instant::now();
        let endpoints: Vec<SocketAddr> = vec!["127.0.0.1:7443".parse().unwrap()];
        let mut log = AckLog::create(&path, start, &endpoints).unwrap();
        let mut hash = [0u8; 32];
        hash[0] = 0xab;
        hash[31] = 0x01;
        let record = AckedRecord {
            op: Op::Rotate,
            asset: uuid::Uuid::from_u128(7),
            counter: 3,
            receipt: Receipt {
                shard: 2,
                seq: 99,
                hash,
            },
        };
        log.write(start + Duration::from_micros(1_234_567), 0, &record);
        log.write(start + Duration::from_micros(5), 1, &record);
        let (_, lines) = log.finish().unwrap();
        assert_eq!(lines, 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "# ms\tendpoint\top\tasset\tcounter\tshard\tseq\thash"
        );
        let hex = format!("ab{}01", "00".repeat(30));
        assert_eq!(
            lines[1],
            format!("1234.567\t127.0.0.1:7443\tROTATE\t00000000-0000-0000-0000-000000000007\t3\t2\t99\t{hex}")
        );
        assert!(lines[2].starts_with("0.005\t#1\tROTATE\t"), "{}", lines[2]);
    }

    #[test]
    fn failures_are_one_line_each_with_their_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("failures.tsv");
        let start = Instant::now();
        let mut log = FailureLog::create(&path, start).unwrap();
        log.write(
            start + Duration::from_micros(2_345_678),
            Op::Derive,
            "NOT_ACTIVE",
        );
        log.write(
            start + Duration::from_micros(2_400_000),
            Op::Rotate,
            "OUTCOME_UNKNOWN",
        );
        let (_, lines) = log.finish().unwrap();
        assert_eq!(lines, 2);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "# ms\top\toutcome\n2345.678\tDERIVE\tNOT_ACTIVE\n2400.000\tROTATE\tOUTCOME_UNKNOWN\n"
        );
    }
}
