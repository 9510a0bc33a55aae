//! `vmimg serve`: export an image over NBD (like `qemu-nbd`).

use crate::{cache_mode, open_image_with, usage_error, CmdResult};
use clap::Args;
use std::path::{Path, PathBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use vmimg::nbd::{NbdExport, NbdServer};
use vmimg::{Error, OpenOptions, Permissions};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// TCP port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    port: u16,
    /// Address to listen on.
    #[arg(short = 'b', long = "bind", default_value = "0.0.0.0")]
    bind: String,
    /// Listen on this Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket")]
    socket: Option<PathBuf>,
    /// Export name (the default export is "").
    #[arg(short = 'x', long = "export-name", default_value = "")]
    name: String,
    /// Export description.
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Clients served at once (0: no limit); more wait to be accepted.
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// What NBD trims do: `ignore` (succeed, change nothing) or `unmap` (discard).
    #[arg(long = "discard", default_value = "ignore")]
    discard: String,
    /// Cache mode: writeback, writethrough, none, directsync, unsafe.
    #[arg(long = "cache", default_value = "writeback")]
    cache: String,
    /// Force share: export even if another process writes the image (read-only exports
    /// only).
    #[arg(long = "force-share")]
    force_share: bool,
    /// The image.
    file: String,
}

/// Where clients come from.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

pub async fn run(args: ServeArgs) -> CmdResult {
    let trim = match args.discard.as_str() {
        "ignore" | "off" => false,
        "unmap" | "on" => true,
        other => return Err(usage_error(format!("Invalid discard option: {other}"))),
    };
    // As qemu-nbd: nobody may resize the image while it is exported.
    let opts = OpenOptions::new()
        .writable(!args.read_only)
        .force_share(args.force_share)
        .share(Permissions::ALL.without(Permissions::RESIZE));
    let opts = cache_mode(opts, &args.cache)?;
    let image = open_image_with(&args.file, args.format.as_deref(), opts).await?;
    let export = NbdExport::new(args.name.clone(), image.clone())
        .description(args.description.clone())
        .read_only(args.read_only)
        .trim(trim)
        // Clients may open several connections only if they will all be accepted.
        .multi_conn(args.shared != 1);
    let server = NbdServer::new().export(export);

    let listener = match &args.socket {
        Some(path) => Listener::Unix(bind_unix(path)?, path.clone()),
        None => Listener::Tcp(
            TcpListener::bind((args.bind.as_str(), args.port))
                .await
                .map_err(|e| Error::from(e).with_operation("bind"))?,
        ),
    };
    let mut conns = JoinSet::new();
    let result = accept_loop(&listener, &server, &args, &mut conns).await;
    // No new clients; those connected finish their requests in flight (bounded wait).
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    server.shutdown();
    let drained = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        eprintln!("vmimg serve: clients still busy after 30 s; stopping them");
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    // The image's metadata goes to the OS before exiting.
    let flushed = image.flush().await;
    result.and(flushed).map(|()| 0)
}

/// Binds a Unix socket at `path`, replacing a stale socket file (one nobody listens on,
/// left by a killed server) but nothing else.
fn bind_unix(path: &Path) -> Result<UnixListener, Error> {
    let err = |e: std::io::Error| Error::from(e).with_operation("bind").with_path(path);
    match UnixListener::bind(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            use std::os::unix::fs::FileTypeExt;
            let is_socket =
                std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            if is_socket && std::os::unix::net::UnixStream::connect(path).is_err() {
                std::fs::remove_file(path).map_err(err)?;
                UnixListener::bind(path).map_err(err)
            } else {
                Err(err(e))
            }
        }
        r => r.map_err(err),
    }
}

async fn accept_loop(
    listener: &Listener,
    server: &NbdServer,
    args: &ServeArgs,
    conns: &mut JoinSet<bool>,
) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |kind| signal(kind).map_err(|e| Error::from(e).with_operation("signal"));
    let (mut term, mut int) = (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?);
    let mut hup = sig(SignalKind::hangup())?;
    let limit = if args.shared == 0 {
        usize::MAX
    } else {
        args.shared
    };
    loop {
        // Like qemu-nbd: without -t, exit when a client that got to use the export leaves
        // and no other is connected.
        let ended = |r: Result<bool, tokio::task::JoinError>, conns: &JoinSet<bool>| {
            let negotiated = r.unwrap_or(false);
            negotiated && conns.is_empty() && !args.persistent
        };
        if conns.len() >= limit {
            tokio::select! {
                Some(r) = conns.join_next() => {
                    if ended(r, conns) {
                        return Ok(());
                    }
                }
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                _ = hup.recv() => return Ok(()),
            }
            continue;
        }
        let conn = tokio::select! {
            a = accept(listener) => a,
            Some(r) = conns.join_next() => {
                if ended(r, conns) {
                    return Ok(());
                }
                continue;
            }
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => return Ok(()),
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors, say: wait a little rather than spin.
                eprintln!("vmimg serve: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = server.clone();
        conns.spawn(async move {
            let (negotiated, r) = match conn {
                Conn::Tcp(s) => {
                    let _ = s.set_nodelay(true);
                    serve_one(&server, s).await
                }
                Conn::Unix(s) => serve_one(&server, s).await,
            };
            if let Err(e) = r {
                eprintln!("vmimg serve: client: {e}");
            }
            negotiated
        });
    }
}

/// Serves one client; also says whether it got past the handshake.
async fn serve_one<S>(server: &NbdServer, stream: S) -> (bool, Result<(), Error>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match server.handshake(stream).await {
        Ok(Some(conn)) => (true, conn.run().await),
        Ok(None) => (false, Ok(())),
        Err(e) => (false, Err(e)),
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Conn> {
    Ok(match listener {
        Listener::Tcp(l) => Conn::Tcp(l.accept().await?.0),
        Listener::Unix(l, _) => Conn::Unix(l.accept().await?.0),
    })
}
