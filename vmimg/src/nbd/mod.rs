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
//! request may carry at most [`MAX_PAYLOAD`] bytes, options at most [`MAX_OPTION`]; the
//! payloads and replies of requests in flight on a connection are bounded
//! ([`NbdServer::max_in_flight`]), so memory stays bounded whatever a client sends (a client
//! that stops reading replies stalls only its own connection). Malformed requests get `NBD_EINVAL` (or the
//! error the protocol names), a broken request header ends the connection, a handshake must
//! finish within [`NbdServer::handshake_timeout`], and a reply that cannot be delivered
//! within [`REPLY_TIMEOUT`] ends the connection. [`NbdServer::shutdown`] stops every
//! connection after its requests in flight are answered. Error replies name the kind of
//! failure only, never host paths.
//!
//! The server needs a tokio runtime with its I/O and time drivers (`enable_all`).
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

use crate::format::DiscardMode;
use crate::image::Image;
use crate::{Error, ErrorKind, Result};
use proto::*;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinSet;

/// Largest payload of one request (and of one read reply): 32 MiB, the protocol's
/// recommended maximum, which QEMU uses too.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Largest option a client may send during the handshake; longer ones are skipped and
/// answered with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION: u32 = 64 << 10;

/// Default bound on the payloads and replies of one connection's requests in flight; the
/// connection stops reading requests until earlier ones are answered.
pub const MAX_IN_FLIGHT: usize = 64 << 20;

/// Longest a reply may take to reach a client that does not read.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Most extents in one block-status reply (fewer than asked for are allowed).
const MAX_EXTENTS: usize = 1 << 14;

/// Budget units (KiB) a block-status request holds: its extents, twice (list and reply).
const BLOCK_STATUS_COST: u32 = (MAX_EXTENTS * 16 / 1024) as u32;

/// One image offered under a name.
#[derive(Clone)]
pub struct NbdExport {
    name: String,
    description: String,
    image: Image,
    read_only: bool,
    trim: bool,
    multi_conn: bool,
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
            multi_conn: false,
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

    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: clients may spread requests over several
    /// connections (all connections share this server's image handle and cache). Only
    /// when the server accepts several clients at once: a client opening more connections
    /// than are accepted would wait for them forever.
    pub fn multi_conn(mut self, multi_conn: bool) -> Self {
        self.multi_conn = multi_conn;
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
            | FLAG_SEND_CACHE;
        if self.multi_conn {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        }
        if structured {
            flags |= FLAG_SEND_DF;
        }
        flags
    }
}

/// Serves a set of exports; cheap to clone, one clone per connection (clones share the
/// shutdown switch).
#[derive(Clone)]
pub struct NbdServer {
    exports: Arc<Vec<NbdExport>>,
    /// Budget of one connection's requests in flight, in KiB.
    in_flight_kib: u32,
    shutdown: watch::Sender<bool>,
    handshake_timeout: Duration,
}

impl Default for NbdServer {
    fn default() -> Self {
        NbdServer {
            exports: Arc::default(),
            in_flight_kib: (MAX_IN_FLIGHT >> 10) as u32,
            shutdown: watch::Sender::new(false),
            handshake_timeout: Duration::from_secs(10),
        }
    }
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

    /// How long a client may take over the handshake before it is dropped (default 10 s,
    /// as QEMU's server): a client that connects and says nothing holds no slot for ever.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Asks every connection (present and future) of this server and its clones to end:
    /// handshakes are dropped; in transmission no new request is read, those in flight
    /// are answered, and then the connection closes.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Bound on the bytes (payloads, read data, block-status replies) of one connection's
    /// requests in flight (default [`MAX_IN_FLIGHT`]; at least 1 KiB). A request larger than
    /// the bound runs alone.
    pub fn max_in_flight(mut self, bytes: usize) -> Self {
        self.in_flight_kib = (bytes >> 10).clamp(1, u32::MAX as usize) as u32;
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
        let mut stop = self.shutdown.subscribe();
        let session = tokio::select! {
            r = tokio::time::timeout(self.handshake_timeout, handshake(self, &mut stream)) => {
                r.map_err(|_| protocol_err("the client did not finish the handshake in time"))?
                    .map_err(net_err)?
            }
            _ = stop.wait_for(|&stop| stop) => None,
        };
        Ok(session.map(|session| NbdConnection {
            stream,
            session,
            server: self.clone(),
        }))
    }
}

/// A connection past the handshake (see [`NbdServer::handshake`]).
pub struct NbdConnection<S> {
    stream: S,
    session: Session,
    server: NbdServer,
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
        transmission(self.stream, self.session, &self.server).await
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
            if opt == OPT_EXPORT_NAME {
                // No reply can refuse EXPORT_NAME: hang up.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "export name too long",
                ));
            }
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
                // The client may hang up without waiting for this: not an error.
                if reply_option(s, opt, REP_ACK, &[]).await.is_ok() {
                    let _ = s.flush().await;
                }
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

/// The write half, shared by the request tasks; `dead` once a reply could not be
/// delivered (later replies are not attempted).
struct Replies<S> {
    wr: Mutex<tokio::io::WriteHalf<S>>,
    dead: AtomicBool,
}

/// The reply to one request: an error number, or success with read data (or extents).
enum Outcome {
    Done,
    Data(Vec<u8>),
    Extents(Vec<(u32, u32)>),
    Failed(u32, String),
}

async fn transmission<S>(stream: S, session: Session, server: &NbdServer) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let replies = Arc::new(Replies {
        wr: Mutex::new(wr),
        dead: AtomicBool::new(false),
    });
    let session = Arc::new(session);
    let mut stop = server.shutdown.subscribe();
    let budget = Arc::new(Semaphore::new(server.in_flight_kib as usize));
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let mut failure = None;
    let end = loop {
        // Collect what finished; a reply that could not be delivered ends the connection.
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = joined(done) {
                failure.get_or_insert(e);
            }
        }
        if failure.is_some() {
            break Ok(());
        }
        let mut hdr = [0u8; 28];
        let read = tokio::select! {
            r = read_header(&mut rd, &mut hdr) => r,
            _ = stop.wait_for(|&stop| stop) => break Ok(()),
        };
        match read {
            Ok(true) => {}
            Ok(false) => break Ok(()),
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
        // What the request holds until its reply is out: its payload or read data, the
        // extents of a block-status reply, or one unit for the bookkeeping.
        let oversized = matches!(req.typ, CMD_READ | CMD_WRITE) && req.len > MAX_PAYLOAD;
        let cost = match req.typ {
            CMD_READ | CMD_WRITE if !oversized => (req.len >> 10) + 1,
            CMD_BLOCK_STATUS => BLOCK_STATUS_COST,
            _ => 1,
        };
        let permit = Arc::clone(&budget)
            .acquire_many_owned(cost.min(server.in_flight_kib))
            .await
            .expect("the budget semaphore is never closed");
        let mut payload = Vec::new();
        if req.typ == CMD_WRITE {
            let r = if oversized {
                // Too large to take: skip it, and say so.
                skip(&mut rd, req.len as u64).await
            } else {
                payload = vec![0u8; req.len as usize];
                rd.read_exact(&mut payload).await.map(drop)
            };
            if let Err(e) = r {
                break Err(net_err(e));
            }
        }
        let (replies, session) = (Arc::clone(&replies), Arc::clone(&session));
        tasks.spawn(async move {
            let outcome = if oversized {
                Outcome::Failed(EINVAL, format!("request longer than {MAX_PAYLOAD} bytes"))
            } else {
                execute(&session, req, payload).await
            };
            let sent = send_reply(&replies, &session, req, outcome).await;
            drop(permit);
            sent
        });
    };
    // Requests in flight finish and are answered (after a DISC the protocol asks for
    // that); none is cancelled halfway through an image operation.
    let mut result = match failure {
        Some(e) => Err(e),
        None => end,
    };
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = joined(done) {
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    if !replies.dead.load(Ordering::Acquire) {
        let mut w = replies.wr.lock().await;
        let _ = tokio::time::timeout(REPLY_TIMEOUT, async {
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        })
        .await;
    }
    result
}

/// Reads one request header: `false` when the client closed the stream before its first
/// byte (a clean end); a stream ending inside the header is an error.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R, hdr: &mut [u8; 28]) -> io::Result<bool> {
    let mut got = 0;
    while got < hdr.len() {
        let n = r.read(&mut hdr[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection inside a request",
            ));
        }
        got += n;
    }
    Ok(true)
}

fn joined(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match r {
        Ok(r) => r,
        Err(e) => Err(Error::new(ErrorKind::Io, "NBD request task failed").with_source(e)),
    }
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

/// The error reply for a library error: its kind only (its message may name host paths).
fn failed(e: Error) -> Outcome {
    Outcome::Failed(nbd_errno(&e), e.kind().describe().to_string())
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
        CMD_READ if req.len == 0 => return Outcome::Done,
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
                // Unmapping is a discard: only where trims are carried out.
                let may_unmap = export.trim && req.flags & CMD_FLAG_NO_HOLE == 0;
                image
                    .write_zeroes(req.offset, req.len as u64, may_unmap)
                    .await
            }
        }
        CMD_BLOCK_STATUS => {
            if !session.block_status {
                return Outcome::Failed(EINVAL, "no metadata context was selected".into());
            }
            if req.len == 0 {
                return Outcome::Failed(EINVAL, "block status of an empty range".into());
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
    let mut calls = 0;
    // Fewer extents than asked for are allowed: the client asks again from the end.
    while pos < end && out.len() < MAX_EXTENTS && calls < 2 * MAX_EXTENTS {
        calls += 1;
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
        // Nothing known (the driver answered nothing): "allocated, contents unknown".
        out.push((req.len, 0));
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
    replies: &Replies<S>,
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
            // A zero-length read still needs a structured reply (and data chunks carry at
            // least one byte).
            msg.extend_from_slice(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                0,
            ));
        }
        (Outcome::Done, _) => msg.extend_from_slice(&simple_header(0, req.cookie)),
        (Outcome::Failed(errno, text), true) if matches!(req.typ, CMD_READ | CMD_BLOCK_STATUS) => {
            let text = text.as_bytes();
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
    let mut w = replies.wr.lock().await;
    if replies.dead.load(Ordering::Acquire) {
        return Ok(());
    }
    let sent = tokio::time::timeout(REPLY_TIMEOUT, async {
        w.write_all(&msg).await?;
        if !data.is_empty() {
            w.write_all(data).await?;
        }
        w.flush().await
    })
    .await;
    let err = match sent {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => net_err(e),
        Err(_) => protocol_err("the client stopped reading replies"),
    };
    replies.dead.store(true, Ordering::Release);
    Err(err)
}

#[cfg(test)]
mod tests;
