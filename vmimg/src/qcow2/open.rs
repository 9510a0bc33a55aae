//! Opening a qcow2 layer: the format's entry points ([`Qcow2Format`]), with what QEMU does
//! at open time: a dirty image (lazy refcounts, crashed) opened for writing gets its
//! refcounts rebuilt first, and an external data file is opened through the policy.

use super::{check, options, read_header, Qcow2Driver, Qcow2Params};
use crate::format::{
    BackingName, CheckReport, Format, FormatOptions, ImageFormat, ImplicitOpenKind, LayerOpen,
    Measure, MeasureSource, OpenedLayer, OptionSpec, Repair,
};
use crate::storage::{BoxFuture, Storage};
use crate::{Error, ErrorKind, Result};
use std::path::Path;
use std::sync::Arc;

/// The qcow2 format's entry points.
#[derive(Debug)]
pub struct Qcow2Format;

/// The qcow2 format.
pub const QCOW2: Format = Format::new(&Qcow2Format);

impl ImageFormat for Qcow2Format {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    /// QEMU's `qcow2_probe`: the magic `QFI\xfb` and a version of 2 or more (any version:
    /// unsupported ones probe as qcow2 and fail to open).
    fn probe(&self, first: &[u8], _filename: Option<&str>, _file_size: u64) -> u32 {
        let version = first
            .get(4..8)
            .map(|v| u32::from_be_bytes(v.try_into().expect("4 bytes")));
        if first.starts_with(b"QFI\xfb") && version.is_some_and(|v| v >= 2) {
            100
        } else {
            0
        }
    }

    fn owns_metadata(&self) -> bool {
        true
    }

    fn has_backing(&self) -> bool {
        true
    }

    fn compressed_writes(&self) -> bool {
        true
    }

    fn persistent_bitmaps(&self) -> bool {
        true
    }

    fn open<'a>(&'a self, layer: LayerOpen<'a>) -> BoxFuture<'a, Result<OpenedLayer>> {
        Box::pin(open_layer(layer))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        options::CREATE_OPTIONS
    }

    fn create_summary(&self, options: &FormatOptions) -> String {
        options::summary(options)
    }

    fn create<'a>(
        &'a self,
        path: &'a Path,
        options: &'a FormatOptions,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { options::create_from_options(options)?.create(path).await })
    }

    fn amend_options(&self) -> &'static [&'static str] {
        options::AMEND_OPTIONS
    }

    fn measure(&self, options: &FormatOptions, source: &MeasureSource) -> Result<Measure> {
        options::measure(options, source)
    }

    fn measure_unit(&self, options: &FormatOptions) -> Result<u64> {
        options::measure_unit(options)
    }

    fn check<'a>(
        &'a self,
        file: &'a dyn Storage,
        repair: Repair,
    ) -> BoxFuture<'a, Result<CheckReport>> {
        Box::pin(check::check(file, repair))
    }
}

async fn open_layer(layer: LayerOpen<'_>) -> Result<OpenedLayer> {
    let storage = layer.storage;
    if layer.snapshot.is_some() && layer.writable {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "snapshots can only be opened read-only",
        ));
    }
    let mut header = read_header(storage.as_ref()).await?;
    if layer.writable && header.is_dirty() && !header.is_corrupt() {
        // Left dirty by a crash with lazy refcounts: rebuild the refcounts before writing,
        // as QEMU does.
        let report = check::check(storage.as_ref(), check::Repair::All).await?;
        if report.failure.is_some() || report.corruptions > report.corruptions_fixed {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "the image is dirty and its refcounts could not be rebuilt",
            ));
        }
        header = read_header(storage.as_ref()).await?;
    }
    let data_file = match (layer.data_file, &header.data_file) {
        (Some(d), _) => Some(d),
        _ if !header.has_data_file() => None,
        (None, Some(name)) => {
            let resolved = storage.resolve_name(name)?;
            let kind = ImplicitOpenKind::DataFile;
            let named_by = storage.path();
            let file = layer
                .files
                .open(kind, name, &resolved.path, named_by, layer.writable)
                .await?;
            Some(file)
        }
        (None, None) => None,
    };
    if let Some(d) = &data_file {
        let (perm, shared) = layer.permissions;
        d.set_permissions(perm, shared)?;
    }
    let backing = header.backing_file.clone().map(|name| BackingName {
        name,
        format: header.backing_format.clone(),
        expected_id: None,
    });
    let driver = Qcow2Driver::open(Qcow2Params {
        file: Arc::clone(&storage),
        header,
        data_file,
        l2_cache_bytes: layer.cache_bytes,
        snapshot: layer.snapshot.map(str::to_owned),
        writable: layer.writable,
    })
    .await?;
    Ok(OpenedLayer {
        driver: Arc::new(driver),
        backing,
    })
}
