//! Aligned, owned I/O buffers and a small pool of them.
//!
//! Direct I/O needs memory aligned to the device's block size, and the file storage moves
//! data between the caller's slices and the I/O threads through owned buffers (a borrowed
//! slice cannot be handed to another thread soundly if the request future is dropped early).
//! This is one of the few modules with `unsafe`: the allocation itself.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Whether every byte is zero: the first byte is zero and every byte equals its neighbour
/// (one overlapping `memcmp`, which runs at memory speed).
pub fn is_zero(buf: &[u8]) -> bool {
    match buf.split_first() {
        None => true,
        Some((&first, rest)) => first == 0 && rest == &buf[..buf.len() - 1],
    }
}

/// An owned, zero-initialised byte buffer whose start is aligned to `align` bytes.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>; nothing in it is tied to a
// thread.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, like Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    /// If `align` is not a power of two or the size overflows `isize`, like `Vec` does.
    pub fn zeroed(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .expect("aligned buffer layout: align must be a power of two");
        // SAFETY: the layout has a non-zero size (len.max(1)).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// The usable capacity (the buffer can be shortened and regrown within it).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// The alignment of the buffer's start.
    pub fn align(&self) -> usize {
        self.layout.align()
    }

    /// Sets the length to `len` (at most the capacity); new bytes keep old contents.
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "AlignedBuf::set_len beyond capacity"
        );
        self.len = len;
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity() >= len initialised bytes (alloc_zeroed) and is
        // owned by self, which the returned borrow keeps alive.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and not freed since.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align())
            .finish()
    }
}

/// A pool of aligned buffers in power-of-two size classes, so that hot I/O paths do not
/// allocate (and page-fault) a fresh large buffer per request.
///
/// Each size class keeps at most `keep_bytes` worth of idle buffers (at least one buffer);
/// requests larger than the largest class (16 MiB) are allocated and freed unpooled.
#[derive(Debug)]
pub struct BufPool {
    align: usize,
    classes: Vec<Mutex<Vec<AlignedBuf>>>,
    keep_bytes: usize,
}

/// Smallest pooled class: 4 KiB.
const MIN_CLASS_SHIFT: u32 = 12;
/// Largest pooled class: 16 MiB.
const MAX_CLASS_SHIFT: u32 = 24;

impl BufPool {
    /// A pool handing out buffers aligned to `align`, keeping up to `keep_bytes` of idle
    /// buffers per size class.
    pub fn new(align: usize, keep_bytes: usize) -> Self {
        let classes = (MIN_CLASS_SHIFT..=MAX_CLASS_SHIFT)
            .map(|_| Mutex::new(Vec::new()))
            .collect();
        BufPool {
            align,
            classes,
            keep_bytes,
        }
    }

    fn class_of(len: usize) -> Option<usize> {
        let shift = len
            .max(1 << MIN_CLASS_SHIFT)
            .next_power_of_two()
            .trailing_zeros();
        (shift <= MAX_CLASS_SHIFT).then(|| (shift - MIN_CLASS_SHIFT) as usize)
    }

    /// A buffer of exactly `len` bytes. Its contents are unspecified (a reused buffer keeps old
    /// bytes): callers overwrite it or zero it.
    pub fn get(&self, len: usize) -> AlignedBuf {
        match Self::class_of(len) {
            Some(class) => {
                let reused = self.classes[class].lock().unwrap().pop();
                let mut buf = reused.unwrap_or_else(|| {
                    AlignedBuf::zeroed(1 << (class as u32 + MIN_CLASS_SHIFT), self.align)
                });
                buf.set_len(len);
                buf
            }
            None => AlignedBuf::zeroed(len, self.align),
        }
    }

    /// Returns a buffer to the pool.
    pub fn put(&self, buf: AlignedBuf) {
        if buf.align() < self.align || !buf.capacity().is_power_of_two() {
            return;
        }
        if let Some(class) = Self::class_of(buf.capacity()) {
            if 1usize << (class as u32 + MIN_CLASS_SHIFT) == buf.capacity() {
                let mut list = self.classes[class].lock().unwrap();
                if list.len() < (self.keep_bytes / buf.capacity()).max(1) {
                    list.push(buf);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_sees_a_single_set_byte_anywhere() {
        for i in 0..37 {
            let mut b = vec![0u8; 37];
            assert!(is_zero(&b));
            b[i] = 0x80;
            assert!(!is_zero(&b), "byte {i}");
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn zeroed_buffer_is_aligned_and_zero() {
        let b = AlignedBuf::zeroed(10_000, 4096);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert_eq!(b.len(), 10_000);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn pool_reuses_buffers_of_the_same_class() {
        let pool = BufPool::new(4096, 1 << 20);
        let mut a = pool.get(5000);
        a[0] = 7;
        let ptr = a.as_ptr();
        pool.put(a);
        let b = pool.get(8192);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 8192);
    }

    #[test]
    fn pool_serves_oversized_requests_unpooled() {
        let pool = BufPool::new(512, 1 << 20);
        let big = pool.get((1 << MAX_CLASS_SHIFT) + 1);
        assert_eq!(big.len(), (1 << MAX_CLASS_SHIFT) + 1);
        pool.put(big);
        assert!(pool.classes.iter().all(|c| c.lock().unwrap().is_empty()));
    }
}
