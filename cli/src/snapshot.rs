//! `vmimg snapshot`: list internal snapshots (creating, applying and deleting are not
//! supported yet).

use crate::info::snapshot_table;
use crate::{open_image_with, usage_error, CmdResult};
use clap::Args;
use vmimg::{Error, ErrorKind, OpenOptions};

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// Image format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Apply (revert to) a snapshot.
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete a snapshot.
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Force share: open even if another process writes the image (its content may then
    /// read inconsistently).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: String,
}

pub async fn run(args: SnapshotArgs) -> CmdResult {
    if args.create.is_some() || args.apply.is_some() || args.delete.is_some() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "creating, applying and deleting internal snapshots is not supported yet",
        ));
    }
    if !args.list {
        return Err(usage_error("snapshot: one of -l, -c, -a, -d is required"));
    }
    let opts = OpenOptions::new().force_share(args.force_share);
    let image = open_image_with(&args.filename, args.format.as_deref(), opts).await?;
    let snapshots = image.describe().snapshots;
    // As qemu-img: nothing at all for an image without snapshots.
    if !snapshots.is_empty() {
        print!("Snapshot list:\n{}", snapshot_table(&snapshots));
    }
    Ok(0)
}
