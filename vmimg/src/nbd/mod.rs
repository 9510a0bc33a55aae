//! An NBD server: exports [`Image`]s over any byte stream (TCP, Unix socket, an in-memory
//! pipe), per `../shared/specs/nbd-proto.md`.
//!
//! What it speaks:
//! - fixed newstyle handshake: `NBD_OPT_EXPORT_NAME`, `INFO`, `GO`, `LIST`, `ABORT`,
//!   `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation`);
//!   `STARTTLS` is refused (`NBD_REP_ERR_UNSUP`);
//! - transmission: `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`, `CACHE`, `WRITE_ZEROES`
//!   (`NO_HOLE`), `BLOCK_STATUS` (`REQ_ONE`), the `FUA` flag; simple and structured replies.
//!
//! Requests run concurrently and are answered as they finish. Clients are not trusted: a
//! request may carry at most [`MAX_PAYLOAD`] bytes, options at most [`MAX_OPTION`], and the
//! payloads of requests in flight on one connection are bounded ([`MAX_IN_FLIGHT`]): memory
//! stays bounded whatever a client sends. Malformed requests get `NBD_EINVAL` (or the error
//! the protocol names), a broken request header ends the connection.
//!
//! ```no_run
//! # async fn demo() -> vmimg::Result<()> {
//! use vmimg::nbd::{NbdExport, NbdServer};
//! let image = vmimg::ImageOpen::path("disk.qcow2").writable(true).open().await?;
//! let server = NbdServer::new().export(NbdExport::new("", image.clone()));
//! let listener = tokio::net::UnixListener::bind("/tmp/disk.sock").map_err(vmimg::Error::from)?;
//! let (stream, _) = listener.accept().await.map_err(vmimg::Error::from)?;
//! server.serve(stream).await?;
//! image.flush().await?;
//! # Ok(()) }
//! ```

mod proto;

use crate::format::{DiscardMode, Image};
use crate::{Error, ErrorKind, Result};
use proto::*;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

/// Largest payload of one request (and of one read reply): 32 MiB, the protocol's
/// recommended maximum, which QEMU uses too.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Largest option a client may send during the handshake; longer ones are skipped and
/// answered with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION: u32 = 64 << 10;

/// Payload bytes of requests in flight on one connection; the connection stops reading
/// requests until earlier ones finish.
pub const MAX_IN_FLIGHT: usize = 64 << 20;

/// Most extents in one block-status reply.
const MAX_EXTENTS: usize = 1 << 16;

/// One image offered under a name.
#[derive(Clone)]
pub struct NbdExport {
    name: String,
    description: String,
    image: Image,
    read_only: bool,
    trim: bool,
}

impl NbdExport {
    /// Offers `image` as `name` ("" is the default export). Read-only when the image is.
    pub fn new(name: impl Into<String>, image: Image) -> Self {
        NbdExport {
            name: name.into(),
            description: String::new(),
            read_only: !image.is_writable(),
            image,
            trim: false,
        }
    }

    /// A description for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Refuse writes even if the image is writable.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only || !self.image.is_writable();
        self
    }

    /// Carry out `NBD_CMD_TRIM` (discarding, so the range may read as anything afterwards);
    /// off by default, like qemu-nbd's `--discard=ignore`: trims succeed and change nothing.
    pub fn trim(mut self, trim: bool) -> Self {
        self.trim = trim;
        self
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_CACHE
            // One image handle (and so one cache) serves every connection.
            | FLAG_CAN_MULTI_CONN;
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        }
        if structured {
            flags |= FLAG_SEND_DF;
        }
        flags
    }
}

/// Serves a set of exports; cheap to clone, one clone per connection.
#[derive(Clone, Default)]
pub struct NbdServer {
    exports: Arc<Vec<NbdExport>>,
}

impl NbdServer {
    /// A server with no exports yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an export (a later export with the same name is never reached).
    pub fn export(mut self, export: NbdExport) -> Self {
        Arc::make_mut(&mut self.exports).push(export);
        self
    }

    fn find(&self, name: &[u8]) -> Option<&NbdExport> {
        self.exports.iter().find(|e| e.name.as_bytes() == name)
    }

    /// Runs the protocol on one connection until the client disconnects: the handshake,
    /// then [`NbdConnection::run`]. Returns `Ok` for a clean end (`NBD_OPT_ABORT`,
    /// `NBD_CMD_DISC`, or the client closing between messages), an error for a broken
    /// stream or a protocol violation that ended the connection.
    pub async fn serve<S>(&self, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self.handshake(stream).await? {
            Some(conn) => conn.run().await,
            None => Ok(()),
        }
    }

    /// Option haggling only: `None` when the client ended the session during it (or only
    /// asked questions); otherwise the connection, ready for the transmission phase.
    pub async fn handshake<S>(&self, mut stream: S) -> Result<Option<NbdConnection<S>>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Ok(handshake(self, &mut stream)
            .await
            .map_err(net_err)?
            .map(|session| NbdConnection { stream, session }))
    }
}

/// A connection past the handshake (see [`NbdServer::handshake`]).
pub struct NbdConnection<S> {
    stream: S,
    session: Session,
}

impl<S> NbdConnection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// The name of the export the client chose.
    pub fn export_name(&self) -> &str {
        &self.session.export.name
    }

    /// Serves requests until the client disconnects. Requests in flight are finished (and
    /// answered) before it returns.
    pub async fn run(self) -> Result<()> {
        transmission(self.stream, self.session).await
    }
}

/// What the handshake settled.
struct Session {
    export: NbdExport,
    structured: bool,
    block_status: bool,
}

fn net_err(e: io::Error) -> Error {
    Error::from(e).with_operation("nbd")
}

fn protocol_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg.into()).with_operation("nbd")
}

async fn reply_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    opt: u32,
    typ: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut msg = Vec::with_capacity(20 + data.len());
    msg.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    msg.extend_from_slice(&opt.to_be_bytes());
    msg.extend_from_slice(&typ.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).await
}

/// Reads `n` bytes and drops them, a bounded piece at a time.
async fn skip<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// A cursor over option data that fails (instead of panicking) when it runs short.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A 32-bit length and that many bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }
}

/// Metadata context queries of `LIST`/`SET_META_CONTEXT`: the export name and the queries.
fn meta_queries(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut f = Fields(data);
    let name = f.string()?;
    let n = f.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(f.string()?);
    }
    f.0.is_empty().then_some((name, queries))
}

/// Option haggling. `None`: the client ended the session (abort or close).
async fn handshake<S>(server: &NbdServer, s: &mut S) -> io::Result<Option<Session>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    s.flush().await?;
    let client_flags = match s.read_u32().await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown client flags {client_flags:#x}"),
        ));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The export named by the last successful SET_META_CONTEXT that selected a context.
    let mut meta_export: Option<Vec<u8>> = None;
    loop {
        s.flush().await?;
        let magic = match s.read_u64().await {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        if magic != IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad option magic {magic:#x}"),
            ));
        }
        let opt = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION {
            skip(s, len as u64).await?;
            reply_option(s, opt, REP_ERR_TOO_BIG, b"option too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                let Some(export) = server.find(&data) else {
                    // The protocol leaves no way to say why: end the session.
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no export named '{}'", String::from_utf8_lossy(&data)),
                    ));
                };
                let mut msg = Vec::with_capacity(134);
                msg.extend_from_slice(&export.image.size().to_be_bytes());
                msg.extend_from_slice(&export.transmission_flags(structured).to_be_bytes());
                if !no_zeroes {
                    msg.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&msg).await?;
                s.flush().await?;
                return Ok(Some(Session {
                    block_status: meta_export.as_deref() == Some(&data[..]),
                    export: export.clone(),
                    structured,
                }));
            }
            OPT_ABORT => {
                reply_option(s, opt, REP_ACK, &[]).await?;
                s.flush().await?;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_option(s, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                for e in server.exports.iter() {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    reply_option(s, opt, REP_SERVER, &d).await?;
                }
                reply_option(s, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let parsed = (|| {
                    let mut f = Fields(&data);
                    let name = f.string()?;
                    let n = f.u16()?;
                    let mut infos = Vec::new();
                    for _ in 0..n {
                        infos.push(f.u16()?);
                    }
                    f.0.is_empty().then_some((name, infos))
                })();
                let Some((name, infos)) = parsed else {
                    reply_option(s, opt, REP_ERR_INVALID, b"malformed request").await?;
                    continue;
                };
                let Some(export) = server.find(name) else {
                    reply_option(s, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.image.size().to_be_bytes());
                info.extend_from_slice(&export.transmission_flags(structured).to_be_bytes());
                reply_option(s, opt, REP_INFO, &info).await?;
                for typ in infos {
                    let mut d = typ.to_be_bytes().to_vec();
                    match typ {
                        INFO_NAME => d.extend_from_slice(export.name.as_bytes()),
                        INFO_DESCRIPTION if !export.description.is_empty() => {
                            d.extend_from_slice(export.description.as_bytes())
                        }
                        INFO_BLOCK_SIZE => {
                            d.extend_from_slice(&1u32.to_be_bytes());
                            d.extend_from_slice(&4096u32.to_be_bytes());
                            d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                        }
                        _ => continue,
                    }
                    reply_option(s, opt, REP_INFO, &d).await?;
                }
                reply_option(s, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    s.flush().await?;
                    return Ok(Some(Session {
                        block_status: meta_export.as_deref() == Some(name),
                        export: export.clone(),
                        structured,
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_option(s, opt, REP_ERR_INVALID, b"takes no data").await?;
                    continue;
                }
                structured = true;
                reply_option(s, opt, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if opt == OPT_SET_META_CONTEXT {
                    // Replaces the selection even when it fails.
                    meta_export = None;
                }
                if !structured {
                    reply_option(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let Some((name, queries)) = meta_queries(&data) else {
                    reply_option(s, opt, REP_ERR_INVALID, b"malformed request").await?;
                    continue;
                };
                if server.find(name).is_none() {
                    reply_option(s, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let selects = |q: &[u8]| {
                    q == BASE_ALLOCATION.as_bytes()
                        || (opt == OPT_LIST_META_CONTEXT && q == b"base:")
                };
                let chosen = if opt == OPT_LIST_META_CONTEXT && queries.is_empty() {
                    true
                } else {
                    queries.iter().any(|q| selects(q))
                };
                if chosen {
                    let id = if opt == OPT_SET_META_CONTEXT {
                        BASE_ALLOCATION_ID
                    } else {
                        0
                    };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    reply_option(s, opt, REP_META_CONTEXT, &d).await?;
                    if opt == OPT_SET_META_CONTEXT {
                        meta_export = Some(name.to_vec());
                    }
                }
                reply_option(s, opt, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                reply_option(s, opt, REP_ERR_UNSUP, b"this server has no TLS").await?;
            }
            _ => {
                reply_option(s, opt, REP_ERR_UNSUP, b"unsupported option").await?;
            }
        }
    }
}

/// One transmission request.
#[derive(Clone, Copy, Debug)]
struct Request {
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

type Writer<S> = Arc<Mutex<tokio::io::WriteHalf<S>>>;

/// The reply to one request: an error number, or success with read data (or extents).
enum Outcome {
    Done,
    Data(Vec<u8>),
    Extents(Vec<(u32, u32)>),
    Failed(u32, String),
}

async fn transmission<S>(stream: S, session: Session) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let wr: Writer<S> = Arc::new(Mutex::new(wr));
    let session = Arc::new(session);
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT >> 10));
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let end = loop {
        // Collect what finished (a failed reply write ends the connection).
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = joined(done) {
                break_tasks(&mut tasks).await;
                return Err(e);
            }
        }
        let mut hdr = [0u8; 28];
        match rd.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(net_err(e)),
        }
        let magic = u32::from_be_bytes(hdr[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            break Err(protocol_err(format!("bad request magic {magic:#x}")));
        }
        let req = Request {
            flags: u16::from_be_bytes(hdr[4..6].try_into().unwrap()),
            typ: u16::from_be_bytes(hdr[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(hdr[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(hdr[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(hdr[24..28].try_into().unwrap()),
        };
        if req.typ == CMD_DISC {
            break Ok(());
        }
        let carries = req.typ == CMD_WRITE || req.typ == CMD_READ;
        let cost = if carries { (req.len >> 10) + 1 } else { 1 };
        let permit = if req.len <= MAX_PAYLOAD || !carries {
            Some(
                Arc::clone(&budget)
                    .acquire_many_owned(cost)
                    .await
                    .expect("the budget semaphore is never closed"),
            )
        } else {
            None
        };
        let mut payload = Vec::new();
        if req.typ == CMD_WRITE {
            if permit.is_none() {
                // Too large to take: skip it, and say so.
                if let Err(e) = skip(&mut rd, req.len as u64).await {
                    break Err(net_err(e));
                }
            } else {
                payload = vec![0u8; req.len as usize];
                if let Err(e) = rd.read_exact(&mut payload).await {
                    break Err(net_err(e));
                }
            }
        }
        let (wr, session) = (Arc::clone(&wr), Arc::clone(&session));
        tasks.spawn(async move {
            let outcome = if carries && permit.is_none() {
                Outcome::Failed(EINVAL, format!("request longer than {MAX_PAYLOAD} bytes"))
            } else {
                execute(&session, req, payload).await
            };
            drop(permit);
            send_reply(&wr, &session, req, outcome).await
        });
    };
    // Finish and answer what is in flight (after a DISC the protocol asks for that).
    let mut result = end;
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = joined(done) {
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    let mut w = wr.lock().await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    result
}

fn joined(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match r {
        Ok(r) => r,
        Err(e) => Err(Error::new(ErrorKind::Io, "NBD request task failed").with_source(e)),
    }
}

async fn break_tasks(tasks: &mut JoinSet<Result<()>>) {
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// The NBD error number for a library error.
fn nbd_errno(e: &Error) -> u32 {
    match e.kind() {
        ErrorKind::NoSpace => ENOSPC,
        ErrorKind::ReadOnly | ErrorKind::PermissionDenied => EPERM,
        ErrorKind::OutOfBounds | ErrorKind::InvalidArgument | ErrorKind::Unsupported => EINVAL,
        _ => EIO,
    }
}

fn failed(e: Error) -> Outcome {
    Outcome::Failed(nbd_errno(&e), e.to_string())
}

/// Carries out one request.
async fn execute(session: &Session, req: Request, payload: Vec<u8>) -> Outcome {
    let export = &session.export;
    let image = &export.image;
    let size = image.size();
    let end = req.offset.checked_add(req.len as u64);
    let in_bounds = end.is_some_and(|e| e <= size);
    let allowed = match req.typ {
        CMD_READ if session.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    };
    if req.flags & !allowed != 0 {
        return Outcome::Failed(EINVAL, format!("unexpected command flags {:#x}", req.flags));
    }
    let writes = matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
    if writes && export.read_only {
        return Outcome::Failed(EPERM, "the export is read-only".into());
    }
    if !in_bounds && req.typ != CMD_FLUSH {
        // Writes past the end: ENOSPC; everything else: EINVAL.
        let errno = if matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return Outcome::Failed(errno, "request past the end of the export".into());
    }
    let r = match req.typ {
        CMD_READ => {
            let mut buf = vec![0u8; req.len as usize];
            return match image.read(req.offset, &mut buf).await {
                Ok(()) => Outcome::Data(buf),
                Err(e) => failed(e),
            };
        }
        CMD_WRITE => image.write(req.offset, &payload).await,
        CMD_FLUSH => image.sync().await,
        CMD_TRIM => {
            if export.trim && req.len > 0 {
                image
                    .discard(req.offset, req.len as u64, DiscardMode::ReadsAnything)
                    .await
            } else {
                Ok(())
            }
        }
        CMD_CACHE => Ok(()),
        CMD_WRITE_ZEROES => {
            if req.len == 0 {
                Ok(())
            } else {
                let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
                image
                    .write_zeroes(req.offset, req.len as u64, may_unmap)
                    .await
            }
        }
        CMD_BLOCK_STATUS => {
            if !session.block_status {
                return Outcome::Failed(EINVAL, "no metadata context was selected".into());
            }
            return match extents(image, req).await {
                Ok(x) => Outcome::Extents(x),
                Err(e) => failed(e),
            };
        }
        other => return Outcome::Failed(EINVAL, format!("unknown command {other}")),
    };
    let r = match r {
        Ok(()) if writes && req.flags & CMD_FLAG_FUA != 0 => image.sync().await,
        r => r,
    };
    match r {
        Ok(()) => Outcome::Done,
        Err(e) => failed(e),
    }
}

/// `base:allocation` extents of the request's range: (length, flags), neighbours merged.
async fn extents(image: &Image, req: Request) -> Result<Vec<(u32, u32)>> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let end = req.offset + req.len as u64;
    let mut pos = req.offset;
    while pos < end && out.len() < MAX_EXTENTS {
        let st = image.block_status(pos, end - pos).await?;
        if st.len == 0 {
            break;
        }
        let len = st.len.min(end - pos) as u32;
        let mut flags = 0;
        if !st.data() {
            flags |= STATE_HOLE;
        }
        if st.zero() {
            flags |= STATE_ZERO;
        }
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += len,
            _ => out.push((len, flags)),
        }
        pos += len as u64;
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            break;
        }
    }
    if out.is_empty() {
        // A zero-length query still gets one (conservative) descriptor.
        out.push((req.len.max(1), 0));
    }
    Ok(out)
}

fn chunk_header(flags: u16, typ: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&typ.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
    h
}

fn simple_header(error: u32, cookie: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

/// Writes the reply to `req`, as one unit on the shared stream.
async fn send_reply<S: AsyncWrite>(
    wr: &Writer<S>,
    session: &Session,
    req: Request,
    outcome: Outcome,
) -> Result<()> {
    let mut msg = Vec::new();
    let mut data: &[u8] = &[];
    match (&outcome, session.structured) {
        (Outcome::Data(buf), true) => {
            msg.extend_from_slice(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + buf.len() as u32,
            ));
            msg.extend_from_slice(&req.offset.to_be_bytes());
            data = buf;
        }
        (Outcome::Data(buf), false) => {
            msg.extend_from_slice(&simple_header(0, req.cookie));
            data = buf;
        }
        (Outcome::Extents(x), _) => {
            msg.extend_from_slice(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                req.cookie,
                4 + 8 * x.len() as u32,
            ));
            msg.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
            for (len, flags) in x {
                msg.extend_from_slice(&len.to_be_bytes());
                msg.extend_from_slice(&flags.to_be_bytes());
            }
        }
        (Outcome::Done, true) if req.typ == CMD_READ => {
            // A zero-length read still needs a structured reply.
            msg.extend_from_slice(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                0,
            ));
        }
        (Outcome::Done, _) => msg.extend_from_slice(&simple_header(0, req.cookie)),
        (Outcome::Failed(errno, text), true) if matches!(req.typ, CMD_READ | CMD_BLOCK_STATUS) => {
            let text = &text.as_bytes()[..text.len().min(4096)];
            msg.extend_from_slice(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.cookie,
                6 + text.len() as u32,
            ));
            msg.extend_from_slice(&errno.to_be_bytes());
            msg.extend_from_slice(&(text.len() as u16).to_be_bytes());
            msg.extend_from_slice(text);
        }
        (Outcome::Failed(errno, _), _) => msg.extend_from_slice(&simple_header(*errno, req.cookie)),
    }
    let mut w = wr.lock().await;
    async {
        w.write_all(&msg).await?;
        if !data.is_empty() {
            w.write_all(data).await?;
        }
        w.flush().await
    }
    .await
    .map_err(net_err)
}

#[cfg(test)]
mod tests;
