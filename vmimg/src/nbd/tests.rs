//! The NBD server against a minimal client over an in-memory pipe: the protocol's replies
//! byte by byte, and what a hostile client can and cannot do.

use super::proto::*;
use super::*;
use crate::image::ImageOpen;
use crate::storage::MemoryStorage;
use tokio::io::DuplexStream;

const SIZE: u64 = 1 << 20;

async fn image(writable: bool) -> Image {
    let mut content = vec![0u8; SIZE as usize];
    content[..4096].fill(0xab);
    ImageOpen::storage(Arc::new(MemoryStorage::from_bytes(&content)))
        .format(crate::Format::RAW)
        .writable(writable)
        .open()
        .await
        .unwrap()
}

/// Starts a server on one end of a pipe; returns the client end and the server's task.
async fn start(export: NbdExport) -> (DuplexStream, tokio::task::JoinHandle<Result<()>>) {
    let (client, server_end) = tokio::io::duplex(1 << 16);
    let server = NbdServer::new().export(export);
    let task = tokio::spawn(async move { server.serve(server_end).await });
    (client, task)
}

struct OptReply {
    opt: u32,
    typ: u32,
    data: Vec<u8>,
}

/// Reads the greeting and sends the client flags.
async fn greet(c: &mut DuplexStream, client_flags: u32) {
    assert_eq!(c.read_u64().await.unwrap(), NBDMAGIC);
    assert_eq!(c.read_u64().await.unwrap(), IHAVEOPT);
    let flags = c.read_u16().await.unwrap();
    assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    c.write_u32(client_flags).await.unwrap();
}

async fn send_opt(c: &mut DuplexStream, opt: u32, data: &[u8]) {
    c.write_u64(IHAVEOPT).await.unwrap();
    c.write_u32(opt).await.unwrap();
    c.write_u32(data.len() as u32).await.unwrap();
    c.write_all(data).await.unwrap();
}

async fn opt_reply(c: &mut DuplexStream) -> OptReply {
    assert_eq!(c.read_u64().await.unwrap(), REPLY_MAGIC);
    let opt = c.read_u32().await.unwrap();
    let typ = c.read_u32().await.unwrap();
    let len = c.read_u32().await.unwrap();
    let mut data = vec![0u8; len as usize];
    c.read_exact(&mut data).await.unwrap();
    OptReply { opt, typ, data }
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Handshake with structured replies and base:allocation, then GO; returns the
/// transmission flags.
async fn connect(c: &mut DuplexStream, name: &str) -> u16 {
    greet(c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    send_opt(c, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(opt_reply(c).await.typ, REP_ACK);
    send_opt(
        c,
        OPT_SET_META_CONTEXT,
        &meta_data(name, &[BASE_ALLOCATION]),
    )
    .await;
    let r = opt_reply(c).await;
    assert_eq!(r.typ, REP_META_CONTEXT);
    assert_eq!(&r.data[..4], &BASE_ALLOCATION_ID.to_be_bytes());
    assert_eq!(&r.data[4..], BASE_ALLOCATION.as_bytes());
    assert_eq!(opt_reply(c).await.typ, REP_ACK);
    send_opt(c, OPT_GO, &go_data(name, &[INFO_BLOCK_SIZE])).await;
    let mut flags = None;
    loop {
        let r = opt_reply(c).await;
        assert_eq!(r.opt, OPT_GO);
        match r.typ {
            REP_INFO => {
                let typ = u16::from_be_bytes([r.data[0], r.data[1]]);
                if typ == INFO_EXPORT {
                    assert_eq!(r.data.len(), 12);
                    assert_eq!(u64::from_be_bytes(r.data[2..10].try_into().unwrap()), SIZE);
                    flags = Some(u16::from_be_bytes([r.data[10], r.data[11]]));
                } else if typ == INFO_BLOCK_SIZE {
                    assert_eq!(r.data.len(), 14);
                    assert_eq!(&r.data[10..14], &MAX_PAYLOAD.to_be_bytes());
                }
            }
            REP_ACK => break,
            other => panic!("unexpected reply type {other:#x}"),
        }
    }
    flags.expect("NBD_INFO_EXPORT before the ACK")
}

async fn request(c: &mut DuplexStream, typ: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
    let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&typ.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    c.write_all(&h).await.unwrap();
}

/// One structured chunk: (flags, type, cookie, payload).
async fn chunk(c: &mut DuplexStream) -> (u16, u16, u64, Vec<u8>) {
    let magic = c.read_u32().await.unwrap();
    assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "expected a structured reply");
    let flags = c.read_u16().await.unwrap();
    let typ = c.read_u16().await.unwrap();
    let cookie = c.read_u64().await.unwrap();
    let len = c.read_u32().await.unwrap();
    let mut data = vec![0u8; len as usize];
    c.read_exact(&mut data).await.unwrap();
    (flags, typ, cookie, data)
}

/// A simple reply: (error, cookie).
async fn simple(c: &mut DuplexStream) -> (u32, u64) {
    assert_eq!(c.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
    (c.read_u32().await.unwrap(), c.read_u64().await.unwrap())
}

#[tokio::test]
async fn read_write_flush_zero_and_block_status_over_structured_replies() {
    let img = image(true).await;
    let (mut c, task) = start(NbdExport::new("disk", img.clone())).await;
    let flags = connect(&mut c, "disk").await;
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    for f in [
        FLAG_HAS_FLAGS,
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_DF,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x}");
    }

    // Write (with FUA), then read it back.
    request(&mut c, CMD_WRITE, CMD_FLAG_FUA, 7, 8192, 5).await;
    c.write_all(b"hello").await.unwrap();
    assert_eq!(simple(&mut c).await, (0, 7));
    request(&mut c, CMD_READ, 0, 8, 8190, 9).await;
    let (fl, typ, cookie, data) = chunk(&mut c).await;
    assert_eq!(
        (fl, typ, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8)
    );
    assert_eq!(&data[..8], &8190u64.to_be_bytes());
    assert_eq!(&data[8..], b"\0\0hello\0\0");
    let mut direct = [0u8; 5];
    img.read(8192, &mut direct).await.unwrap();
    assert_eq!(&direct, b"hello");

    // Zero the first block, flush, and ask for the allocation status.
    request(&mut c, CMD_WRITE_ZEROES, 0, 9, 0, 4096).await;
    assert_eq!(simple(&mut c).await, (0, 9));
    request(&mut c, CMD_FLUSH, 0, 10, 0, 0).await;
    assert_eq!(simple(&mut c).await, (0, 10));
    request(&mut c, CMD_READ, 0, 11, 0, 16).await;
    assert_eq!(&chunk(&mut c).await.3[8..], &[0u8; 16]);
    request(&mut c, CMD_BLOCK_STATUS, 0, 12, 0, SIZE as u32).await;
    let (fl, typ, cookie, data) = chunk(&mut c).await;
    assert_eq!(
        (fl, typ, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 12)
    );
    assert_eq!(&data[..4], &BASE_ALLOCATION_ID.to_be_bytes());
    let descs: Vec<(u32, u32)> = data[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        descs.iter().map(|d| d.0 as u64).sum::<u64>(),
        SIZE,
        "{descs:?}"
    );
    request(
        &mut c,
        CMD_BLOCK_STATUS,
        CMD_FLAG_REQ_ONE,
        13,
        0,
        SIZE as u32,
    )
    .await;
    let data = chunk(&mut c).await.3;
    assert_eq!(data.len(), 12, "REQ_ONE: one descriptor");

    // Trim is accepted (and ignored by default); cache is accepted.
    request(&mut c, CMD_TRIM, 0, 14, 8192, 5).await;
    assert_eq!(simple(&mut c).await, (0, 14));
    request(&mut c, CMD_CACHE, 0, 15, 0, 4096).await;
    assert_eq!(simple(&mut c).await, (0, 15));
    request(&mut c, CMD_READ, 0, 16, 8192, 5).await;
    assert_eq!(&chunk(&mut c).await.3[8..], b"hello");

    request(&mut c, CMD_DISC, 0, 17, 0, 0).await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn export_name_and_simple_replies_without_negotiation() {
    let img = image(true).await;
    let (mut c, task) = start(NbdExport::new("", img)).await;
    greet(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
    send_opt(&mut c, OPT_EXPORT_NAME, b"").await;
    assert_eq!(c.read_u64().await.unwrap(), SIZE);
    let flags = c.read_u16().await.unwrap();
    assert_eq!(flags & FLAG_SEND_DF, 0, "no DF without structured replies");
    let mut zeros = [1u8; 124];
    c.read_exact(&mut zeros).await.unwrap();
    assert_eq!(zeros, [0u8; 124], "124 zero bytes without NO_ZEROES");
    request(&mut c, CMD_READ, 0, 1, 0, 4).await;
    assert_eq!(simple(&mut c).await, (0, 1));
    let mut data = [0u8; 4];
    c.read_exact(&mut data).await.unwrap();
    assert_eq!(data, [0xab; 4]);
    // Without structured replies a failed read carries no data.
    request(&mut c, CMD_READ, 0, 2, SIZE, 1).await;
    assert_eq!(simple(&mut c).await, (EINVAL, 2));
    // No context was negotiated: block status is refused.
    request(&mut c, CMD_BLOCK_STATUS, 0, 3, 0, 512).await;
    assert_eq!(simple(&mut c).await, (EINVAL, 3));
    drop(c);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn list_info_unknown_exports_and_unsupported_options() {
    let img = image(false).await;
    let (mut c, task) = start(NbdExport::new("a", img).description("the disk")).await;
    greet(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    send_opt(&mut c, OPT_LIST, &[]).await;
    let r = opt_reply(&mut c).await;
    assert_eq!(r.typ, REP_SERVER);
    assert_eq!(&r.data, b"\0\0\0\x01athe disk");
    assert_eq!(opt_reply(&mut c).await.typ, REP_ACK);
    send_opt(&mut c, OPT_LIST, b"junk").await;
    assert_eq!(opt_reply(&mut c).await.typ, REP_ERR_INVALID);
    send_opt(&mut c, OPT_INFO, &go_data("b", &[])).await;
    assert_eq!(opt_reply(&mut c).await.typ, REP_ERR_UNKNOWN);
    // A name length pointing past the option's data.
    let mut bad = go_data("a", &[]);
    bad[3] = 200;
    send_opt(&mut c, OPT_INFO, &bad).await;
    assert_eq!(opt_reply(&mut c).await.typ, REP_ERR_INVALID);
    send_opt(&mut c, OPT_STARTTLS, &[]).await;
    assert_eq!(opt_reply(&mut c).await.typ, REP_ERR_UNSUP);
    send_opt(&mut c, 999, b"whatever").await;
    let r = opt_reply(&mut c).await;
    assert_eq!((r.opt, r.typ), (999, REP_ERR_UNSUP));
    // Meta contexts need structured replies first.
    send_opt(
        &mut c,
        OPT_SET_META_CONTEXT,
        &meta_data("a", &[BASE_ALLOCATION]),
    )
    .await;
    assert_eq!(opt_reply(&mut c).await.typ, REP_ERR_INVALID);
    send_opt(
        &mut c,
        OPT_INFO,
        &go_data("a", &[INFO_NAME, INFO_DESCRIPTION]),
    )
    .await;
    let mut seen = Vec::new();
    loop {
        let r = opt_reply(&mut c).await;
        if r.typ == REP_ACK {
            break;
        }
        assert_eq!(r.typ, REP_INFO);
        seen.push(r.data);
    }
    assert!(seen.iter().any(|d| d[..2] == INFO_EXPORT.to_be_bytes()
        && u16::from_be_bytes([d[10], d[11]]) & FLAG_READ_ONLY != 0));
    assert!(seen.contains(&b"\0\x01a".to_vec()));
    assert!(seen.contains(&b"\0\x02the disk".to_vec()));
    send_opt(&mut c, OPT_ABORT, &[]).await;
    assert_eq!(opt_reply(&mut c).await.typ, REP_ACK);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn read_only_exports_refuse_writes_and_bounds_are_checked() {
    let img = image(true).await;
    let (mut c, task) = start(NbdExport::new("", img.clone()).read_only(true)).await;
    let flags = connect(&mut c, "").await;
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    request(&mut c, CMD_WRITE, 0, 1, 0, 3).await;
    c.write_all(b"abc").await.unwrap();
    assert_eq!(simple(&mut c).await, (EPERM, 1));
    request(&mut c, CMD_WRITE_ZEROES, 0, 2, 0, 512).await;
    assert_eq!(simple(&mut c).await, (EPERM, 2));
    request(&mut c, CMD_TRIM, 0, 3, 0, 512).await;
    assert_eq!(simple(&mut c).await, (EPERM, 3));
    // Reads past the end, and an offset that overflows.
    request(&mut c, CMD_READ, 0, 4, SIZE - 1, 2).await;
    let (fl, typ, cookie, data) = chunk(&mut c).await;
    assert_eq!((fl, typ, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 4));
    assert_eq!(&data[..4], &EINVAL.to_be_bytes());
    request(&mut c, CMD_READ, 0, 5, u64::MAX, 2).await;
    assert_eq!(chunk(&mut c).await.1, REPLY_TYPE_ERROR);
    // Unknown command and a flag that does not belong to the command.
    request(&mut c, 42, 0, 6, 0, 0).await;
    assert_eq!(simple(&mut c).await, (EINVAL, 6));
    request(&mut c, CMD_FLUSH, CMD_FLAG_NO_HOLE, 7, 0, 0).await;
    assert_eq!(simple(&mut c).await, (EINVAL, 7));
    let mut head = [0u8; 3];
    img.read(0, &mut head).await.unwrap();
    assert_eq!(head, [0xab; 3], "nothing written");
    drop(c);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn writes_past_the_end_fail_with_enospc() {
    let (mut c, task) = start(NbdExport::new("", image(true).await)).await;
    connect(&mut c, "").await;
    request(&mut c, CMD_WRITE, 0, 1, SIZE - 2, 4).await;
    c.write_all(b"abcd").await.unwrap();
    assert_eq!(simple(&mut c).await, (ENOSPC, 1));
    request(&mut c, CMD_WRITE_ZEROES, 0, 2, SIZE, 1).await;
    assert_eq!(simple(&mut c).await, (ENOSPC, 2));
    drop(c);
    task.await.unwrap().unwrap();
}

/// Lengths a client can name are not memory the server hands out: an option or a write
/// longer than the limits is skipped (read and dropped), and the session goes on.
#[tokio::test]
async fn oversized_options_and_requests_are_refused_without_buffering_them() {
    let (mut c, task) = start(NbdExport::new("", image(true).await)).await;
    greet(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let big = vec![0u8; MAX_OPTION as usize + 1];
    send_opt(&mut c, OPT_LIST, &big).await;
    assert_eq!(opt_reply(&mut c).await.typ, REP_ERR_TOO_BIG);
    send_opt(&mut c, OPT_GO, &go_data("", &[])).await;
    while opt_reply(&mut c).await.typ != REP_ACK {}
    // A write of MAX_PAYLOAD + 1 bytes: the payload is consumed, the request refused.
    let n = MAX_PAYLOAD + 1;
    request(&mut c, CMD_WRITE, 0, 1, 0, n).await;
    let writer = {
        let mut sent = 0u32;
        let chunk = vec![0x55u8; 1 << 16];
        async move {
            while sent < n {
                let k = (n - sent).min(chunk.len() as u32);
                c.write_all(&chunk[..k as usize]).await.unwrap();
                sent += k;
            }
            c
        }
    };
    let mut c = writer.await;
    assert_eq!(simple(&mut c).await, (EINVAL, 1));
    // Reads longer than the maximum payload are refused up front.
    request(&mut c, CMD_READ, 0, 2, 0, u32::MAX).await;
    assert_eq!(simple(&mut c).await, (EINVAL, 2));
    request(&mut c, CMD_READ, 0, 3, 0, 4).await;
    assert_eq!(simple(&mut c).await, (0, 3));
    let mut data = [0u8; 4];
    c.read_exact(&mut data).await.unwrap();
    assert_eq!(data, [0xab; 4], "the skipped write changed nothing");
    drop(c);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn protocol_violations_end_the_connection_with_an_error() {
    // Unknown client flags.
    let (mut c, task) = start(NbdExport::new("", image(false).await)).await;
    greet(&mut c, 1 << 7).await;
    assert!(task.await.unwrap().is_err());
    drop(c);

    // A bad option magic.
    let (mut c, task) = start(NbdExport::new("", image(false).await)).await;
    greet(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
    c.write_all(&[0x42; 16]).await.unwrap();
    assert!(task.await.unwrap().is_err());

    // EXPORT_NAME of an export that does not exist: the only answer is a hang-up.
    let (mut c, task) = start(NbdExport::new("", image(false).await)).await;
    greet(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
    send_opt(&mut c, OPT_EXPORT_NAME, b"nope").await;
    assert!(task.await.unwrap().is_err());

    // A bad request magic in transmission.
    let (mut c, task) = start(NbdExport::new("", image(false).await)).await;
    connect(&mut c, "").await;
    c.write_all(&[0x13; 28]).await.unwrap();
    assert!(task.await.unwrap().is_err());

    // A client that hangs up after the greeting is not an error.
    let (mut c, task) = start(NbdExport::new("", image(false).await)).await;
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).await.unwrap();
    drop(c);
    task.await.unwrap().unwrap();
}

/// Many requests in flight at once on one connection: every one answered once, with its
/// own data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_all_answered_with_their_own_data() {
    let img = image(true).await;
    let (mut c, task) = start(NbdExport::new("", img)).await;
    connect(&mut c, "").await;
    const N: u64 = 64;
    for i in 0..N {
        request(&mut c, CMD_WRITE, 0, i, i * 4096, 4096).await;
        c.write_all(&[i as u8; 4096]).await.unwrap();
    }
    let mut cookies: Vec<u64> = Vec::new();
    for _ in 0..N {
        let (err, cookie) = simple(&mut c).await;
        assert_eq!(err, 0);
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, (0..N).collect::<Vec<_>>());
    for i in 0..N {
        request(&mut c, CMD_READ, 0, 1000 + i, i * 4096, 4096).await;
    }
    let mut seen = 0;
    for _ in 0..N {
        let (_, typ, cookie, data) = chunk(&mut c).await;
        assert_eq!(typ, REPLY_TYPE_OFFSET_DATA);
        let i = cookie - 1000;
        assert_eq!(&data[..8], &(i * 4096).to_be_bytes());
        assert!(data[8..].iter().all(|&b| b == i as u8), "read {i}");
        seen += 1;
    }
    assert_eq!(seen, N);
    request(&mut c, CMD_DISC, 0, 0, 0, 0).await;
    task.await.unwrap().unwrap();
}

async fn start_with(
    server: NbdServer,
    pipe: usize,
) -> (DuplexStream, tokio::task::JoinHandle<Result<()>>) {
    let (client, server_end) = tokio::io::duplex(pipe);
    let task = tokio::spawn(async move { server.serve(server_end).await });
    (client, task)
}

#[tokio::test]
async fn zero_length_reads_and_block_status() {
    let (mut c, task) = start(NbdExport::new("", image(false).await)).await;
    connect(&mut c, "").await;
    request(&mut c, CMD_READ, 0, 1, 512, 0).await;
    let (fl, typ, cookie, data) = chunk(&mut c).await;
    assert_eq!((fl, typ, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1));
    assert!(data.is_empty());
    request(&mut c, CMD_BLOCK_STATUS, 0, 2, 512, 0).await;
    let (_, typ, _, data) = chunk(&mut c).await;
    assert_eq!(typ, REPLY_TYPE_ERROR);
    assert_eq!(&data[..4], &EINVAL.to_be_bytes());
    // REQ_ONE at an unaligned offset: one descriptor, no longer than asked.
    request(&mut c, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 3, 1000, 3000).await;
    let data = chunk(&mut c).await.3;
    assert_eq!(data.len(), 12);
    assert!(u32::from_be_bytes(data[4..8].try_into().unwrap()) <= 3000);
    // Flags that do not belong: DF-less REQ_ONE on a read, NO_HOLE on a read.
    request(&mut c, CMD_READ, CMD_FLAG_REQ_ONE, 4, 0, 512).await;
    assert_eq!(chunk(&mut c).await.1, REPLY_TYPE_ERROR);
    request(&mut c, CMD_READ, CMD_FLAG_DF, 5, 0, 512).await;
    assert_eq!(
        chunk(&mut c).await.1,
        REPLY_TYPE_OFFSET_DATA,
        "DF is fine once structured"
    );
    drop(c);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn df_without_structured_replies_is_refused() {
    let (mut c, task) = start(NbdExport::new("", image(false).await)).await;
    greet(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    send_opt(&mut c, OPT_EXPORT_NAME, b"").await;
    c.read_u64().await.unwrap();
    c.read_u16().await.unwrap();
    request(&mut c, CMD_READ, CMD_FLAG_DF, 1, 0, 512).await;
    assert_eq!(simple(&mut c).await, (EINVAL, 1));
    drop(c);
    task.await.unwrap().unwrap();
}

/// A client that stops reading replies: once its requests in flight hold the connection's
/// budget, the server stops reading requests (a later write is not carried out) instead of
/// buffering without bound; reading the replies lets it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_replies_is_held_back_by_the_budget() {
    let img = image(true).await;
    let server = NbdServer::new()
        .export(NbdExport::new("", img.clone()))
        .max_in_flight(128 << 10);
    let (mut c, task) = start_with(server, 4096).await;
    connect(&mut c, "").await;
    for i in 0..6u64 {
        request(&mut c, CMD_READ, 0, i, i * 32768, 32768).await;
    }
    request(&mut c, CMD_WRITE, 0, 99, 0, 1).await;
    c.write_all(b"X").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut first = [0u8; 1];
    img.read(0, &mut first).await.unwrap();
    assert_eq!(first, [0xab], "the write was read while replies were stuck");
    let mut cookies = Vec::new();
    for _ in 0..7 {
        let (_, _, cookie, _) = chunk_or_simple(&mut c).await;
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, vec![0, 1, 2, 3, 4, 5, 99]);
    img.read(0, &mut first).await.unwrap();
    assert_eq!(&first, b"X");
    drop(c);
    task.await.unwrap().unwrap();
}

/// A structured chunk or a simple reply, as (flags, type, cookie, payload); simple replies
/// come back with type u16::MAX and their error as the payload.
async fn chunk_or_simple(c: &mut DuplexStream) -> (u16, u16, u64, Vec<u8>) {
    let magic = c.read_u32().await.unwrap();
    if magic == SIMPLE_REPLY_MAGIC {
        let err = c.read_u32().await.unwrap();
        let cookie = c.read_u64().await.unwrap();
        return (0, u16::MAX, cookie, err.to_be_bytes().to_vec());
    }
    assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
    let flags = c.read_u16().await.unwrap();
    let typ = c.read_u16().await.unwrap();
    let cookie = c.read_u64().await.unwrap();
    let len = c.read_u32().await.unwrap();
    let mut data = vec![0u8; len as usize];
    c.read_exact(&mut data).await.unwrap();
    (flags, typ, cookie, data)
}

/// After DISC every request already sent is carried out and answered, then the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_answers_requests_in_flight_first() {
    let img = image(true).await;
    let (mut c, task) = start(NbdExport::new("", img.clone())).await;
    connect(&mut c, "").await;
    for i in 0..8u64 {
        request(&mut c, CMD_WRITE, CMD_FLAG_FUA, i, 65536 + i * 4096, 4096).await;
        c.write_all(&[i as u8 + 1; 4096]).await.unwrap();
    }
    request(&mut c, CMD_DISC, 0, 100, 0, 0).await;
    let mut cookies = Vec::new();
    for _ in 0..8 {
        let (err, cookie) = simple(&mut c).await;
        assert_eq!(err, 0);
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, (0..8).collect::<Vec<_>>());
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "nothing after the last reply");
    task.await.unwrap().unwrap();
    for i in 0..8u64 {
        let mut b = [0u8; 4096];
        img.read(65536 + i * 4096, &mut b).await.unwrap();
        assert!(b.iter().all(|&x| x == i as u8 + 1));
    }
}

#[tokio::test]
async fn metadata_context_selection_rules() {
    let img = image(false).await;
    let server = NbdServer::new()
        .export(NbdExport::new("a", img.clone()))
        .export(NbdExport::new("b", img));
    let (mut c, task) = start_with(server, 1 << 16).await;
    greet(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    send_opt(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(opt_reply(&mut c).await.typ, REP_ACK);
    // LIST with no query, and with the namespace wildcard: base:allocation, id 0.
    for q in [&[][..], &["base:"][..]] {
        send_opt(&mut c, OPT_LIST_META_CONTEXT, &meta_data("a", q)).await;
        let r = opt_reply(&mut c).await;
        assert_eq!(r.typ, REP_META_CONTEXT);
        assert_eq!(&r.data[..4], &[0, 0, 0, 0]);
        assert_eq!(opt_reply(&mut c).await.typ, REP_ACK);
    }
    // SET with the wildcard or an unknown namespace selects nothing.
    send_opt(
        &mut c,
        OPT_SET_META_CONTEXT,
        &meta_data("a", &["base:", "x-other:y"]),
    )
    .await;
    assert_eq!(opt_reply(&mut c).await.typ, REP_ACK);
    // A malformed query count.
    let mut bad = meta_data("a", &[BASE_ALLOCATION]);
    bad[8] = 9;
    send_opt(&mut c, OPT_SET_META_CONTEXT, &bad).await;
    assert_eq!(opt_reply(&mut c).await.typ, REP_ERR_INVALID);
    // Selected for "a", then GO to "b": block status is refused there.
    send_opt(
        &mut c,
        OPT_SET_META_CONTEXT,
        &meta_data("a", &[BASE_ALLOCATION]),
    )
    .await;
    assert_eq!(opt_reply(&mut c).await.typ, REP_META_CONTEXT);
    assert_eq!(opt_reply(&mut c).await.typ, REP_ACK);
    send_opt(&mut c, OPT_GO, &go_data("b", &[])).await;
    while opt_reply(&mut c).await.typ != REP_ACK {}
    request(&mut c, CMD_BLOCK_STATUS, 0, 1, 0, 4096).await;
    let (_, typ, _, data) = chunk(&mut c).await;
    assert_eq!(typ, REPLY_TYPE_ERROR);
    assert_eq!(&data[..4], &EINVAL.to_be_bytes());
    drop(c);
    task.await.unwrap().unwrap();
}

/// Storage errors reach the client as NBD errors naming the kind of failure, not host paths.
#[tokio::test]
async fn storage_errors_become_nbd_errors() {
    use crate::storage::{FaultKind, FaultOp, FaultStorage};
    let storage = Arc::new(FaultStorage::from_bytes(&vec![0u8; SIZE as usize]));
    let img = ImageOpen::storage(storage.clone())
        .format(crate::Format::RAW)
        .writable(true)
        .open()
        .await
        .unwrap();
    let (mut c, task) = start(NbdExport::new("", img)).await;
    connect(&mut c, "").await;
    storage.fail_nth(FaultOp::Read, 1, FaultKind::Eio);
    request(&mut c, CMD_READ, 0, 1, 0, 512).await;
    let (fl, typ, _, data) = chunk(&mut c).await;
    assert_eq!((fl, typ), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR));
    assert_eq!(&data[..4], &EIO.to_be_bytes());
    let text = String::from_utf8_lossy(&data[6..]).into_owned();
    assert_eq!(text, "I/O error");
    storage.fail_nth(FaultOp::Write, 1, FaultKind::NoSpace);
    request(&mut c, CMD_WRITE, 0, 2, 0, 3).await;
    c.write_all(b"abc").await.unwrap();
    assert_eq!(simple(&mut c).await, (ENOSPC, 2));
    storage.fail_nth(FaultOp::Sync, 1, FaultKind::Eio);
    request(&mut c, CMD_FLUSH, 0, 3, 0, 0).await;
    assert_eq!(simple(&mut c).await, (EIO, 3));
    drop(c);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let server = NbdServer::new()
        .export(NbdExport::new("", image(false).await))
        .handshake_timeout(std::time::Duration::from_millis(100));
    let (c, task) = start_with(server, 4096).await;
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), task)
        .await
        .expect("the server gave up on the silent client")
        .unwrap();
    assert!(r.is_err());
    drop(c);
}

/// `shutdown` ends connections: the handshake of a new one, and a connection in
/// transmission once its requests are answered.
#[tokio::test]
async fn shutdown_ends_connections_after_answering_them() {
    let server = NbdServer::new().export(NbdExport::new("", image(true).await));
    let (mut c, task) = start_with(server.clone(), 1 << 16).await;
    connect(&mut c, "").await;
    request(&mut c, CMD_READ, 0, 1, 0, 16).await;
    assert_eq!(&chunk(&mut c).await.3[8..], &[0xab; 16]);
    server.shutdown();
    task.await.unwrap().unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    // A connection arriving after the shutdown gets the greeting and nothing more.
    let (mut c, task) = start_with(server, 1 << 16).await;
    task.await.unwrap().unwrap();
    let mut hello = Vec::new();
    c.read_to_end(&mut hello).await.unwrap();
    assert!(hello.len() <= 18);
}
