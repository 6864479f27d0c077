//! DNS messages (RFC 1035 §4) as zero-copy views over the caller's bytes, and a writer that
//! builds a response into a caller-owned buffer. Only what an embedded resolver needs: the
//! header, one question, the EDNS0 OPT record (RFC 6891), and A/PTR answers. Nothing here
//! allocates, and every reader checks lengths before it reads.

use std::net::Ipv4Addr;

use rand::Rng;

/// Byte ranges of the header fields.
pub mod field {
    use core::ops::Range;
    /// Message ID, echoed in the response.
    pub const ID: Range<usize> = 0..2;
    /// QR, opcode, AA, TC, RD, RA, Z, AD, CD, RCODE.
    pub const FLAGS: Range<usize> = 2..4;
    /// Number of questions.
    pub const QDCOUNT: Range<usize> = 4..6;
    /// Number of answer records.
    pub const ANCOUNT: Range<usize> = 6..8;
    /// Number of authority records.
    pub const NSCOUNT: Range<usize> = 8..10;
    /// Number of additional records.
    pub const ARCOUNT: Range<usize> = 10..12;
    /// Where the question section starts.
    pub const QUESTION: usize = 12;
}

/// Length of the DNS header.
pub const HEADER_LEN: usize = field::QUESTION;
/// Longest name on the wire, root byte included (RFC 1035 §3.1).
pub const MAX_NAME_LEN: usize = 255;
/// Longest name in dotted text (no trailing dot): 255 minus the first length byte and the root.
pub const MAX_TEXT_LEN: usize = 253;
/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Compression pointers followed in one name at most. Pointers must also point strictly
/// before the labels they end, so a loop is impossible either way; this only bounds the work.
pub const MAX_POINTERS: usize = 16;
/// The largest message (TCP's length prefix is 16 bits).
pub const MAX_MESSAGE_LEN: usize = 65535;
/// The UDP payload every client accepts (RFC 1035 §4.2.1), and the floor of an EDNS size.
pub const MIN_UDP_PAYLOAD: usize = 512;
/// Length of an OPT record with no options: root name, type, class, TTL, RDLENGTH.
pub const OPT_LEN: usize = 11;
/// Length of an A record whose owner is a compression pointer to the question.
pub const A_RECORD_LEN: usize = 16;

/// Record types this crate names.
pub mod rtype {
    /// IPv4 address.
    pub const A: u16 = 1;
    /// Domain name pointer (reverse lookups).
    pub const PTR: u16 = 12;
    /// Service location (RFC 2782).
    pub const SRV: u16 = 33;
    /// IPv6 address.
    pub const AAAA: u16 = 28;
    /// EDNS0 pseudo-record.
    pub const OPT: u16 = 41;
    /// Any type (QTYPE only).
    pub const ANY: u16 = 255;
}

/// The Internet class.
pub const CLASS_IN: u16 = 1;
/// The standard query opcode; every other opcode is answered NOTIMP.
pub const OPCODE_QUERY: u8 = 0;

/// Response codes (RFC 1035 §4.1.1), the 4-bit header field.
pub mod rcode {
    /// No error.
    pub const NOERROR: u8 = 0;
    /// The query could not be interpreted.
    pub const FORMERR: u8 = 1;
    /// The server could not answer (here: every upstream failed, or none is configured).
    pub const SERVFAIL: u8 = 2;
    /// The name does not exist.
    pub const NXDOMAIN: u8 = 3;
    /// The kind of query is not supported.
    pub const NOTIMP: u8 = 4;
    /// The server will not answer this query.
    pub const REFUSED: u8 = 5;

    /// The name of a response code in metrics (`overlayd_dns_answers_total{rcode="…"}`).
    pub const fn name(rcode: u8) -> &'static str {
        const NAMES: [&str; 16] = [
            "noerror",
            "formerr",
            "servfail",
            "nxdomain",
            "notimp",
            "refused",
            "yxdomain",
            "yxrrset",
            "nxrrset",
            "notauth",
            "notzone",
            "dsotypeni",
            "rcode12",
            "rcode13",
            "rcode14",
            "rcode15",
        ];
        NAMES[(rcode & 0x0f) as usize]
    }
}

mod flag {
    pub const QR: u16 = 0x8000;
    pub const OPCODE_SHIFT: u16 = 11;
    pub const AA: u16 = 0x0400;
    pub const TC: u16 = 0x0200;
    pub const RD: u16 = 0x0100;
    pub const RA: u16 = 0x0080;
    pub const CD: u16 = 0x0010;
    pub const RCODE: u16 = 0x000f;
}

macro_rules! wire_errors {
    ($( $(#[doc = $doc:literal])* $variant:ident = $name:literal, )*) => {
        /// Why a message was refused as malformed. Every variant has its own counter.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
        pub enum WireError { $( $(#[doc = $doc])* #[error($name)] $variant, )* }

        impl WireError {
            /// Every error, in counter order (`self as usize` indexes it).
            pub const ALL: &'static [WireError] = &[$(WireError::$variant),*];
            /// How many there are.
            pub const COUNT: usize = Self::ALL.len();

            /// The error's name in metrics (`overlayd_dns_malformed_total{reason="…"}`).
            pub const fn name(self) -> &'static str {
                match self { $(WireError::$variant => $name,)* }
            }
        }
    };
}

wire_errors! {
    /// The message is shorter than the 12-byte header.
    ShortHeader = "short_header",
    /// QDCOUNT is not 1 (RFC 9619: a query carries exactly one question).
    QuestionCount = "question_count",
    /// A name runs past the end of the message.
    NameTruncated = "name_truncated",
    /// A label's top two bits are 01 or 10 (extended label types, never deployed).
    BadLabelType = "bad_label_type",
    /// A name is longer than 255 octets once its compression pointers are followed.
    NameTooLong = "name_too_long",
    /// A compression pointer does not point strictly before the labels it ends (a loop or a
    /// forward reference), or a name has more than [`MAX_POINTERS`] of them.
    BadPointer = "bad_pointer",
    /// The question's type and class run past the end of the message.
    QuestionTruncated = "question_truncated",
    /// A record after the question runs past the end of the message.
    RecordTruncated = "record_truncated",
    /// The additional section holds more than one OPT record (RFC 6891 §6.1.1).
    DuplicateOpt = "duplicate_opt",
    /// An OPT record's owner is not the root name (RFC 6891 §6.1.2).
    OptNotRoot = "opt_not_root",
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// A view of the 12-byte header:
///
/// ```text
///   0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
/// +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
/// |                      ID                       |
/// |QR|   Opcode  |AA|TC|RD|RA| Z|AD|CD|   RCODE   |
/// |                    QDCOUNT                    |
/// |                    ANCOUNT                    |
/// |                    NSCOUNT                    |
/// |                    ARCOUNT                    |
/// +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
/// ```
///
/// [`Header::new_checked`], the only constructor, checks the length once, so no accessor can
/// panic afterwards.
#[derive(Debug, Clone, Copy)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wraps a message after checking that it holds a full header.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::ShortHeader);
        }
        Ok(Header { buffer })
    }

    /// The whole message the header starts.
    #[inline]
    pub fn message(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The message ID.
    #[inline]
    pub fn id(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ID.start)
    }

    /// The flags word.
    #[inline]
    pub fn flags(&self) -> u16 {
        be16(self.buffer.as_ref(), field::FLAGS.start)
    }

    /// QR: this is a response.
    #[inline]
    pub fn is_response(&self) -> bool {
        self.flags() & flag::QR != 0
    }

    /// The 4-bit opcode.
    #[inline]
    pub fn opcode(&self) -> u8 {
        ((self.flags() >> flag::OPCODE_SHIFT) & 0x0f) as u8
    }

    /// AA: the answer comes from an authority for the name.
    #[inline]
    pub fn authoritative(&self) -> bool {
        self.flags() & flag::AA != 0
    }

    /// TC: the message was truncated.
    #[inline]
    pub fn truncated(&self) -> bool {
        self.flags() & flag::TC != 0
    }

    /// RD: the client wants recursion.
    #[inline]
    pub fn recursion_desired(&self) -> bool {
        self.flags() & flag::RD != 0
    }

    /// RA: the server offers recursion.
    #[inline]
    pub fn recursion_available(&self) -> bool {
        self.flags() & flag::RA != 0
    }

    /// The 4-bit response code (see [`rcode`]).
    #[inline]
    pub fn rcode(&self) -> u8 {
        (self.flags() & flag::RCODE) as u8
    }

    /// Number of questions.
    #[inline]
    pub fn qdcount(&self) -> u16 {
        be16(self.buffer.as_ref(), field::QDCOUNT.start)
    }

    /// Number of answer records.
    #[inline]
    pub fn ancount(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ANCOUNT.start)
    }

    /// Number of authority records.
    #[inline]
    pub fn nscount(&self) -> u16 {
        be16(self.buffer.as_ref(), field::NSCOUNT.start)
    }

    /// Number of additional records.
    #[inline]
    pub fn arcount(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ARCOUNT.start)
    }
}

impl<'a> Header<&'a [u8]> {
    /// The whole message, for as long as the bytes live.
    #[inline]
    pub fn bytes(&self) -> &'a [u8] {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Sets the message ID (the forwarder swaps a client's ID for its own and back).
    #[inline]
    pub fn set_id(&mut self, id: u16) {
        self.buffer.as_mut()[field::ID].copy_from_slice(&id.to_be_bytes());
    }
}

/// Walks a name starting at `start`: returns its uncompressed wire length and the offset just
/// past it as stored (after its root byte, or after its first compression pointer).
fn walk_name(msg: &[u8], start: usize) -> Result<(usize, usize), WireError> {
    let mut pos = start;
    // Where the run of labels being read began: a pointer must point strictly before it, so
    // the positions visited strictly decrease at every jump and a loop cannot happen.
    let mut run_start = start;
    let mut end = None;
    let mut len = 0usize;
    let mut pointers = 0;
    loop {
        let &b = msg.get(pos).ok_or(WireError::NameTruncated)?;
        match b & 0xc0 {
            0x00 => {
                let label = b as usize;
                len += 1 + label;
                if len > MAX_NAME_LEN {
                    return Err(WireError::NameTooLong);
                }
                if label == 0 {
                    return Ok((len, end.unwrap_or(pos + 1)));
                }
                if pos + 1 + label > msg.len() {
                    return Err(WireError::NameTruncated);
                }
                pos += 1 + label;
            }
            0xc0 => {
                let &low = msg.get(pos + 1).ok_or(WireError::NameTruncated)?;
                let target = (((b & 0x3f) as usize) << 8) | low as usize;
                if target >= run_start || pointers == MAX_POINTERS {
                    return Err(WireError::BadPointer);
                }
                pointers += 1;
                end.get_or_insert(pos + 2);
                pos = target;
                run_start = target;
            }
            _ => return Err(WireError::BadLabelType),
        }
    }
}

/// Skips a stored name without following its pointers; returns the offset just past it.
fn skip_name(msg: &[u8], mut pos: usize) -> Result<usize, WireError> {
    loop {
        let &b = msg.get(pos).ok_or(WireError::NameTruncated)?;
        match b & 0xc0 {
            0x00 if b == 0 => return Ok(pos + 1),
            0x00 => pos += 1 + b as usize,
            0xc0 if pos + 1 < msg.len() => return Ok(pos + 2),
            0xc0 => return Err(WireError::NameTruncated),
            _ => return Err(WireError::BadLabelType),
        }
    }
}

/// A validated domain name inside a message, compression pointers and all. Reading it again
/// (its labels, its text) cannot fail.
#[derive(Debug, Clone, Copy)]
pub struct Name<'a> {
    msg: &'a [u8],
    start: usize,
    wire_len: usize,
}

impl<'a> Name<'a> {
    /// Parses the name at `start` of `msg`; returns it and the offset just past it as stored.
    pub fn parse(msg: &'a [u8], start: usize) -> Result<(Name<'a>, usize), WireError> {
        let (wire_len, end) = walk_name(msg, start)?;
        Ok((Name { msg, start, wire_len }, end))
    }

    /// The length of the name written without compression, root byte included (1 for the root).
    pub fn wire_len(&self) -> usize {
        self.wire_len
    }

    /// The labels, pointers followed, without the root.
    pub fn labels(&self) -> Labels<'a> {
        Labels { msg: self.msg, pos: self.start, pointers: 0 }
    }

    /// The name in lower-case dotted text without the trailing dot (empty for the root),
    /// written into `buf`; `None` if a label holds a `.` byte, which no name of ours does.
    pub fn lower_text<'b>(&self, buf: &'b mut [u8; MAX_TEXT_LEN]) -> Option<&'b [u8]> {
        let mut len = 0;
        for label in self.labels() {
            if label.contains(&b'.') {
                return None;
            }
            // `wire_len` ≤ 255 bounds the text to 253 bytes, so these never overflow `buf`;
            // `get_mut` keeps the method panic-free all the same.
            if len > 0 {
                *buf.get_mut(len)? = b'.';
                len += 1;
            }
            let dst = buf.get_mut(len..len + label.len())?;
            for (d, s) in dst.iter_mut().zip(label) {
                *d = s.to_ascii_lowercase();
            }
            len += label.len();
        }
        Some(&buf[..len])
    }

    /// Whether two names are equal, ignoring ASCII case (RFC 4343).
    pub fn eq_ignore_ascii_case(&self, other: &Name<'_>) -> bool {
        self.wire_len == other.wire_len && self.labels().eq_by_case(other.labels())
    }

    /// Writes the name uncompressed at the start of `out`; `None` if it does not fit.
    fn write_uncompressed(&self, out: &mut [u8]) -> Option<usize> {
        let dst = out.get_mut(..self.wire_len)?;
        let mut at = 0;
        for label in self.labels() {
            dst[at] = label.len() as u8;
            dst[at + 1..at + 1 + label.len()].copy_from_slice(label);
            at += 1 + label.len();
        }
        dst[at] = 0;
        Some(self.wire_len)
    }
}

/// The labels of a [`Name`], compression pointers followed.
#[derive(Debug, Clone)]
pub struct Labels<'a> {
    msg: &'a [u8],
    pos: usize,
    pointers: usize,
}

impl<'a> Labels<'a> {
    fn eq_by_case(mut self, mut other: Labels<'_>) -> bool {
        loop {
            match (self.next(), other.next()) {
                (None, None) => return true,
                (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => {}
                _ => return false,
            }
        }
    }
}

impl<'a> Iterator for Labels<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        // The name was validated by `walk_name`; the bounds checks and the pointer budget only
        // make a broken invariant end the iteration instead of panicking or looping.
        loop {
            let b = *self.msg.get(self.pos)?;
            if b & 0xc0 == 0xc0 {
                if self.pointers == MAX_POINTERS {
                    return None;
                }
                self.pointers += 1;
                self.pos = (((b & 0x3f) as usize) << 8) | *self.msg.get(self.pos + 1)? as usize;
                continue;
            }
            if b == 0 {
                return None;
            }
            let label = self.msg.get(self.pos + 1..self.pos + 1 + b as usize)?;
            self.pos += 1 + b as usize;
            return Some(label);
        }
    }
}

/// The question of a message: a name, a type and a class.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    /// QNAME.
    pub name: Name<'a>,
    /// QTYPE (see [`rtype`]).
    pub qtype: u16,
    /// QCLASS ([`CLASS_IN`] for everything this crate answers).
    pub qclass: u16,
    /// The offset just past the question in the message.
    pub end: usize,
}

impl<'a> Question<'a> {
    /// The question of a query: QDCOUNT must be 1.
    pub fn parse(header: &Header<&'a [u8]>) -> Result<Question<'a>, WireError> {
        if header.qdcount() != 1 {
            return Err(WireError::QuestionCount);
        }
        Self::parse_first(header.bytes())
    }

    /// The first question of a message whose header says it has at least one.
    pub fn parse_first(msg: &'a [u8]) -> Result<Question<'a>, WireError> {
        let (name, at) = Name::parse(msg, field::QUESTION)?;
        let fixed = msg.get(at..at + 4).ok_or(WireError::QuestionTruncated)?;
        Ok(Question { name, qtype: be16(fixed, 0), qclass: be16(fixed, 2), end: at + 4 })
    }

    /// Same name (ignoring case), type and class.
    pub fn same_as(&self, other: &Question<'_>) -> bool {
        self.qtype == other.qtype && self.qclass == other.qclass && self.name.eq_ignore_ascii_case(&other.name)
    }
}

/// What a query's OPT record says (RFC 6891 §6.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The largest UDP payload the requester accepts.
    pub udp_payload: u16,
    /// The EDNS version (0 is the only one; others are answered as version 0).
    pub version: u8,
    /// DO: the requester wants DNSSEC records (copied into the response, RFC 3225 §3).
    pub dnssec_ok: bool,
}

/// Finds the OPT record of a message whose question ends at `question_end`: skips the answer
/// and authority records and reads the additional ones.
pub fn find_edns(header: &Header<&[u8]>, question_end: usize) -> Result<Option<Edns>, WireError> {
    let msg = header.message();
    let mut pos = question_end;
    let mut edns = None;
    let before_additional = header.ancount() as usize + header.nscount() as usize;
    // Every record takes at least 11 bytes, so the counts cannot make this loop longer than
    // the message allows: a short message fails with `RecordTruncated` first.
    for i in 0..before_additional + header.arcount() as usize {
        let owner = pos;
        pos = skip_name(msg, pos).map_err(|_| WireError::RecordTruncated)?;
        let fixed = msg.get(pos..pos + 10).ok_or(WireError::RecordTruncated)?;
        let rdlen = be16(fixed, 8) as usize;
        pos += 10 + rdlen;
        if pos > msg.len() {
            return Err(WireError::RecordTruncated);
        }
        if i >= before_additional && be16(fixed, 0) == rtype::OPT {
            if msg[owner] != 0 {
                return Err(WireError::OptNotRoot);
            }
            if edns.is_some() {
                return Err(WireError::DuplicateOpt);
            }
            edns = Some(Edns { udp_payload: be16(fixed, 2), version: fixed[5], dnssec_ok: fixed[6] & 0x80 != 0 });
        }
    }
    Ok(edns)
}

/// Why the [`ResponseWriter`] refused to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The record does not fit under the writer's limit (the buffer's length or the
    /// transport's maximum, minus the room kept for the OPT record).
    #[error("the response is full")]
    Full,
    /// An answer was written before the question it points at.
    #[error("answer written before the question")]
    NoQuestion,
    /// A PTR target is not a DNS name (an empty label, one longer than 63 bytes, or longer
    /// than 255 bytes in all).
    #[error("PTR target is not a DNS name")]
    BadName,
}

/// Builds a response in a caller-owned buffer: header, the question, answers, then the OPT
/// record if [`ResponseWriter::edns`] asked for one. Answers name their owner with a
/// compression pointer to the question (offset 12).
#[derive(Debug)]
pub struct ResponseWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
    /// Where records must end: the limit, less the room kept for the OPT record.
    limit: usize,
    ancount: u16,
    has_question: bool,
    opt: Option<(u16, bool)>,
}

impl<'a> ResponseWriter<'a> {
    /// Starts a response to `query`: its ID, opcode, RD and CD; QR and `rcode` set; RA as
    /// given; no records. The response will not exceed `limit` bytes nor the buffer.
    pub fn new(
        buf: &'a mut [u8],
        limit: usize,
        query: &Header<&[u8]>,
        rcode: u8,
        recursion_available: bool,
    ) -> Result<Self, WriteError> {
        let limit = limit.min(buf.len()).min(MAX_MESSAGE_LEN);
        if limit < HEADER_LEN {
            return Err(WriteError::Full);
        }
        let q = query.flags();
        let mut flags = flag::QR | (q & (0x0f << flag::OPCODE_SHIFT)) | (q & (flag::RD | flag::CD));
        flags |= (rcode as u16) & flag::RCODE;
        if recursion_available {
            flags |= flag::RA;
        }
        buf[field::ID].copy_from_slice(&query.id().to_be_bytes());
        buf[field::FLAGS].copy_from_slice(&flags.to_be_bytes());
        buf[field::QDCOUNT.start..HEADER_LEN].fill(0);
        Ok(ResponseWriter { buf, len: HEADER_LEN, limit, ancount: 0, has_question: false, opt: None })
    }

    fn set_flag(&mut self, bit: u16, on: bool) {
        let mut f = be16(self.buf, field::FLAGS.start);
        if on {
            f |= bit;
        } else {
            f &= !bit;
        }
        self.buf[field::FLAGS].copy_from_slice(&f.to_be_bytes());
    }

    /// Sets AA: the answer comes from our own table.
    pub fn set_authoritative(&mut self, on: bool) {
        self.set_flag(flag::AA, on);
    }

    /// Sets TC: answers were left out.
    pub fn set_truncated(&mut self) {
        self.set_flag(flag::TC, true);
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing but the header yet.
    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    /// Bytes left for records under the limit.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.len)
    }

    /// Keeps room for an OPT record advertising `udp_payload`, written by [`Self::finish`].
    pub fn edns(&mut self, udp_payload: u16, dnssec_ok: bool) -> Result<(), WriteError> {
        if self.opt.is_some() {
            return Ok(());
        }
        if self.room() < OPT_LEN {
            return Err(WriteError::Full);
        }
        self.limit -= OPT_LEN;
        self.opt = Some((udp_payload, dnssec_ok));
        Ok(())
    }

    /// Writes the question, uncompressed, right after the header (so answers can point at it).
    pub fn question(&mut self, q: &Question<'_>) -> Result<(), WriteError> {
        if self.len != HEADER_LEN || self.room() < q.name.wire_len() + 4 {
            return Err(WriteError::Full);
        }
        let at = self.len;
        let n = q.name.write_uncompressed(&mut self.buf[at..]).ok_or(WriteError::Full)?;
        self.buf[at + n..at + n + 2].copy_from_slice(&q.qtype.to_be_bytes());
        self.buf[at + n + 2..at + n + 4].copy_from_slice(&q.qclass.to_be_bytes());
        self.len += n + 4;
        self.has_question = true;
        self.buf[field::QDCOUNT].copy_from_slice(&1u16.to_be_bytes());
        Ok(())
    }

    fn record_head(&mut self, rtype: u16, ttl: u32, rdlen: usize) -> Result<usize, WriteError> {
        if !self.has_question {
            return Err(WriteError::NoQuestion);
        }
        if self.room() < 12 + rdlen {
            return Err(WriteError::Full);
        }
        let at = self.len;
        let b = &mut self.buf[at..at + 12];
        b[0..2].copy_from_slice(&(0xc000u16 | field::QUESTION as u16).to_be_bytes());
        b[2..4].copy_from_slice(&rtype.to_be_bytes());
        b[4..6].copy_from_slice(&CLASS_IN.to_be_bytes());
        b[6..10].copy_from_slice(&ttl.to_be_bytes());
        b[10..12].copy_from_slice(&(rdlen as u16).to_be_bytes());
        Ok(at + 12)
    }

    fn end_record(&mut self, end: usize) {
        self.len = end;
        self.ancount += 1;
        self.buf[field::ANCOUNT].copy_from_slice(&self.ancount.to_be_bytes());
    }

    /// Appends an A record for the question's name.
    pub fn a(&mut self, ttl: u32, addr: Ipv4Addr) -> Result<(), WriteError> {
        let at = self.record_head(rtype::A, ttl, 4)?;
        self.buf[at..at + 4].copy_from_slice(&addr.octets());
        self.end_record(at + 4);
        Ok(())
    }

    /// Appends a PTR record for the question's name, pointing at the name made of the
    /// non-empty dotted texts in `parts` joined by dots (`["web1", "blue"]` → `web1.blue.`).
    /// Every label must be 1 to 63 bytes, as the name tables hold them.
    pub fn ptr(&mut self, ttl: u32, parts: &[&[u8]]) -> Result<(), WriteError> {
        self.name_record(rtype::PTR, ttl, &[], parts)
    }

    /// Appends an SRV record for the question's name (RFC 2782): priority, weight and port,
    /// then the target made of `parts` as [`ResponseWriter::ptr`] makes it.
    pub fn srv(&mut self, ttl: u32, priority: u16, weight: u16, port: u16, parts: &[&[u8]]) -> Result<(), WriteError> {
        let mut fixed = [0u8; 6];
        fixed[..2].copy_from_slice(&priority.to_be_bytes());
        fixed[2..4].copy_from_slice(&weight.to_be_bytes());
        fixed[4..].copy_from_slice(&port.to_be_bytes());
        self.name_record(rtype::SRV, ttl, &fixed, parts)
    }

    /// A record whose RDATA is `fixed` then an uncompressed name made of `parts`.
    fn name_record(&mut self, rtype: u16, ttl: u32, fixed: &[u8], parts: &[&[u8]]) -> Result<(), WriteError> {
        let parts = || parts.iter().filter(|p| !p.is_empty());
        let text_len: usize = parts().map(|p| p.len()).sum::<usize>() + parts().count().saturating_sub(1);
        let name_len = if text_len == 0 { 1 } else { text_len + 2 };
        if name_len > MAX_NAME_LEN
            || parts().flat_map(|p| p.split(|&b| b == b'.')).any(|l| l.is_empty() || l.len() > MAX_LABEL_LEN)
        {
            return Err(WriteError::BadName);
        }
        let at = self.record_head(rtype, ttl, fixed.len() + name_len)?;
        self.buf[at..at + fixed.len()].copy_from_slice(fixed);
        let mut w = at + fixed.len();
        for label in parts().flat_map(|p| p.split(|&b| b == b'.')) {
            self.buf[w] = label.len() as u8;
            self.buf[w + 1..w + 1 + label.len()].copy_from_slice(label);
            w += 1 + label.len();
        }
        self.buf[w] = 0;
        self.end_record(w + 1);
        Ok(())
    }

    /// Shuffles the addresses of the A records written from offset `first` on (Fisher–Yates
    /// over their RDATA, in place: the rest of each record is the same).
    pub fn shuffle_a<R: Rng + ?Sized>(&mut self, first: usize, rng: &mut R) {
        let records = &mut self.buf[first.min(self.len)..self.len];
        let n = records.len() / A_RECORD_LEN;
        for i in (1..n).rev() {
            let j = rng.gen_range(0..=i);
            if i != j {
                let (lo, hi) = records.split_at_mut(i * A_RECORD_LEN);
                lo[j * A_RECORD_LEN + 12..j * A_RECORD_LEN + 16].swap_with_slice(&mut hi[12..16]);
            }
        }
    }

    /// Writes the OPT record if one was asked for; returns the response's length.
    pub fn finish(self) -> usize {
        let mut len = self.len;
        if let Some((payload, dnssec_ok)) = self.opt {
            let b = &mut self.buf[len..len + OPT_LEN];
            b[0] = 0;
            b[1..3].copy_from_slice(&rtype::OPT.to_be_bytes());
            b[3..5].copy_from_slice(&payload.to_be_bytes());
            b[5..9].copy_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0]);
            b[9..11].fill(0);
            len += OPT_LEN;
            self.buf[field::ARCOUNT].copy_from_slice(&1u16.to_be_bytes());
        }
        len
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny test-only encoder: a query for `name` with the given type, class and flags.
    pub(crate) fn query(id: u16, name: &str, qtype: u16, qclass: u16, edns: Option<u16>) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&(edns.is_some() as u16).to_be_bytes());
        for label in name.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&qclass.to_be_bytes());
        if let Some(size) = edns {
            m.extend_from_slice(&[0, 0, 41]);
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0x80, 0, 0, 0]);
        }
        m
    }

    fn question(msg: &[u8]) -> Result<Question<'_>, WireError> {
        Question::parse(&Header::new_checked(msg)?)
    }

    #[test]
    fn header_fields() {
        let q = query(0xabcd, "web1", rtype::A, CLASS_IN, None);
        let h = Header::new_checked(&q[..]).unwrap();
        assert_eq!(h.id(), 0xabcd);
        assert!(!h.is_response() && h.recursion_desired() && !h.truncated());
        assert_eq!((h.opcode(), h.rcode(), h.qdcount(), h.arcount()), (0, 0, 1, 0));
        assert_eq!(Header::new_checked(&q[..11]).unwrap_err(), WireError::ShortHeader);
    }

    #[test]
    fn question_text_is_lower_case_without_trailing_dot() {
        let q = query(1, "Web1.BLUE.", rtype::AAAA, CLASS_IN, None);
        let question = question(&q).unwrap();
        let mut buf = [0; MAX_TEXT_LEN];
        assert_eq!(question.name.lower_text(&mut buf).unwrap(), b"web1.blue");
        assert_eq!((question.qtype, question.qclass, question.end), (rtype::AAAA, CLASS_IN, q.len()));
        assert_eq!(question.name.wire_len(), 11);
        let root = query(1, "", rtype::A, CLASS_IN, None);
        assert_eq!(question_of(&root).name.lower_text(&mut buf).unwrap(), b"");
    }

    fn question_of(m: &[u8]) -> Question<'_> {
        question(m).unwrap()
    }

    #[test]
    fn a_label_holding_a_dot_has_no_text() {
        let mut q = query(1, "abc", rtype::A, CLASS_IN, None);
        q[13 + 1] = b'.';
        let mut buf = [0; MAX_TEXT_LEN];
        assert!(question_of(&q).name.lower_text(&mut buf).is_none());
    }

    #[test]
    fn pointers_in_the_question_must_point_backwards() {
        // "a", then a pointer into the header: ARCOUNT's first byte is 0, the root name.
        let mut q = query(1, "a", rtype::A, CLASS_IN, None);
        q.truncate(12);
        q.extend_from_slice(&[1, b'a', 0xc0, 10, 0, 1, 0, 1]);
        let parsed = question_of(&q);
        assert_eq!(parsed.name.labels().collect::<Vec<_>>(), vec![b"a"]);
        assert_eq!(parsed.name.wire_len(), 3);
        assert_eq!(parsed.end, q.len());

        // A pointer to itself, to the label run it ends, or forwards: refused.
        for target in [14u8, 12, 16] {
            let mut q = q.clone();
            q[15] = target;
            assert_eq!(question(&q).unwrap_err(), WireError::BadPointer, "target {target}");
        }
    }

    #[test]
    fn malformed_questions_have_their_reason() {
        let good = query(1, "web1", rtype::A, CLASS_IN, None);
        let mut zero = good.clone();
        zero[5] = 0;
        assert_eq!(question(&zero).unwrap_err(), WireError::QuestionCount);
        let mut two = good.clone();
        two[5] = 2;
        assert_eq!(question(&two).unwrap_err(), WireError::QuestionCount);
        assert_eq!(question(&good[..16]).unwrap_err(), WireError::NameTruncated);
        assert_eq!(question(&good[..good.len() - 1]).unwrap_err(), WireError::QuestionTruncated);
        let mut ext = good.clone();
        ext[12] = 0x41;
        assert_eq!(question(&ext).unwrap_err(), WireError::BadLabelType);
        // 5 labels of 63 bytes: 320 bytes on the wire.
        let long = vec!["x".repeat(63); 5].join(".");
        assert_eq!(question(&query(1, &long, 1, 1, None)).unwrap_err(), WireError::NameTooLong);
        // 4 labels of 63 minus one byte: 254 + root = 255, the longest name.
        let longest = [&"x".repeat(63)[..], &"x".repeat(63), &"x".repeat(63), &"x".repeat(61)].join(".");
        assert_eq!(question_of(&query(1, &longest, 1, 1, None)).name.wire_len(), 255);
    }

    #[test]
    fn edns_is_found_and_checked() {
        let q = query(1, "web1", rtype::A, CLASS_IN, Some(4096));
        let h = Header::new_checked(&q[..]).unwrap();
        let end = Question::parse(&h).unwrap().end;
        assert_eq!(find_edns(&h, end).unwrap(), Some(Edns { udp_payload: 4096, version: 0, dnssec_ok: true }));

        let plain = query(1, "web1", rtype::A, CLASS_IN, None);
        let h = Header::new_checked(&plain[..]).unwrap();
        assert_eq!(find_edns(&h, plain.len()).unwrap(), None);

        let mut twice = q.clone();
        twice.extend_from_slice(&q[end..]);
        twice[11] = 2;
        let h = Header::new_checked(&twice[..]).unwrap();
        assert_eq!(find_edns(&h, end).unwrap_err(), WireError::DuplicateOpt);

        let mut short = q.clone();
        short.pop();
        let h = Header::new_checked(&short[..]).unwrap();
        assert_eq!(find_edns(&h, end).unwrap_err(), WireError::RecordTruncated);

        let mut named = q[..end].to_vec();
        named.extend_from_slice(&[0xc0, 12, 0, 41, 16, 0, 0, 0, 0, 0, 0, 0]);
        let h = Header::new_checked(&named[..]).unwrap();
        assert_eq!(find_edns(&h, end).unwrap_err(), WireError::OptNotRoot);

        // An OPT in the answer section is not the requester's EDNS.
        let mut in_answers = q.clone();
        in_answers[7] = 1;
        in_answers[11] = 0;
        let h = Header::new_checked(&in_answers[..]).unwrap();
        assert_eq!(find_edns(&h, end).unwrap(), None);
    }

    #[test]
    fn writer_respects_its_limit() {
        let q = query(7, "web1", rtype::A, CLASS_IN, None);
        let h = Header::new_checked(&q[..]).unwrap();
        let question = Question::parse(&h).unwrap();
        let mut buf = [0u8; 64];
        let mut w = ResponseWriter::new(&mut buf, 64, &h, rcode::NOERROR, true).unwrap();
        assert_eq!(w.a(5, Ipv4Addr::LOCALHOST), Err(WriteError::NoQuestion));
        w.question(&question).unwrap();
        w.edns(1232, false).unwrap();
        // 64 - 12 - 10 (question) - 11 (OPT) = 31: one A record of 16 fits, the second not.
        w.a(5, Ipv4Addr::new(10, 0, 0, 1)).unwrap();
        assert_eq!(w.a(5, Ipv4Addr::new(10, 0, 0, 2)), Err(WriteError::Full));
        let len = w.finish();
        assert_eq!(len, 12 + 10 + 16 + 11);
        let r = Header::new_checked(&buf[..len]).unwrap();
        assert!(r.is_response() && r.recursion_desired() && r.recursion_available());
        assert_eq!((r.id(), r.qdcount(), r.ancount(), r.arcount()), (7, 1, 1, 1));
        let mut tiny = [0u8; 11];
        assert!(ResponseWriter::new(&mut tiny, 512, &h, 0, true).is_err());
    }
}
