//! `vmimg serve`: export an image over NBD (like `qemu-nbd`).

use crate::{cache_mode, open_image_with, usage_error, CmdResult};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, Semaphore};
use vmimg::nbd::{NbdExport, NbdServer};
use vmimg::{Error, OpenOptions};

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
    let opts = cache_mode(OpenOptions::new().writable(!args.read_only), &args.cache)?;
    let image = open_image_with(&args.file, args.format.as_deref(), opts).await?;
    let export = NbdExport::new(args.name.clone(), image.clone())
        .description(args.description.clone())
        .read_only(args.read_only)
        .trim(trim);
    let server = NbdServer::new().export(export);

    let listener = match &args.socket {
        Some(path) => Listener::Unix(
            UnixListener::bind(path).map_err(|e| {
                Error::from(e)
                    .with_operation("bind")
                    .with_path(path.as_path())
            })?,
            path.clone(),
        ),
        None => Listener::Tcp(
            TcpListener::bind((args.bind.as_str(), args.port))
                .await
                .map_err(|e| Error::from(e).with_operation("bind"))?,
        ),
    };
    let result = accept_loop(&listener, &server, &args).await;
    // Whatever ended the loop, the image's metadata goes to the OS before exiting.
    let flushed = image.flush().await;
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    result.and(flushed).map(|()| 0)
}

async fn accept_loop(
    listener: &Listener,
    server: &NbdServer,
    args: &ServeArgs,
) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |kind| signal(kind).map_err(|e| Error::from(e).with_operation("signal"));
    let (mut term, mut int) = (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?);
    let slots = Arc::new(Semaphore::new(if args.shared == 0 {
        Semaphore::MAX_PERMITS
    } else {
        args.shared
    }));
    // One message per connection that ends: whether it got past the handshake.
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<bool>();
    let mut active = 0usize;
    let mut served = false;
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("never closed"),
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            Some(negotiated) = ended.recv() => {
                active -= 1;
                served |= negotiated;
                // Like qemu-nbd: without -t, exit once a client that got to use the
                // export has left and no other is connected.
                if served && active == 0 && !args.persistent {
                    return Ok(());
                }
                continue;
            }
        };
        let accepted = tokio::select! {
            a = accept(listener) => a,
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            Some(negotiated) = ended.recv() => {
                active -= 1;
                served |= negotiated;
                // Like qemu-nbd: without -t, exit once a client that got to use the
                // export has left and no other is connected.
                if served && active == 0 && !args.persistent {
                    return Ok(());
                }
                continue;
            }
        };
        let conn = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("vmimg serve: accept: {e}");
                continue;
            }
        };
        active += 1;
        let (server, ended_tx) = (server.clone(), ended_tx.clone());
        tokio::spawn(async move {
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
            drop(slot);
            let _ = ended_tx.send(negotiated);
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
