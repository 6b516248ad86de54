//! SPDY/3.1 framing, as far as Kubernetes' streaming protocols use it (`kubectl port-forward`
//! speaks it, tunnelled in WebSocket binary messages or over a plain `SPDY/3.1` upgrade).
//!
//! Frames are 8 bytes of header and a payload of at most 2^24 - 1 bytes. Control frames carry
//! the version (3) and a type; data frames a 31-bit stream ID. Header blocks (SYN_STREAM,
//! SYN_REPLY, HEADERS) are zlib-compressed, one compression context per direction for the whole
//! connection, primed with the dictionary of the SPDY/3 draft. Flow control (WINDOW_UPDATE,
//! SETTINGS) is not used by Kubernetes' peers and is ignored.

use std::sync::OnceLock;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const VERSION: u16 = 3;
pub const FLAG_FIN: u8 = 0x01;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;

/// RST_STREAM status codes used here.
pub const PROTOCOL_ERROR: u32 = 1;
pub const REFUSED_STREAM: u32 = 3;

/// The largest header block accepted once inflated: header blocks here are a few names.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// The largest data payload sent in one frame.
pub const MAX_DATA: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("spdy connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("spdy version {0} is not supported (3 is)")]
    Version(u16),
    #[error("malformed spdy frame: {0}")]
    Malformed(&'static str),
    #[error("spdy header block: {0}")]
    Compression(String),
}

/// Header name/value pairs, names lowercase as SPDY/3 requires.
pub type Headers = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    SynStream {
        id: u32,
        fin: bool,
        headers: Headers,
    },
    SynReply {
        id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        id: u32,
        status: u32,
    },
    Ping(u32),
    GoAway {
        last: u32,
        status: u32,
    },
    Headers {
        id: u32,
        headers: Headers,
    },
    Data {
        id: u32,
        fin: bool,
        data: Bytes,
    },
    /// A control frame this side has no use for (SETTINGS, WINDOW_UPDATE, ...).
    Ignored(u16),
}

/// The first value of header `name`.
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The dictionary of SPDY/3 header compression (draft 3, 2.6.10.1): the length-prefixed
/// words, then a run of status codes, reasons, dates and media types. 1423 bytes.
pub fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = concat!(
            "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
            "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
            "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error",
            "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct ",
            "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,",
            "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,",
            "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8",
            "charset=iso-8859-1,utf-,*,enq=0."
        );
        let mut d = Vec::with_capacity(1423);
        for w in WORDS {
            d.extend((w.len() as u32).to_be_bytes());
            d.extend(w.as_bytes());
        }
        d.extend(TAIL.as_bytes());
        d
    })
}

/// Reads frames, inflating header blocks with the connection's one zlib context.
pub struct Decoder {
    inflate: Decompress,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            inflate: Decompress::new(true),
        }
    }
}

impl Decoder {
    /// The next frame; None at a clean end of the connection (between frames).
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Frame>, SpdyError> {
        let mut head = [0u8; 8];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        self.decode(head, payload).map(Some)
    }

    /// One frame from its 8-byte header and its payload.
    pub fn decode(&mut self, head: [u8; 8], payload: Vec<u8>) -> Result<Frame, SpdyError> {
        let flags = head[4];
        let fin = flags & FLAG_FIN != 0;
        if head[0] & 0x80 == 0 {
            let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            return Ok(Frame::Data {
                id,
                fin,
                data: Bytes::from(payload),
            });
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let word = |at: usize| -> Result<u32, SpdyError> {
            payload
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(SpdyError::Malformed("control frame too short"))
        };
        let stream = |at: usize| word(at).map(|w| w & 0x7fff_ffff);
        Ok(match kind {
            SYN_STREAM => {
                let id = stream(0)?;
                if payload.len() < 10 {
                    return Err(SpdyError::Malformed("SYN_STREAM too short"));
                }
                let headers = self.headers(&payload[10..])?;
                Frame::SynStream { id, fin, headers }
            }
            SYN_REPLY => {
                let id = stream(0)?;
                let headers = self.headers(&payload[4..])?;
                Frame::SynReply { id, fin, headers }
            }
            HEADERS => {
                let id = stream(0)?;
                let headers = self.headers(&payload[4..])?;
                Frame::Headers { id, headers }
            }
            RST_STREAM => Frame::RstStream {
                id: stream(0)?,
                status: word(4)?,
            },
            PING => Frame::Ping(word(0)?),
            GOAWAY => Frame::GoAway {
                last: stream(0)?,
                status: word(4).unwrap_or(0),
            },
            other => Frame::Ignored(other),
        })
    }

    /// Inflates one header block (a sync-flushed piece of the connection's zlib stream) and
    /// parses its pairs.
    fn headers(&mut self, mut input: &[u8]) -> Result<Headers, SpdyError> {
        let mut out = Vec::with_capacity(256);
        while !input.is_empty() {
            if out.len() >= MAX_HEADER_BLOCK {
                return Err(SpdyError::Malformed("header block too large"));
            }
            out.reserve(4096);
            let before = self.inflate.total_in();
            let res = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - before) as usize;
            input = &input[used..];
            match res {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(dictionary())
                        .map_err(|e| SpdyError::Compression(e.to_string()))?;
                }
                Err(e) => return Err(SpdyError::Compression(e.to_string())),
            }
            if used == 0 && out.len() < out.capacity() && !input.is_empty() {
                // No progress though there was room: the input is broken.
                return Err(SpdyError::Compression("no progress inflating".into()));
            }
        }
        parse_block(&out)
    }
}

fn parse_block(b: &[u8]) -> Result<Headers, SpdyError> {
    let mut at = 0usize;
    let word = |at: &mut usize| -> Result<usize, SpdyError> {
        let w = b
            .get(*at..*at + 4)
            .ok_or(SpdyError::Malformed("header block too short"))?;
        *at += 4;
        Ok(u32::from_be_bytes([w[0], w[1], w[2], w[3]]) as usize)
    };
    let count = word(&mut at)?;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let text = |at: &mut usize| -> Result<String, SpdyError> {
            let n = word(at)?;
            let s = b
                .get(*at..*at + n)
                .ok_or(SpdyError::Malformed("header block too short"))?;
            *at += n;
            Ok(String::from_utf8_lossy(s).into_owned())
        };
        let name = text(&mut at)?;
        let value = text(&mut at)?;
        headers.push((name.to_ascii_lowercase(), value));
    }
    Ok(headers)
}

/// Writes frames, deflating header blocks with the connection's one zlib context (so frames
/// must be encoded in the order they are sent).
pub struct Encoder {
    deflate: Compress,
}

impl Default for Encoder {
    fn default() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // Peers inflate with the dictionary too; priming it as they do keeps blocks small.
        let _ = deflate.set_dictionary(dictionary());
        Encoder { deflate }
    }
}

impl Encoder {
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), SpdyError> {
        let control = |out: &mut Vec<u8>, kind: u16, flags: u8, payload: &[u8]| {
            out.extend((0x8000u16 | VERSION).to_be_bytes());
            out.extend(kind.to_be_bytes());
            out.push(flags);
            out.extend(&(payload.len() as u32).to_be_bytes()[1..]);
            out.extend(payload);
        };
        let fin_flag = |fin: bool| if fin { FLAG_FIN } else { 0 };
        match frame {
            Frame::Data { id, fin, data } => {
                out.extend((id & 0x7fff_ffff).to_be_bytes());
                out.push(fin_flag(*fin));
                out.extend(&(data.len() as u32).to_be_bytes()[1..]);
                out.extend(data.iter());
            }
            Frame::SynStream { id, fin, headers } => {
                let mut p = id.to_be_bytes().to_vec();
                p.extend([0, 0, 0, 0, 0, 0]);
                p.extend(self.block(headers)?);
                control(out, SYN_STREAM, fin_flag(*fin), &p);
            }
            Frame::SynReply { id, fin, headers } => {
                let mut p = id.to_be_bytes().to_vec();
                p.extend(self.block(headers)?);
                control(out, SYN_REPLY, fin_flag(*fin), &p);
            }
            Frame::Headers { id, headers } => {
                let mut p = id.to_be_bytes().to_vec();
                p.extend(self.block(headers)?);
                control(out, HEADERS, 0, &p);
            }
            Frame::RstStream { id, status } => {
                let mut p = id.to_be_bytes().to_vec();
                p.extend(status.to_be_bytes());
                control(out, RST_STREAM, 0, &p);
            }
            Frame::Ping(id) => control(out, PING, 0, &id.to_be_bytes()),
            Frame::GoAway { last, status } => {
                let mut p = last.to_be_bytes().to_vec();
                p.extend(status.to_be_bytes());
                control(out, GOAWAY, 0, &p);
            }
            Frame::Ignored(_) => {}
        }
        Ok(())
    }

    fn block(&mut self, headers: &Headers) -> Result<Vec<u8>, SpdyError> {
        let mut raw = (headers.len() as u32).to_be_bytes().to_vec();
        for (k, v) in headers {
            raw.extend((k.len() as u32).to_be_bytes());
            raw.extend(k.to_ascii_lowercase().as_bytes());
            raw.extend((v.len() as u32).to_be_bytes());
            raw.extend(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            out.reserve(raw.len() + 64);
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Compression(e.to_string()))?;
            input = &input[(self.deflate.total_in() - before) as usize..];
            // A sync flush is complete when it left room in the output.
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_dictionary_is_the_drafts() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert!(d.starts_with(b"\x00\x00\x00\x07options\x00\x00\x00\x04head"));
        assert!(d.ends_with(b"utf-,*,enq=0."));
        // The dictionary ID a peer's zlib stream names (Adler-32 of the bytes).
        let mut inflate = Decompress::new(true);
        let mut out = Vec::with_capacity(16);
        let err = inflate
            .decompress_vec(&hex("78f9e3c6a7c2"), &mut out, FlushDecompress::Sync)
            .unwrap_err();
        assert_eq!(err.needs_dictionary(), Some(0xe3c6a7c2));
    }

    /// Two SYN_STREAM header blocks as Go's zlib writes them (dictionary, sync flush), the
    /// second relying on the first: what kubectl sends for one forwarded connection.
    #[test]
    fn reads_header_blocks_of_one_zlib_stream() {
        let first = hex("78f9e3c6a7c202253a48f95b044eea16061606409ab308125f99a074cc68004e892545a989b9d0c2863515141500000000ffff");
        let second = hex("225333a8a44a04000000ffff");
        let mut d = Decoder::default();
        let syn = |id: u32, block: &[u8]| {
            let mut p = id.to_be_bytes().to_vec();
            p.extend([0, 0, 0, 0, 0, 0]);
            p.extend(block);
            let mut head = [0x80, 3, 0, 1, 0, 0, 0, 0];
            head[5..].copy_from_slice(&(p.len() as u32).to_be_bytes()[1..]);
            (head, p)
        };
        let (h, p) = syn(1, &first);
        let Frame::SynStream { id, headers, .. } = d.decode(h, p).unwrap() else {
            panic!("not a SYN_STREAM")
        };
        assert_eq!(id, 1);
        assert_eq!(header(&headers, "streamType"), Some("error"));
        assert_eq!(header(&headers, "port"), Some("8080"));
        assert_eq!(header(&headers, "requestid"), Some("0"));
        let (h, p) = syn(3, &second);
        let Frame::SynStream { id, headers, .. } = d.decode(h, p).unwrap() else {
            panic!("not a SYN_STREAM")
        };
        assert_eq!(id, 3);
        assert_eq!(header(&headers, "streamtype"), Some("data"));
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let frames = vec![
            Frame::SynStream {
                id: 1,
                fin: false,
                headers: vec![("streamtype".into(), "error".into())],
            },
            Frame::SynReply {
                id: 1,
                fin: false,
                headers: vec![],
            },
            Frame::SynReply {
                id: 3,
                fin: false,
                headers: vec![("a".into(), "b".into())],
            },
            Frame::Data {
                id: 3,
                fin: true,
                data: Bytes::from_static(b"hello"),
            },
            Frame::RstStream { id: 3, status: 5 },
            Frame::Ping(7),
            Frame::GoAway { last: 3, status: 0 },
        ];
        let mut enc = Encoder::default();
        let mut wire = Vec::new();
        for f in &frames {
            enc.encode(f, &mut wire).unwrap();
        }
        let mut dec = Decoder::default();
        let mut r = &wire[..];
        let mut back = Vec::new();
        while let Some(f) = dec.read(&mut r).await.unwrap() {
            back.push(f);
        }
        assert_eq!(back, frames);
    }
}
