//! Kafka record batches (message format v2) read as columns, without one object per
//! record.
//!
//! A fetch response carries, per partition, a run of record batches. Each batch is
//! (big-endian):
//!
//! ```text
//! baseOffset: i64, batchLength: i32, partitionLeaderEpoch: i32, magic: i8 (= 2),
//! crc: u32 (CRC-32C of everything after it), attributes: i16, lastOffsetDelta: i32,
//! baseTimestamp: i64, maxTimestamp: i64, producerId: i64, producerEpoch: i16,
//! baseSequence: i32, recordCount: i32, records...
//! ```
//!
//! and each record is `length: varint`, then `attributes: i8`, `timestampDelta:
//! varlong`, `offsetDelta: varint`, `keyLength: varint` + key, `valueLength: varint` +
//! value, `headerCount: varint` and per header `keyLength: varint` + key,
//! `valueLength: varint` + value (varints are zig-zag; length -1 is null).
//!
//! [`scan`] walks the batches and keeps, per record, its offset, timestamp and the
//! byte spans of key, value and headers in the fetch buffer, plus the value of its
//! `encoding` header as a small code. Control batches (transaction markers) are
//! skipped. Compressed batches and the old formats (magic 0/1) are not read: the
//! scan stops before them with [`Stop::Unsupported`] and the caller reads the rest
//! another way.

use std::fmt;

/// Bytes before a batch's `magic` that every format shares: offset and length.
pub const LOG_OVERHEAD: usize = 12;
/// The v2 batch header, up to the first record.
pub const BATCH_HEADER: usize = 61;
/// The header that names a message's encoding.
pub const ENCODING_HEADER: &[u8] = b"encoding";

const COMPRESSION_MASK: i16 = 0x07;
const TIMESTAMP_TYPE_BIT: i16 = 0x08;
const CONTROL_BIT: i16 = 0x20;

/// A byte range of the fetch buffer; `len == -1` is a null key or value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First byte, from the start of the buffer.
    pub start: usize,
    /// Length, or -1 for null.
    pub len: i32,
}

impl Span {
    const NULL: Span = Span { start: 0, len: -1 };

    /// The bytes, or None when null.
    #[must_use]
    pub fn get<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        usize::try_from(self.len)
            .ok()
            .map(|len| &buf[self.start..self.start + len])
    }
}

/// The records of a scan, one entry per record in every vector.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Records {
    /// Kafka offsets.
    pub offsets: Vec<i64>,
    /// Timestamps, epoch milliseconds (the batch's max timestamp for log-append time).
    pub timestamps: Vec<i64>,
    /// 0: create time, 1: log-append time.
    pub timestamp_types: Vec<u8>,
    /// Keys.
    pub keys: Vec<Span>,
    /// Values.
    pub values: Vec<Span>,
    /// Where the record's headers start (at the first header's key length) and
    /// how many there are.
    pub headers: Vec<(usize, u32)>,
    /// The first `encoding` header's value: 0 when absent, null or empty, else an
    /// index + 1 into `encoding_names`.
    pub encodings: Vec<u16>,
    /// The distinct `encoding` header values met.
    pub encoding_names: Vec<Vec<u8>>,
}

impl Records {
    /// How many records.
    #[must_use]
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    fn encoding_code(&mut self, value: &[u8]) -> u16 {
        if value.is_empty() {
            return 0;
        }
        if let Some(i) = self.encoding_names.iter().position(|n| n == value) {
            return (i + 1) as u16;
        }
        self.encoding_names.push(value.to_vec());
        self.encoding_names.len() as u16
    }
}

/// Why a scan ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The buffer holds no further complete batch (a fetch may end with a partial one).
    End,
    /// `max_records` records were read; scan again from `end` for more.
    Limit,
    /// The batch at `end` is compressed or of an old format; read it another way.
    Unsupported,
}

/// The outcome of [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The records read.
    pub records: Records,
    /// Where to scan next: the start of the first batch not finished.
    pub end: usize,
    /// The offset to fetch or scan from next.
    pub next_offset: i64,
    /// Why the scan ended.
    pub stop: Stop,
    /// The leader epoch of the last batch read (-1 if none).
    pub leader_epoch: i32,
    /// Bytes of the batches finished.
    pub bytes_read: usize,
}

/// A batch that can't be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// The batch's CRC-32C does not match its bytes.
    Crc {
        /// The batch's base offset.
        base_offset: i64,
        /// The CRC in the header.
        stored: u32,
        /// The CRC of the bytes.
        computed: u32,
    },
    /// The bytes are not a well-formed batch.
    Corrupt {
        /// The batch's base offset.
        base_offset: i64,
        /// What is wrong.
        what: &'static str,
    },
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchError::Crc {
                base_offset,
                stored,
                computed,
            } => write!(
                f,
                "record batch at offset {base_offset} failed its CRC check \
                 (stored {stored:#010x}, computed {computed:#010x})"
            ),
            BatchError::Corrupt { base_offset, what } => {
                write!(f, "record batch at offset {base_offset} is corrupt: {what}")
            }
        }
    }
}

impl std::error::Error for BatchError {}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(x)
}

/// Reads an unsigned LEB128 varint of at most `max_bytes` bytes at `*pos` of
/// `b` (which ends where the enclosing record ends) and zig-zag decodes it.
fn varlong(b: &[u8], pos: &mut usize, max_bytes: usize) -> Option<i64> {
    let mut raw: u64 = 0;
    for i in 0..max_bytes {
        let byte = *b.get(*pos)?;
        *pos += 1;
        raw |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
        }
    }
    None
}

/// A zig-zag varint that must fit an i32 (Kafka's `varint`).
pub fn varint(b: &[u8], pos: &mut usize) -> Option<i32> {
    varlong(b, pos, 5).and_then(|v| i32::try_from(v).ok())
}

/// A zig-zag varlong (Kafka's `varlong`).
pub fn read_varlong(b: &[u8], pos: &mut usize) -> Option<i64> {
    varlong(b, pos, 10)
}

/// A length-prefixed field: -1 is null, other negatives are corrupt.
fn field(b: &[u8], pos: &mut usize, base: usize) -> Option<Span> {
    let len = varint(b, pos)?;
    if len == -1 {
        return Some(Span::NULL);
    }
    let n = usize::try_from(len).ok()?;
    let start = *pos;
    if start.checked_add(n)? > b.len() {
        return None;
    }
    *pos += n;
    Some(Span {
        start: base + start,
        len,
    })
}

/// Walk the record batches of `buf` from byte `start`.
///
/// Records below `fetch_offset` are skipped (a fetch may return a batch that
/// starts before the offset asked for); at most `max_records` records are kept.
/// `check_crc` verifies each batch's CRC-32C.
pub fn scan(
    buf: &[u8],
    start: usize,
    fetch_offset: i64,
    max_records: usize,
    check_crc: bool,
) -> Result<Scan, BatchError> {
    let mut records = Records::default();
    let mut pos = start.min(buf.len());
    let mut next = fetch_offset;
    let mut leader_epoch = -1;
    let mut bytes_read = 0;
    let stop = loop {
        if records.len() >= max_records {
            break Stop::Limit;
        }
        let rest = &buf[pos..];
        if rest.len() < LOG_OVERHEAD {
            break Stop::End;
        }
        let base_offset = be_i64(rest, 0);
        let corrupt = |what| BatchError::Corrupt { base_offset, what };
        let length = usize::try_from(be_i32(rest, 8)).map_err(|_| corrupt("negative length"))?;
        let Some(total) = length
            .checked_add(LOG_OVERHEAD)
            .filter(|t| *t <= rest.len())
        else {
            // A fetch may end in the middle of a batch.
            break Stop::End;
        };
        let batch = &rest[..total];
        if total < LOG_OVERHEAD + 5 {
            return Err(corrupt("shorter than a batch header"));
        }
        if batch[16] != 2 {
            break Stop::Unsupported;
        }
        if total < BATCH_HEADER {
            return Err(corrupt("shorter than a batch header"));
        }
        if check_crc {
            let stored = be_u32(batch, 17);
            let computed = crc32c::crc32c(&batch[21..]);
            if stored != computed {
                return Err(BatchError::Crc {
                    base_offset,
                    stored,
                    computed,
                });
            }
        }
        let attributes = be_i16(batch, 21);
        let last_offset_delta = be_i32(batch, 23);
        let batch_next = base_offset + i64::from(last_offset_delta) + 1;
        if attributes & COMPRESSION_MASK != 0 {
            break Stop::Unsupported;
        }
        leader_epoch = be_i32(batch, 12);
        if attributes & CONTROL_BIT != 0 {
            pos += total;
            bytes_read += total;
            next = next.max(batch_next);
            continue;
        }
        let log_append = attributes & TIMESTAMP_TYPE_BIT != 0;
        let base_timestamp = be_i64(batch, 27);
        let max_timestamp = be_i64(batch, 35);
        let count = be_i32(batch, 57);
        if count < 0 {
            return Err(corrupt("negative record count"));
        }
        let mut p = BATCH_HEADER;
        let mut limited = false;
        for i in 0..count {
            let bad = || corrupt("a record runs past the end of its batch");
            let len = varint(batch, &mut p).ok_or_else(bad)?;
            let len = usize::try_from(len).map_err(|_| corrupt("negative record length"))?;
            let rec_end = p.checked_add(len).filter(|e| *e <= total).ok_or_else(bad)?;
            let rec = &batch[..rec_end];
            let malformed = || corrupt("malformed record");
            p += 1; // attributes, unused
            let ts_delta = read_varlong(rec, &mut p).ok_or_else(malformed)?;
            let offset_delta = varint(rec, &mut p).ok_or_else(malformed)?;
            let key = field(rec, &mut p, pos).ok_or_else(malformed)?;
            let value = field(rec, &mut p, pos).ok_or_else(malformed)?;
            let header_count = varint(rec, &mut p).ok_or_else(malformed)?;
            let header_count =
                u32::try_from(header_count).map_err(|_| corrupt("negative header count"))?;
            let headers_at = pos + p;
            let mut encoding: Option<Span> = None;
            for _ in 0..header_count {
                let hkey = field(rec, &mut p, pos).ok_or_else(malformed)?;
                if hkey.len < 0 {
                    return Err(corrupt("a null header key"));
                }
                let hvalue = field(rec, &mut p, pos).ok_or_else(malformed)?;
                if encoding.is_none() && hkey.get(buf) == Some(ENCODING_HEADER) {
                    encoding = Some(hvalue);
                }
            }
            if p != rec_end {
                return Err(corrupt("a record's length does not match its fields"));
            }
            let offset = base_offset + i64::from(offset_delta);
            if offset < next {
                continue;
            }
            records.offsets.push(offset);
            records.timestamps.push(if log_append {
                max_timestamp
            } else {
                base_timestamp.wrapping_add(ts_delta)
            });
            records.timestamp_types.push(u8::from(log_append));
            records.keys.push(key);
            records.values.push(value);
            records.headers.push((headers_at, header_count));
            let code = match encoding.and_then(|s| s.get(buf)) {
                Some(v) => records.encoding_code(v),
                None => 0,
            };
            records.encodings.push(code);
            next = offset + 1;
            if records.len() >= max_records && i + 1 < count {
                limited = true;
                break;
            }
        }
        if limited {
            // Scan this batch again next time; its records below `next` are skipped.
            break Stop::Limit;
        }
        if p != total {
            return Err(corrupt("bytes after the last record"));
        }
        pos += total;
        bytes_read += total;
        next = next.max(batch_next);
    };
    Ok(Scan {
        records,
        end: pos,
        next_offset: next,
        stop,
        leader_epoch,
        bytes_read,
    })
}

/// One record header: its key and its value (None for null).
pub type Header<'a> = (&'a [u8], Option<&'a [u8]>);

/// The headers of a record as (key, value) pairs, from [`Records::headers`].
#[must_use]
pub fn headers(buf: &[u8], at: usize, count: u32) -> Option<Vec<Header<'_>>> {
    let mut p = at;
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let key = field(buf, &mut p, 0)?;
        let value = field(buf, &mut p, 0)?;
        out.push((key.get(buf)?, value.get(buf)));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_varlong(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let byte = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn put_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
        match b {
            None => put_varlong(out, -1),
            Some(b) => {
                put_varlong(out, b.len() as i64);
                out.extend_from_slice(b);
            }
        }
    }

    struct Rec<'a> {
        ts_delta: i64,
        offset_delta: i32,
        key: Option<&'a [u8]>,
        value: Option<&'a [u8]>,
        headers: Vec<(&'a [u8], Option<&'a [u8]>)>,
    }

    fn rec(offset_delta: i32, value: Option<&[u8]>) -> Rec<'_> {
        Rec {
            ts_delta: i64::from(offset_delta) * 10,
            offset_delta,
            key: Some(b"1001"),
            value,
            headers: vec![],
        }
    }

    fn record_bytes(r: &Rec<'_>) -> Vec<u8> {
        let mut body = vec![0u8];
        put_varlong(&mut body, r.ts_delta);
        put_varlong(&mut body, i64::from(r.offset_delta));
        put_bytes(&mut body, r.key);
        put_bytes(&mut body, r.value);
        put_varlong(&mut body, r.headers.len() as i64);
        for (k, v) in &r.headers {
            put_bytes(&mut body, Some(k));
            put_bytes(&mut body, *v);
        }
        let mut out = Vec::new();
        put_varlong(&mut out, body.len() as i64);
        out.extend(body);
        out
    }

    fn batch(base_offset: i64, attributes: i16, records: &[Rec<'_>]) -> Vec<u8> {
        let last_delta = records.iter().map(|r| r.offset_delta).max().unwrap_or(0);
        let body: Vec<u8> = records.iter().flat_map(record_bytes).collect();
        batch_raw(
            base_offset,
            attributes,
            last_delta,
            records.len() as i32,
            &body,
        )
    }

    fn batch_raw(
        base_offset: i64,
        attributes: i16,
        last_delta: i32,
        count: i32,
        body: &[u8],
    ) -> Vec<u8> {
        let mut after_crc = Vec::new();
        after_crc.extend(attributes.to_be_bytes());
        after_crc.extend(last_delta.to_be_bytes());
        after_crc.extend(1_000_000i64.to_be_bytes()); // base timestamp
        after_crc.extend(2_000_000i64.to_be_bytes()); // max timestamp
        after_crc.extend((-1i64).to_be_bytes()); // producer id
        after_crc.extend((-1i16).to_be_bytes()); // producer epoch
        after_crc.extend((-1i32).to_be_bytes()); // base sequence
        after_crc.extend(count.to_be_bytes());
        after_crc.extend_from_slice(body);
        let mut out = Vec::new();
        out.extend(base_offset.to_be_bytes());
        out.extend(((after_crc.len() + 9) as i32).to_be_bytes());
        out.extend(7i32.to_be_bytes()); // leader epoch
        out.push(2);
        out.extend(crc32c::crc32c(&after_crc).to_be_bytes());
        out.extend(after_crc);
        out
    }

    fn values<'a>(buf: &'a [u8], s: &Scan) -> Vec<Option<&'a [u8]>> {
        s.records.values.iter().map(|v| v.get(buf)).collect()
    }

    #[test]
    fn varints_round_trip_and_reject_overlong() {
        for v in [
            0i64,
            1,
            -1,
            63,
            -64,
            64,
            300,
            -300,
            i64::from(i32::MAX),
            i64::from(i32::MIN),
        ] {
            let mut b = Vec::new();
            put_varlong(&mut b, v);
            let mut p = 0;
            assert_eq!(varint(&b, &mut p), Some(v as i32));
            assert_eq!(p, b.len());
        }
        for v in [i64::MAX, i64::MIN, 1 << 40] {
            let mut b = Vec::new();
            put_varlong(&mut b, v);
            let mut p = 0;
            assert_eq!(read_varlong(&b, &mut p), Some(v));
            let mut p = 0;
            assert_eq!(varint(&b, &mut p), None, "{v} does not fit a varint");
        }
        // Five continuation bytes never end a varint; a cut one is None.
        let mut p = 0;
        assert_eq!(varint(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], &mut p), None);
        let mut p = 0;
        assert_eq!(varint(&[0x80], &mut p), None);
        // Zig-zag: 1 is -1, 2 is 1.
        let mut p = 0;
        assert_eq!(varint(&[1], &mut p), Some(-1));
    }

    #[test]
    fn reads_offsets_values_keys_and_timestamps() {
        let buf = [
            batch(100, 0, &[rec(0, Some(b"{\"a\":1}")), rec(1, Some(b"x"))]),
            batch(102, 0, &[rec(0, Some(b"")), rec(2, Some(b"zz"))]),
        ]
        .concat();
        let s = scan(&buf, 0, 100, usize::MAX, true).unwrap();
        assert_eq!(s.stop, Stop::End);
        assert_eq!(s.end, buf.len());
        assert_eq!(s.bytes_read, buf.len());
        assert_eq!(s.records.offsets, vec![100, 101, 102, 104]);
        assert_eq!(s.next_offset, 105);
        assert_eq!(s.leader_epoch, 7);
        assert_eq!(
            values(&buf, &s),
            vec![Some(&b"{\"a\":1}"[..]), Some(b"x"), Some(b""), Some(b"zz")]
        );
        assert_eq!(s.records.keys[0].get(&buf), Some(&b"1001"[..]));
        assert_eq!(
            s.records.timestamps,
            vec![1_000_000, 1_000_010, 1_000_000, 1_000_020]
        );
        assert_eq!(s.records.timestamp_types, vec![0, 0, 0, 0]);
    }

    #[test]
    fn null_keys_values_and_headers() {
        let r = Rec {
            ts_delta: 0,
            offset_delta: 0,
            key: None,
            value: None,
            headers: vec![
                (b"trace", None),
                (b"encoding", Some(b"arrow-ipc-v1")),
                (b"encoding", Some(b"json")),
            ],
        };
        let mut r2 = rec(1, Some(b"{}"));
        r2.headers = vec![(b"encoding", Some(b""))];
        let mut r3 = rec(2, Some(b"{}"));
        r3.headers = vec![(b"encoding", Some(b"arrow-ipc-v1"))];
        let buf = batch(0, 0, &[r, r2, r3]);
        let s = scan(&buf, 0, 0, usize::MAX, true).unwrap();
        assert_eq!(s.records.keys[0], Span::NULL);
        assert_eq!(values(&buf, &s)[0], None);
        // The first `encoding` header counts; an empty one means none.
        assert_eq!(s.records.encodings, vec![1, 0, 1]);
        assert_eq!(s.records.encoding_names, vec![b"arrow-ipc-v1".to_vec()]);
        let (at, n) = s.records.headers[0];
        let h = headers(&buf, at, n).unwrap();
        assert_eq!(
            h,
            vec![
                (&b"trace"[..], None),
                (&b"encoding"[..], Some(&b"arrow-ipc-v1"[..])),
                (&b"encoding"[..], Some(&b"json"[..])),
            ]
        );
        let (at, n) = s.records.headers[1];
        assert_eq!(
            headers(&buf, at, n).unwrap(),
            vec![(&b"encoding"[..], Some(&b""[..]))]
        );
    }

    #[test]
    fn control_batches_are_skipped_and_move_the_offset() {
        let buf = [
            batch(0, 0, &[rec(0, Some(b"a"))]),
            batch(1, CONTROL_BIT, &[rec(0, Some(b"marker"))]),
            batch(2, 0, &[rec(0, Some(b"b"))]),
            batch(3, CONTROL_BIT, &[rec(0, Some(b"marker"))]),
        ]
        .concat();
        let s = scan(&buf, 0, 0, usize::MAX, true).unwrap();
        assert_eq!(s.records.offsets, vec![0, 2]);
        assert_eq!(values(&buf, &s), vec![Some(&b"a"[..]), Some(b"b")]);
        assert_eq!(s.next_offset, 4);
        assert_eq!(s.end, buf.len());
    }

    #[test]
    fn log_append_time_uses_the_max_timestamp() {
        let buf = batch(
            0,
            TIMESTAMP_TYPE_BIT,
            &[rec(0, Some(b"a")), rec(1, Some(b"b"))],
        );
        let s = scan(&buf, 0, 0, usize::MAX, true).unwrap();
        assert_eq!(s.records.timestamps, vec![2_000_000, 2_000_000]);
        assert_eq!(s.records.timestamp_types, vec![1, 1]);
    }

    #[test]
    fn records_below_the_fetch_offset_are_skipped() {
        let buf = batch(
            10,
            0,
            &[rec(0, Some(b"a")), rec(1, Some(b"b")), rec(2, Some(b"c"))],
        );
        let s = scan(&buf, 0, 11, usize::MAX, true).unwrap();
        assert_eq!(s.records.offsets, vec![11, 12]);
        assert_eq!(s.next_offset, 13);
    }

    #[test]
    fn a_limit_mid_batch_resumes_in_that_batch() {
        let buf = [
            batch(
                0,
                0,
                &[rec(0, Some(b"a")), rec(1, Some(b"b")), rec(2, Some(b"c"))],
            ),
            batch(3, 0, &[rec(0, Some(b"d"))]),
        ]
        .concat();
        let first_len = buf.len() - batch(3, 0, &[rec(0, Some(b"d"))]).len();
        let s = scan(&buf, 0, 0, 2, true).unwrap();
        assert_eq!((s.stop, s.end, s.next_offset), (Stop::Limit, 0, 2));
        assert_eq!(s.records.offsets, vec![0, 1]);
        let s = scan(&buf, s.end, s.next_offset, 1, true).unwrap();
        // The limit falls on the batch's last record: the batch is finished.
        assert_eq!((s.stop, s.end, s.next_offset), (Stop::Limit, first_len, 3));
        assert_eq!(s.records.offsets, vec![2]);
        let s = scan(&buf, s.end, s.next_offset, 10, true).unwrap();
        assert_eq!((s.stop, s.end, s.next_offset), (Stop::End, buf.len(), 4));
        assert_eq!(values(&buf, &s), vec![Some(&b"d"[..])]);
    }

    #[test]
    fn a_partial_trailing_batch_ends_the_scan() {
        let whole = batch(0, 0, &[rec(0, Some(b"a"))]);
        let next = batch(1, 0, &[rec(0, Some(b"b"))]);
        for cut in [
            1,
            LOG_OVERHEAD - 1,
            LOG_OVERHEAD,
            LOG_OVERHEAD + 5,
            next.len() - 1,
        ] {
            let buf = [&whole[..], &next[..cut]].concat();
            let s = scan(&buf, 0, 0, usize::MAX, true).unwrap();
            assert_eq!(s.stop, Stop::End, "cut at {cut}");
            assert_eq!(s.records.offsets, vec![0]);
            assert_eq!(s.end, whole.len());
            assert_eq!(s.next_offset, 1);
        }
        let s = scan(&[], 0, 5, usize::MAX, true).unwrap();
        assert_eq!((s.stop, s.end, s.next_offset), (Stop::End, 0, 5));
        assert!(s.records.is_empty());
    }

    #[test]
    fn a_bad_crc_is_an_error_unless_unchecked() {
        let mut buf = batch(42, 0, &[rec(0, Some(b"value"))]);
        // The value's last byte (the record ends with its header count).
        let last = buf.len() - 2;
        buf[last] ^= 0x01;
        let err = scan(&buf, 0, 0, usize::MAX, true).unwrap_err();
        assert!(
            matches!(
                err,
                BatchError::Crc {
                    base_offset: 42,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("offset 42"));
        assert!(scan(&buf, 0, 0, usize::MAX, false).is_ok());
    }

    #[test]
    fn compressed_and_old_batches_stop_the_scan() {
        let plain = batch(0, 0, &[rec(0, Some(b"a"))]);
        for codec in 1..=4 {
            let buf = [plain.clone(), batch(1, codec, &[rec(0, Some(b"b"))])].concat();
            let s = scan(&buf, 0, 0, usize::MAX, true).unwrap();
            assert_eq!(
                (s.stop, s.end, s.next_offset),
                (Stop::Unsupported, plain.len(), 1)
            );
            assert_eq!(s.records.offsets, vec![0]);
        }
        let mut old = batch(1, 0, &[rec(0, Some(b"b"))]);
        old[16] = 1;
        let buf = [plain.clone(), old].concat();
        let s = scan(&buf, 0, 0, usize::MAX, true).unwrap();
        assert_eq!((s.stop, s.end), (Stop::Unsupported, plain.len()));
    }

    #[test]
    fn malformed_records_are_corrupt() {
        let good = record_bytes(&rec(0, Some(b"abc")));
        // A record length past the batch end.
        let mut long = good.clone();
        long[0] = 0x7e; // zig-zag 63
                        // A negative record length.
        let mut negative = good.clone();
        negative[0] = 0x03; // zig-zag -2
                            // A value length of -2.
        let mut bad_value = vec![0u8];
        put_varlong(&mut bad_value, 0);
        put_varlong(&mut bad_value, 0);
        put_bytes(&mut bad_value, None);
        put_varlong(&mut bad_value, -2);
        put_varlong(&mut bad_value, 0);
        let mut framed = Vec::new();
        put_varlong(&mut framed, bad_value.len() as i64);
        framed.extend(bad_value);
        // A record whose length leaves bytes unread.
        let mut padded_body = good[1..].to_vec();
        padded_body.push(0);
        let mut padded = Vec::new();
        put_varlong(&mut padded, padded_body.len() as i64);
        padded.extend(padded_body);
        // A null header key.
        let mut null_key = vec![0u8];
        put_varlong(&mut null_key, 0);
        put_varlong(&mut null_key, 0);
        put_bytes(&mut null_key, None);
        put_bytes(&mut null_key, Some(b"v"));
        put_varlong(&mut null_key, 1);
        put_varlong(&mut null_key, -1);
        put_bytes(&mut null_key, None);
        let mut null_key_framed = Vec::new();
        put_varlong(&mut null_key_framed, null_key.len() as i64);
        null_key_framed.extend(null_key);
        for (name, body, count) in [
            ("long", long, 1),
            ("negative", negative, 1),
            ("bad value", framed, 1),
            ("padded", padded, 1),
            ("null header key", null_key_framed, 1),
            ("count too high", good.clone(), 2),
            ("count negative", good.clone(), -1),
            ("count too low", [good.clone(), good.clone()].concat(), 1),
        ] {
            let buf = batch_raw(5, 0, 0, count, &body);
            let err = scan(&buf, 0, 0, usize::MAX, true).unwrap_err();
            assert!(
                matches!(err, BatchError::Corrupt { base_offset: 5, .. }),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn corrupt_batch_headers() {
        // Negative batch length.
        let mut buf = batch(9, 0, &[rec(0, Some(b"a"))]);
        buf[8..12].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(scan(&buf, 0, 0, usize::MAX, true).is_err());
        // A length that leaves no room for a v2 header.
        let mut short = batch(9, 0, &[]);
        short[8..12].copy_from_slice(&20i32.to_be_bytes());
        short.truncate(32);
        let err = scan(&short, 0, 0, usize::MAX, false).unwrap_err();
        assert!(
            matches!(err, BatchError::Corrupt { base_offset: 9, .. }),
            "{err}"
        );
        // An empty batch (all records compacted away) still moves the offset.
        let empty = batch_raw(20, 0, 4, 0, &[]);
        let s = scan(&empty, 0, 20, usize::MAX, true).unwrap();
        assert!(s.records.is_empty());
        assert_eq!(s.next_offset, 25);
    }
}
