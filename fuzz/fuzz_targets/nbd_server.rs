//! Fuzzes the NBD server with hostile clients: the input is what the client sends. Its first
//! byte picks the mode: even, the whole rest is the client's stream from the first byte of
//! the handshake; odd, a well-formed handshake (structured replies, `base:allocation`,
//! `NBD_OPT_GO`) comes first and the rest is transmission-phase requests. The export is a
//! writable 4 MiB qcow2 image in memory (small clusters, so writes allocate and block status
//! has extents to report). Everything the server sends is read and dropped. Errors and
//! hang-ups are expected; a panic, a hang (the 20 s bound: the server must finish once the
//! client's stream ends) or memory beyond libFuzzer's RSS limit is a bug.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmimg::nbd::{NbdExport, NbdServer};
use vmimg::{MemoryStorage, Qcow2Create, Qcow2Open, Storage};

const LIMIT: Duration = Duration::from_secs(20);

/// Client flags, then STRUCTURED_REPLY, SET_META_CONTEXT("", base:allocation), GO("").
fn handshake() -> Vec<u8> {
    const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    let opt = |out: &mut Vec<u8>, opt: u32, data: &[u8]| {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    };
    let mut out = 3u32.to_be_bytes().to_vec();
    opt(&mut out, 8, &[]);
    let mut meta = 0u32.to_be_bytes().to_vec();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    opt(&mut out, 10, &meta);
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&3u16.to_be_bytes());
    opt(&mut out, 7, &go);
    out
}

async fn export() -> vmimg::Image {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    Qcow2Create::new(4 << 20)
        .cluster_size(4096)
        .create_on(storage.as_ref(), None)
        .await
        .expect("create the export");
    Qcow2Open::storage(storage)
        .writable(true)
        .open()
        .await
        .expect("open the export")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = if mode & 1 == 1 {
        handshake()
    } else {
        Vec::new()
    };
    input.extend_from_slice(rest);
    common::runtime().block_on(async {
        let image = export().await;
        let server = NbdServer::new()
            .export(NbdExport::new("", image).trim(mode & 2 == 2))
            .max_in_flight(4 << 20);
        let (client, server_end) = tokio::io::duplex(1 << 16);
        let serving = tokio::spawn(async move { server.serve(server_end).await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let talk = async {
            let send = async {
                // The server may hang up early: then the rest is not sent.
                let _ = wr.write_all(&input).await;
                let _ = wr.shutdown().await;
            };
            let drain = async {
                let mut sink = vec![0u8; 1 << 16];
                while let Ok(n) = rd.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::join!(send, drain);
            // A panic in the server task is a finding: re-raise it.
            if let Err(e) = serving.await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        };
        tokio::time::timeout(LIMIT, talk)
            .await
            .expect("the server did not finish within 20 s of the client's stream ending");
    });
});
