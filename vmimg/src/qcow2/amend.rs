//! Changing options of an existing image (`qemu-img amend`): compat level, lazy refcounts,
//! refcount width, raw data file flag, size.

use super::header::{autoclear, compat, incompat, CompressionType, Header};
use super::l2::{L2Entry, COPIED, L1_OFFSET_MASK, L2_OFFSET_MASK, ZERO};
use super::Qcow2Driver;
use crate::format::ChainView;
use crate::storage::PreallocMode;
use crate::{Error, ErrorKind, Result};
use std::sync::Arc;

/// Options to change; `None` leaves an option as it is.
#[derive(Clone, Debug, Default)]
pub struct Qcow2Amend {
    /// `0.10` or `1.1`.
    pub compat: Option<String>,
    /// Lazy refcounts.
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits.
    pub refcount_bits: Option<u32>,
    /// Raw external data file flag.
    pub data_file_raw: Option<bool>,
    /// New virtual size.
    pub size: Option<u64>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

impl Qcow2Driver {
    /// Applies `a` to the image (opened writable). Every option is checked against the
    /// image and the others before anything changes: an amend that is refused leaves the
    /// image as it was.
    pub async fn amend(&self, a: &Qcow2Amend, below: ChainView<'_>) -> Result<()> {
        if !self.writable {
            return Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only"));
        }
        let target_version = self.validate_amend(a).await?;
        if let Some(size) = a.size {
            if size != self.size.load(std::sync::atomic::Ordering::Acquire) {
                self.resize_impl(size, PreallocMode::Off, below).await?;
            }
        }
        if target_version == Some(3) {
            self.edit_header(|h| {
                if h.version == 2 {
                    h.version = 3;
                    h.header_length = 112;
                    h.feature_names = Header::standard_feature_names();
                }
                Ok(())
            })
            .await?;
        }
        if let Some(bits) = a.refcount_bits {
            self.change_refcount_order(bits.trailing_zeros()).await?;
        }
        if let Some(lazy) = a.lazy_refcounts {
            self.edit_header(|h| {
                if lazy {
                    h.compatible_features |= compat::LAZY_REFCOUNTS;
                } else {
                    h.compatible_features &= !compat::LAZY_REFCOUNTS;
                }
                Ok(())
            })
            .await?;
        }
        if let Some(raw) = a.data_file_raw {
            self.edit_header(|h| {
                if raw {
                    h.autoclear_features |= autoclear::DATA_FILE_RAW;
                } else {
                    h.autoclear_features &= !autoclear::DATA_FILE_RAW;
                }
                Ok(())
            })
            .await?;
        }
        if target_version == Some(2) {
            self.downgrade(below).await?;
        }
        self.flush_impl(true).await?;
        // The write path follows the header as opened: reopen to write with the new options.
        self.amended
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Checks every option of `a` against the image and against each other, changing
    /// nothing; returns the qcow2 version asked for, if any.
    async fn validate_amend(&self, a: &Qcow2Amend) -> Result<Option<u32>> {
        let target_version = match a.compat.as_deref() {
            None => None,
            Some("0.10") => Some(2),
            Some("1.1") | Some("v3") => Some(3),
            Some(other) => return Err(invalid(format!("Invalid compatibility level: '{other}'"))),
        };
        let meta = self.meta.lock().await;
        let h = &meta.header;
        let version = target_version.unwrap_or(h.version);
        let order = match a.refcount_bits {
            Some(bits) if !bits.is_power_of_two() || bits > 64 => {
                return Err(invalid(
                    "Refcount width must be a power of two and may not exceed 64 bits",
                ))
            }
            Some(bits) => bits.trailing_zeros(),
            None => h.refcount_order,
        };
        if order != 4 && version < 3 {
            return Err(invalid(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above \
                 (use compat=1.1 or greater)",
            ));
        }
        if a.lazy_refcounts == Some(true) && version < 3 {
            return Err(invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above",
            ));
        }
        if let Some(raw) = a.data_file_raw {
            if h.incompatible_features & incompat::DATA_FILE == 0 {
                return Err(invalid("data-file-raw can only be set with a data file"));
            }
            if raw && h.backing_file.is_some() {
                return Err(invalid(
                    "data-file-raw cannot be set on images with a backing file",
                ));
            }
        }
        if version == 2 && h.version >= 3 {
            let refuse = |why: &str| Err(invalid(format!("Cannot downgrade an image with {why}")));
            if h.incompatible_features & incompat::EXTL2 != 0 {
                return refuse("extended L2 entries");
            }
            if h.incompatible_features & incompat::DATA_FILE != 0 {
                return refuse("an external data file");
            }
            if h.compression_type != CompressionType::Deflate {
                return refuse("zstd compression");
            }
            if h.bitmaps.is_some() {
                return refuse("bitmaps");
            }
            if h.nb_snapshots > 0 {
                return refuse("internal snapshots (not supported yet)");
            }
        }
        Ok(target_version)
    }

    /// Rewrites the header after `edit` (metadata flushed first).
    async fn edit_header(&self, edit: impl FnOnce(&mut Header) -> Result<()>) -> Result<()> {
        let mut meta = self.lock_quiesced().await;
        self.prepare(&mut meta).await?;
        self.flush_locked(&mut meta, true).await?;
        let mut h = meta.header.clone();
        edit(&mut h)?;
        self.write_header(&h).await?;
        self.file.sync().await?;
        meta.header = h;
        Ok(())
    }

    async fn change_refcount_order(&self, order: u32) -> Result<()> {
        let mut meta = self.lock_quiesced().await;
        self.prepare(&mut meta).await?;
        if meta.header.refcount_order == order {
            return Ok(());
        }
        self.flush_locked(&mut meta, true).await?;
        let file = Arc::clone(&self.file);
        let moved = meta
            .refcounts()
            .rewrite_with_order(file.as_ref(), order)
            .await?;
        let mut h = meta.header.clone();
        h.refcount_order = order;
        h.refcount_table_offset = moved.offset;
        h.refcount_table_clusters = moved.clusters as u32;
        self.write_header(&h).await?;
        self.file.sync().await?;
        meta.header = h;
        Ok(())
    }

    /// compat=0.10 (what version 2 cannot express was refused by `validate_amend`): turns
    /// zero clusters into what v2 can say (unallocated, or written zeros over a backing
    /// file), writes a v2 header.
    async fn downgrade(&self, below: ChainView<'_>) -> Result<()> {
        if self.meta.lock().await.header.version == 2 {
            return Ok(());
        }
        // Expand zero clusters of the active L1.
        let g = self.geometry;
        let cs = g.cluster_size();
        let l1: Vec<u64> = self.l1.read().unwrap().clone();
        for (l1_index, l1e) in l1.iter().enumerate() {
            if l1e & L1_OFFSET_MASK == 0 {
                continue;
            }
            let table = self.l2_table(l1e & L1_OFFSET_MASK).await?;
            for i in 0..table.len() {
                let e = table.entry(i);
                if e.entry & ZERO == 0 || e.entry & super::l2::COMPRESSED != 0 {
                    continue;
                }
                let guest = ((l1_index as u64) * g.l2_entries() + i as u64) * cs;
                if guest >= self.size.load(std::sync::atomic::Ordering::Acquire) {
                    continue;
                }
                let host = e.entry & L2_OFFSET_MASK;
                if host != 0 && e.entry & COPIED != 0 {
                    self.file.write_zeroes(host, cs, false).await?;
                    self.set_cluster(
                        guest,
                        |_| {
                            (
                                L2Entry {
                                    entry: host | COPIED,
                                    bitmap: 0,
                                },
                                false,
                            )
                        },
                        false,
                    )
                    .await?;
                } else {
                    // v2 has no zero flag: unallocated reads zeros without a backing file;
                    // over one, zeros must be written.
                    let unallocated = L2Entry {
                        entry: 0,
                        bitmap: 0,
                    };
                    self.set_cluster(guest, |_| (unallocated, true), false)
                        .await?;
                    if below.is_empty() {
                        continue;
                    }
                    let size = self.size.load(std::sync::atomic::Ordering::Acquire);
                    let n = cs.min(size - guest) as usize;
                    self.write_buf(guest, &vec![0u8; n], below).await?;
                }
            }
        }
        self.flush_impl(true).await?;
        self.edit_header(|h| {
            h.version = 2;
            h.header_length = 72;
            h.incompatible_features = 0;
            h.compatible_features = 0;
            h.autoclear_features = 0;
            h.refcount_order = 4;
            h.feature_names.clear();
            Ok(())
        })
        .await
    }
}
