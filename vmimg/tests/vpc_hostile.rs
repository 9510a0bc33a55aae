//! Crafted VHD images: each is refused with a clear error (QEMU's words where QEMU has one),
//! or read without a panic, a hang or an allocation proportional to a number in the file;
//! nothing a differencing disk names is opened unless the policy allows it.

use std::sync::Arc;
use vmimg::vpc::{DynamicHeader, Footer, VpcCreate};
use vmimg::{
    ErrorKind, Format, ImageOpen, ImplicitOpenPolicy, MemoryStorage, OpenOptions, Storage,
};

/// A dynamic VHD of `size` bytes made by vmimg, as bytes.
async fn dynamic(size: u64) -> Vec<u8> {
    let s = MemoryStorage::new();
    VpcCreate::new(size).create_on(&s, None).await.unwrap();
    s.to_vec()
}

/// Rewrites the footer copy at 0 (and the one at the end) after `edit`.
fn edit_footer(bytes: &mut [u8], edit: impl Fn(&mut Footer)) {
    let mut f = Footer::parse(&bytes[..512]).unwrap();
    edit(&mut f);
    let raw = f.to_bytes();
    bytes[..512].copy_from_slice(&raw);
    let n = bytes.len();
    bytes[n - 512..].copy_from_slice(&raw);
}

/// Rewrites the dynamic header after `edit`.
fn edit_header(bytes: &mut [u8], edit: impl Fn(&mut DynamicHeader)) {
    let mut h = DynamicHeader::parse(&bytes[512..1536]).unwrap();
    edit(&mut h);
    bytes[512..1536].copy_from_slice(&h.to_bytes());
}

async fn open(bytes: Vec<u8>) -> vmimg::Result<vmimg::Image> {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(&bytes));
    ImageOpen::storage(storage)
        .format(Format::VPC)
        .options(OpenOptions::new().policy(ImplicitOpenPolicy::deny()))
        .open()
        .await
}

async fn refused(bytes: Vec<u8>, kind: ErrorKind, words: &str) {
    let err = open(bytes).await.unwrap_err();
    assert_eq!(err.kind(), kind, "{err}");
    assert!(err.to_string().contains(words), "{err}");
}

#[tokio::test]
async fn a_bad_footer_checksum_is_refused_with_qemus_message() {
    let mut b = dynamic(1 << 20).await;
    b[100] ^= 1;
    refused(b, ErrorKind::InvalidFormat, "Incorrect header checksum").await;
}

#[tokio::test]
async fn files_without_a_footer_are_refused() {
    refused(
        vec![0u8; 4096],
        ErrorKind::InvalidFormat,
        "invalid VPC image",
    )
    .await;
    refused(Vec::new(), ErrorKind::InvalidFormat, "File too small").await;
    // A fixed-looking footer at the end that says "dynamic".
    let mut b = vec![0u8; 8192];
    let f = Footer::new(vmimg::vpc::DiskType::Dynamic, 4096, (0, 0, 0), true).to_bytes();
    b[8192 - 512..].copy_from_slice(&f);
    refused(b, ErrorKind::InvalidFormat, "invalid VPC image").await;
}

#[tokio::test]
async fn header_faults_get_qemus_messages() {
    let base = dynamic(10 << 20).await;
    let mut b = base.clone();
    b[512] = b'X';
    refused(b, ErrorKind::InvalidFormat, "Invalid header magic").await;
    let mut b = base.clone();
    edit_header(&mut b, |h| h.block_size = 3 << 20);
    refused(b, ErrorKind::InvalidFormat, "Invalid block size 3145728").await;
    let mut b = base.clone();
    edit_header(&mut b, |h| h.max_table_entries = 2);
    refused(b, ErrorKind::InvalidFormat, "Page table too small").await;
    let mut b = base.clone();
    edit_footer(&mut b, |f| f.data_offset = u64::MAX - 100);
    refused(
        b,
        ErrorKind::InvalidFormat,
        "Error reading dynamic VHD header",
    )
    .await;
}

/// Numbers that would make a reader allocate gigabytes or read past the file.
#[tokio::test]
async fn huge_tables_and_offsets_past_the_end_are_refused_without_allocating() {
    let base = dynamic(10 << 20).await;
    // A BAT of 2^29 entries (2 GiB) on a 4 KiB file.
    let mut b = base.clone();
    edit_header(&mut b, |h| h.max_table_entries = 1 << 29);
    refused(b, ErrorKind::Unsupported, "Max Table Entries too large").await;
    // A BAT beyond the end of the file.
    let mut b = base.clone();
    edit_header(&mut b, |h| h.table_offset = 1 << 40);
    refused(b, ErrorKind::InvalidFormat, "truncated").await;
    // A BAT entry pointing past the end.
    let mut b = base.clone();
    let at = 1536;
    b[at..at + 4].copy_from_slice(&0x0fff_0000u32.to_be_bytes());
    refused(b, ErrorKind::InvalidFormat, "truncated").await;
    // A virtual size beyond 2040 GiB.
    let mut b = base.clone();
    edit_footer(&mut b, |f| {
        f.creator_app = *b"qem2";
        f.current_size = 4 << 40;
    });
    refused(b, ErrorKind::Unsupported, "2040 GiB").await;
}

/// Fuzz finding (vpc_open_read, crash-ef644a86): a BAT at an offset just below 2^64 made
/// rounding its end up to a sector overflow (a panic with overflow checks).
#[tokio::test]
async fn fuzz_a_bat_offset_near_the_top_of_the_address_space_is_refused() {
    let mut b = dynamic(1 << 20).await;
    edit_header(&mut b, |h| {
        h.table_offset = u64::MAX - 100;
        h.max_table_entries = 1;
    });
    refused(b, ErrorKind::InvalidFormat, "truncated").await;
}

/// A BAT entry pointing into the headers reads whatever is there, like QEMU, without a
/// panic; writes into the image stay inside it.
#[tokio::test]
async fn bat_entries_pointing_at_metadata_read_without_panicking() {
    let mut b = dynamic(10 << 20).await;
    b[1536..1540].copy_from_slice(&0u32.to_be_bytes());
    b.resize(3 << 20, 0);
    let image = open(b).await.unwrap();
    let mut buf = vec![0u8; 4096];
    image.read(0, &mut buf).await.unwrap();
    assert_eq!(
        &buf[..8],
        b"cxsparse",
        "the block's data starts after its bitmap"
    );
}

/// A differencing disk names its parent inside the image: the deny policy (untrusted mode)
/// opens nothing; a parent naming itself is a loop; a locator that claims megabytes is not
/// read whole.
#[tokio::test]
async fn differencing_parents_go_through_the_policy_and_loops_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    VpcCreate::new(1 << 20).create(&base).await.unwrap();
    let child = dir.path().join("child.vhd");
    VpcCreate::new(1 << 20)
        .parent("base.vhd")
        .create(&child)
        .await
        .unwrap();
    let err = ImageOpen::path(&child)
        .format(Format::VPC)
        .options(OpenOptions::new().untrusted(true))
        .open()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    // With the default policy it opens, through its parent.
    let image = ImageOpen::path(&child)
        .format(Format::VPC)
        .open()
        .await
        .unwrap();
    assert_eq!(image.chain_len(), 2);
    // A child whose locator names itself.
    let mut bytes = std::fs::read(&child).unwrap();
    let h = DynamicHeader::parse(&bytes[512..1536]).unwrap();
    let name: Vec<u8> = "child.vhd"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    for l in &h.locators {
        let at = l.offset as usize;
        bytes[at..at + 512].fill(0);
        bytes[at..at + name.len()].copy_from_slice(&name);
    }
    edit_header(&mut bytes, |h| {
        for l in &mut h.locators {
            l.len = name.len() as u32;
        }
    });
    std::fs::write(&child, &bytes).unwrap();
    let err = ImageOpen::path(&child)
        .format(Format::VPC)
        .open()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("loop"), "{err}");
    // A locator claiming 4 GiB of data: skipped, the parent name field is used instead.
    edit_header(&mut bytes, |h| {
        for l in &mut h.locators {
            l.len = u32::MAX;
        }
        h.parent_name = "base.vhd".into();
    });
    std::fs::write(&child, &bytes).unwrap();
    let image = ImageOpen::path(&child)
        .format(Format::VPC)
        .open()
        .await
        .unwrap();
    assert_eq!(image.chain_len(), 2);
}
