//! Page-aligned, locked memory for buffer pools that io_uring can register as fixed buffers.

use std::ptr::NonNull;
use std::sync::Arc;

use nix::errno::Errno;

use crate::error::{Error, Result};

const HUGE_PAGE: usize = 2 << 20;

/// One anonymous mapping, locked in RAM, that outlives every send from it (hold it in an `Arc`).
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    huge_pages: bool,
}

// SAFETY: the region is plain memory with no thread affinity; synchronising writes to it with
// sends that read it is the job of the pool handing out its pieces.
unsafe impl Send for Region {}
// SAFETY: as above; shared references expose only the address and length.
unsafe impl Sync for Region {}

impl Region {
    /// Maps and locks `len` bytes. With `huge_pages`, tries 2 MiB pages first; if the system has
    /// none to give, falls back to normal pages and returns the reason as the second value.
    pub fn new(len: usize, huge_pages: bool) -> Result<(Self, Option<String>)> {
        if len == 0 {
            return Err(Error::InvalidArgument(
                "a buffer pool needs at least one byte".into(),
            ));
        }
        let mut fallback = None;
        if huge_pages {
            let rounded = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
            match map(rounded, libc::MAP_HUGETLB) {
                Ok(ptr) => return lock(ptr, rounded, true).map(|r| (r, None)),
                Err(errno) => {
                    fallback = Some(format!(
                        "huge pages unavailable ({errno}; reserve some with \
                         /proc/sys/vm/nr_hugepages); using normal pages"
                    ))
                }
            }
        }
        let ptr = map(len, 0).map_err(|e| Error::os("mapping the buffer pool", e))?;
        lock(ptr, len, false).map(|r| (r, fallback))
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// True if `[ptr, ptr + len)` lies inside this region.
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let start = self.ptr.as_ptr() as usize;
        let p = ptr as usize;
        p >= start && p.saturating_add(len) <= start + self.len
    }
}

/// A send's hold on the fixed-buffer slot it names. The driver keeps a slot registered while any
/// lease on it exists: a lease lives in its send from submission until the send is finished
/// (nothing queued, nothing in the kernel), so no request can ever name an emptied or reused slot.
#[derive(Debug)]
pub(crate) struct SlotLease {
    slot: u16,
    _users: Arc<()>,
}

impl SlotLease {
    /// A lease on `slot`, counted in `users` (the slot's count) until it is dropped.
    pub(crate) fn new(slot: u16, users: &Arc<()>) -> Self {
        Self {
            slot,
            _users: Arc::clone(users),
        }
    }

    pub(crate) fn slot(&self) -> u16 {
        self.slot
    }
}

fn map(len: usize, extra_flags: libc::c_int) -> std::result::Result<NonNull<u8>, Errno> {
    // SAFETY: an anonymous private mapping with no address hint touches no existing memory.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | extra_flags,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    Ok(NonNull::new(ptr.cast()).expect("mmap never returns NULL on success"))
}

fn lock(ptr: NonNull<u8>, len: usize, huge_pages: bool) -> Result<Region> {
    let region = Region {
        ptr,
        len,
        huge_pages,
    };
    // SAFETY: [ptr, ptr + len) is the mapping just created above.
    if unsafe { libc::mlock(ptr.as_ptr().cast(), len) } != 0 {
        let errno = Errno::last();
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
            .map(|(soft, _)| soft)
            .unwrap_or(0);
        // `region` unmaps on drop.
        return Err(Error::Pool(format!(
            "cannot lock {len} bytes of buffer pool memory ({errno}): RLIMIT_MEMLOCK is {} bytes \
             and the process lacks CAP_IPC_LOCK; raise the limit (ulimit -l, or LimitMEMLOCK= \
             in systemd) or make the pool smaller",
            if limit == u64::MAX {
                "unlimited".to_string()
            } else {
                limit.to_string()
            }
        )));
    }
    Ok(region)
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; the region is dropped only when the
        // last Arc goes, after the ring that registered it and every send from it are gone.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_page_aligned_writable_memory() {
        let (region, _) = Region::new(3 * 4096 + 1, false).unwrap();
        assert_eq!(region.as_ptr() as usize % 4096, 0);
        // SAFETY: the region is 3 pages + 1 byte of writable memory we own.
        unsafe { region.as_ptr().add(region.len() - 1).write(7) };
        assert!(region.contains(region.as_ptr(), region.len()));
        assert!(!region.contains(region.as_ptr(), region.len() + 1));
        assert!(!region.is_empty());
    }

    #[test]
    fn a_dropped_region_gives_its_memory_back() {
        let (region, _) = Region::new(1 << 20, false).unwrap();
        let at = region.as_ptr() as *mut libc::c_void;
        let mut resident = [0u8; 256];
        // SAFETY: mincore only reads the page table for the range; `resident` has a byte for
        // each of its 256 pages.
        let before = unsafe { libc::mincore(at, 1 << 20, resident.as_mut_ptr()) };
        assert_eq!(before, 0);
        drop(region);
        // SAFETY: as above; the range is no longer mapped, which mincore reports as ENOMEM.
        let after = unsafe { libc::mincore(at, 1 << 20, resident.as_mut_ptr()) };
        assert_eq!(
            (after, Errno::last()),
            (-1, Errno::ENOMEM),
            "still mapped after drop"
        );
    }

    #[test]
    fn huge_pages_fall_back_with_a_reason_when_none_are_reserved() {
        let (region, fallback) = Region::new(4096, true).unwrap();
        assert_eq!(region.huge_pages(), fallback.is_none());
    }
}
