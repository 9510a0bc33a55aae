//! Creating qcow2 images with every option qemu-img offers.
//!
//! ```text
//!  cluster 0 | header, extensions, backing name
//!  1 ..      | refcount table (R clusters)
//!  ..        | refcount blocks (B clusters, counting everything below)
//!  ..        | L1 table (L clusters)
//!  ..        | L2 tables and data clusters   (preallocation=metadata|falloc|full only)
//! ```
//! R and B are found by a fixed point: the blocks must count themselves and the table.

use super::header::{self, autoclear, compat, incompat, CompressionType, Header};
use super::l2::COPIED;
use super::refcount::set_entry;
use super::types::Geometry;
use crate::storage::{FileStorageOpen, NewFile, Permissions, PreallocMode, Storage, StorageExt};
use crate::{Error, ErrorKind, Result};
use std::path::PathBuf;

/// Builder for new qcow2 images (`qemu-img create -f qcow2 -o ...`).
#[derive(Clone, Debug)]
pub struct Qcow2Create {
    size: u64,
    version: u32,
    cluster_size: u64,
    refcount_bits: u32,
    backing: Option<(String, Option<String>)>,
    data_file: Option<String>,
    data_file_raw: bool,
    extended_l2: bool,
    compression: CompressionType,
    lazy_refcounts: bool,
    prealloc: PreallocMode,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

impl Qcow2Create {
    /// A v3 image of `size` bytes with 64 KiB clusters and 16-bit refcounts (qemu-img's
    /// defaults).
    pub fn new(size: u64) -> Self {
        Qcow2Create {
            size,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            backing: None,
            data_file: None,
            data_file_raw: false,
            extended_l2: false,
            compression: CompressionType::Deflate,
            lazy_refcounts: false,
            prealloc: PreallocMode::Off,
        }
    }

    /// `compat`: `0.10` (version 2) or `1.1` (version 3).
    pub fn compat(mut self, compat: &str) -> Result<Self> {
        self.version = match compat {
            "0.10" => 2,
            "1.1" | "v3" => 3,
            other => return Err(invalid(format!("Invalid compatibility level: '{other}'"))),
        };
        Ok(self)
    }

    /// Cluster size in bytes: a power of two from 512 B to 2 MiB.
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }

    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64.
    pub fn refcount_bits(mut self, bits: u32) -> Self {
        self.refcount_bits = bits;
        self
    }

    /// The backing file name as it will be stored, and its format.
    pub fn backing_file(mut self, name: impl Into<String>, format: Option<String>) -> Self {
        self.backing = Some((name.into(), format));
        self
    }

    /// Keep guest data in this external data file (the name is stored in the image).
    pub fn data_file(mut self, name: impl Into<String>) -> Self {
        self.data_file = Some(name.into());
        self
    }

    /// Whether the data file is kept a consistent raw image.
    pub fn data_file_raw(mut self, raw: bool) -> Self {
        self.data_file_raw = raw;
        self
    }

    /// Extended L2 entries (32 subclusters per cluster).
    pub fn extended_l2(mut self, on: bool) -> Self {
        self.extended_l2 = on;
        self
    }

    /// Compression type of compressed clusters.
    pub fn compression_type(mut self, c: CompressionType) -> Self {
        self.compression = c;
        self
    }

    /// Lazy refcounts.
    pub fn lazy_refcounts(mut self, on: bool) -> Self {
        self.lazy_refcounts = on;
        self
    }

    /// Preallocation: off, metadata, falloc or full.
    pub fn preallocation(mut self, mode: PreallocMode) -> Self {
        self.prealloc = mode;
        self
    }

    fn validate(&self) -> Result<u32> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(invalid(format!(
                "Cluster size must be a power of two between 512 and 2048k (got {cs})"
            )));
        }
        let bits = cs.trailing_zeros();
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        let v3 = self.version >= 3;
        let need_v3 = |what: &str| -> Result<()> {
            if v3 {
                Ok(())
            } else {
                Err(invalid(format!("{what} requires compat=1.1 or above")))
            }
        };
        if self.refcount_bits != 16 {
            need_v3("a refcount width other than 16 bits")?;
        }
        if self.lazy_refcounts {
            need_v3("lazy refcounts")?;
        }
        if self.extended_l2 {
            need_v3("extended L2 entries")?;
            if cs < 16384 {
                return Err(invalid("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"));
            }
        }
        if self.compression != CompressionType::Deflate {
            need_v3("a compression type other than zlib")?;
        }
        if self.data_file.is_some() {
            need_v3("an external data file")?;
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(invalid("data-file-raw requires data-file"));
        }
        if self.data_file_raw && self.backing.is_some() {
            return Err(invalid(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        if let Some((name, _)) = &self.backing {
            if name.len() > header::MAX_BACKING_NAME as usize {
                return Err(invalid("Backing file name too long"));
            }
        }
        if self.size > i64::MAX as u64 {
            return Err(invalid("Image size too large"));
        }
        Ok(bits)
    }

    /// Creates (or truncates) the image file at `path`; a data file named with
    /// [`Qcow2Create::data_file`] is created beside it (relative names resolve against the
    /// image's directory).
    ///
    /// Nothing is created when the options are invalid; a create that fails halfway removes
    /// the files it made.
    pub async fn create(&self, path: impl Into<PathBuf>) -> Result<()> {
        let path = path.into();
        self.validate()?;
        let image = NewFile::new(&path);
        // Locked as the image will be used, before the file is truncated.
        let (perm, shared) = super::QCOW2.permissions(true, Permissions::ALL, false)?;
        let file = image.finish(
            FileStorageOpen::new(&path)
                .create(true)
                .create_permissions(perm, shared)
                .open()
                .await,
        )?;
        let data = match &self.data_file {
            Some(name) => {
                let resolved = image.finish(file.resolve_name(name))?;
                let new = NewFile::new(&resolved.path);
                let opened = FileStorageOpen::new(&resolved.path)
                    .create(true)
                    .open()
                    .await;
                Some((image.finish(new.finish(opened))?, new))
            }
            None => None,
        };
        let result = self
            .create_on(&file, data.as_ref().map(|(d, _)| d as &dyn Storage))
            .await
            .map_err(|e| e.with_operation("create").with_path(&path));
        drop(file);
        if let Some((d, new)) = data {
            drop(d);
            if result.is_err() {
                new.remove_if_new();
            }
        }
        image.finish(result)
    }

    /// Writes a new image over `file` (and sizes `data_file`, when the image has one).
    pub async fn create_on(
        &self,
        file: &dyn Storage,
        data_file: Option<&dyn Storage>,
    ) -> Result<()> {
        let bits = self.validate()?;
        if self.data_file.is_some() != data_file.is_some() {
            return Err(invalid(
                "an external data file needs both a name and a storage",
            ));
        }
        let g = Geometry::new(bits, self.extended_l2);
        let cs = g.cluster_size();
        let order = self.refcount_bits.trailing_zeros();
        let epb = cs * 8 / u64::from(self.refcount_bits);
        let l1_size = g
            .l1_entries_for(self.size)
            .ok_or_else(|| invalid("Image size too large"))?;
        if l1_size * 8 > header::MAX_L1_BYTES {
            return Err(invalid(
                "The image size is too large for file format 'qcow2' (try using a larger \
                 cluster size)",
            ));
        }
        // A zero-size disk has no L1 table at all (offset 0), as QEMU creates it.
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        // A raw data file must read as the guest disk on its own, so every cluster is mapped
        // to its own offset from the start (QEMU preallocates metadata for it too).
        let prealloc = self.prealloc != PreallocMode::Off || self.data_file_raw;
        let l2_count = if prealloc {
            self.size.div_ceil(g.l2_coverage())
        } else {
            0
        };
        let data_clusters = if prealloc && data_file.is_none() {
            self.size.div_ceil(cs)
        } else {
            0
        };

        // Fixed point for the refcount table (r) and blocks (b).
        let (mut r, mut b) = (1u64, 1u64);
        loop {
            let total = 1 + r + b + l1_clusters + l2_count + data_clusters;
            let nb = total.div_ceil(epb);
            let nr = (nb * 8).div_ceil(cs);
            if nb == b && nr == r {
                break;
            }
            (b, r) = (nb, nr);
        }
        if r * cs > header::MAX_REFTABLE_BYTES {
            return Err(invalid("The image would need a refcount table above 8 MiB"));
        }
        let reftable_at = 1;
        let blocks_at = reftable_at + r;
        let l1_at = blocks_at + b;
        let l2_at = l1_at + l1_clusters;
        let data_at = l2_at + l2_count;
        let end = data_at + data_clusters;

        let mut incompatible = 0;
        if self.data_file.is_some() {
            incompatible |= incompat::DATA_FILE;
        }
        if self.compression == CompressionType::Zstd {
            incompatible |= incompat::COMPRESSION;
        }
        if self.extended_l2 {
            incompatible |= incompat::EXTL2;
        }
        let h = Header {
            version: self.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: bits,
            size: self.size,
            crypt_method: 0,
            l1_size: l1_size as u32,
            l1_table_offset: if l1_clusters == 0 { 0 } else { l1_at * cs },
            refcount_table_offset: reftable_at * cs,
            refcount_table_clusters: r as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: if self.lazy_refcounts {
                compat::LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: if self.data_file_raw {
                autoclear::DATA_FILE_RAW
            } else {
                0
            },
            refcount_order: order,
            header_length: if self.version >= 3 { 112 } else { 72 },
            compression_type: self.compression,
            backing_file: self.backing.as_ref().map(|(n, _)| n.clone()),
            backing_format: self.backing.as_ref().and_then(|(_, f)| f.clone()),
            data_file: self.data_file.clone(),
            feature_names: if self.version >= 3 {
                Header::standard_feature_names()
            } else {
                Vec::new()
            },
            bitmaps: None,
            crypto: None,
            unknown_extensions: Vec::new(),
        };
        let header_bytes = h.to_bytes().map_err(Error::from)?;

        // Start from an empty file so no stale bytes survive in metadata areas. (A block
        // device keeps its old bytes: every metadata cluster below is written whole, and
        // new clusters are written whole when they are allocated.)
        if !file.is_block_device() {
            file.resize(0, PreallocMode::Off).await?;
        }
        let mut cluster0 = header_bytes;
        cluster0.resize(cs as usize, 0);
        file.write_at(0, &cluster0).await?;

        let mut reftable = vec![0u8; (r * cs) as usize];
        for i in 0..b {
            let at = (i * 8) as usize;
            reftable[at..at + 8].copy_from_slice(&((blocks_at + i) * cs).to_be_bytes());
        }
        file.write_at(reftable_at * cs, &reftable).await?;
        for i in 0..b {
            let mut block = vec![0u8; cs as usize];
            for c in i * epb..((i + 1) * epb).min(end) {
                set_entry(&mut block, order, c - i * epb, 1);
            }
            file.write_at((blocks_at + i) * cs, &block).await?;
        }

        // Only the L1 entries are written, as QEMU writes them: without preallocation the
        // file ends right after them, with it the rest of the cluster is a hole (both read
        // as zeros). A block device gets the whole cluster written over its old bytes.
        let l1_len = if file.is_block_device() {
            l1_clusters * cs
        } else {
            l1_size * 8
        };
        let mut l1 = vec![0u8; l1_len as usize];
        for i in 0..l2_count {
            let at = (i * 8) as usize;
            l1[at..at + 8].copy_from_slice(&(((l2_at + i) * cs) | COPIED).to_be_bytes());
        }
        if !l1.is_empty() {
            file.write_at(l1_at * cs, &l1).await?;
        }

        if prealloc {
            let entry_bytes: u64 = if self.extended_l2 { 16 } else { 8 };
            let guest_clusters = self.size.div_ceil(cs);
            for i in 0..l2_count {
                let mut table = vec![0u8; cs as usize];
                for j in 0..g.l2_entries().min(guest_clusters - i * g.l2_entries()) {
                    let guest = i * g.l2_entries() + j;
                    let host = if data_file.is_some() {
                        guest * cs
                    } else {
                        (data_at + guest) * cs
                    };
                    let at = (j * entry_bytes) as usize;
                    table[at..at + 8].copy_from_slice(&(host | COPIED).to_be_bytes());
                }
                file.write_at((l2_at + i) * cs, &table).await?;
            }
        }
        // Size the file: data clusters are a hole (metadata), reserved (falloc) or zeroed
        // (full).
        let file_end = if prealloc {
            end * cs
        } else {
            l1_at * cs + l1_len
        };
        let data_mode = match self.prealloc {
            PreallocMode::Falloc | PreallocMode::Full => self.prealloc,
            _ => PreallocMode::Off,
        };
        let current = file.size()?;
        if file_end > current {
            file.resize(file_end, data_mode).await?;
        }
        if let Some(d) = data_file {
            d.resize(0, PreallocMode::Off).await?;
            d.resize(self.size, data_mode).await?;
            d.sync().await?;
        }
        file.sync().await
    }
}
