//! Buffer pool memory registered with the ring as fixed buffers, one slot per region, and given
//! back (slot and locked memory) once nothing can send from it any more.

use std::sync::Arc;

use nix::errno::Errno;

use super::Driver;
use crate::buf::IoBuf;
use crate::error::{errno_of, Error, Result};
use crate::region::Region;

/// Fixed-buffer slots reserved in the ring, one per registered region.
pub(super) const FIXED_SLOTS: usize = 64;
/// The kernel's limit on one fixed buffer.
const MAX_FIXED_LEN: usize = 1 << 30;

impl<T, B: IoBuf> Driver<T, B> {
    /// Lets sends from `region` use io_uring's registered (fixed) buffers: no page pinning and
    /// lookup per send. Sends from anywhere else keep working as before. The driver holds a
    /// reference to the region until [`Driver::unregister_region`], or until it is the last
    /// holder (every pool handle and every send from it is gone), and then gives its slot back.
    pub fn register_region(&mut self, region: Arc<Region>) -> Result<()> {
        self.check_process()?;
        if self
            .regions
            .iter()
            .flatten()
            .any(|r| Arc::ptr_eq(r, &region))
        {
            return Ok(());
        }
        if region.len() > MAX_FIXED_LEN {
            return Err(Error::Pool(format!(
                "a buffer pool can hold at most {MAX_FIXED_LEN} bytes (the kernel's limit on one \
                 registered buffer); this one has {}",
                region.len()
            )));
        }
        self.reclaim_regions();
        let slot = match self.regions.iter().position(Option::is_none) {
            Some(slot) => slot,
            None if self.regions.len() < FIXED_SLOTS => {
                self.regions.push(None);
                self.regions.len() - 1
            }
            None => {
                return Err(Error::Pool(format!(
                    "at most {FIXED_SLOTS} buffer pools can be in use with one event loop at a \
                     time; close() pools you no longer need (a pool's slot comes back once it \
                     was closed or dropped and its last send was released)"
                )))
            }
        };
        self.regions[slot] = Some(region);
        if self.ring.is_some() && self.fixed_unavailable.is_none() {
            if let Err(e) = self.register_fixed(slot) {
                self.regions[slot] = None;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stops using `region` for fixed-buffer sends and drops the driver's reference to it (the
    /// memory is unmapped, and unlocked, when its last holder lets go). Sends already in the
    /// kernel keep their pages: the kernel holds its own reference to the registration until
    /// they complete.
    pub fn unregister_region(&mut self, region: &Arc<Region>) -> Result<()> {
        self.check_process()?;
        if let Some(slot) = self
            .regions
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| Arc::ptr_eq(r, region)))
        {
            self.release_slot(slot);
        }
        Ok(())
    }

    /// Gives back the slots of regions that only this driver still holds.
    fn reclaim_regions(&mut self) {
        for slot in 0..self.regions.len() {
            if self.regions[slot]
                .as_ref()
                .is_some_and(|r| Arc::strong_count(r) == 1)
            {
                self.release_slot(slot);
            }
        }
    }

    fn release_slot(&mut self, slot: usize) {
        if let (Some(ring), None) = (self.ring.as_ref(), self.fixed_unavailable.as_ref()) {
            if ring.clear_fixed(slot as u16).is_err() {
                // Still registered: keep the memory alive for as long as the ring may use it.
                return;
            }
        }
        self.regions[slot] = None;
    }

    pub(super) fn register_all_regions(&mut self) {
        for slot in 0..self.regions.len() {
            if let Err(e) = self.register_fixed(slot) {
                self.fixed_unavailable = Some(e.to_string());
            }
        }
    }

    fn register_fixed(&mut self, slot: usize) -> Result<()> {
        let (Some(ring), Some(Some(region))) = (self.ring.as_ref(), self.regions.get(slot)) else {
            return Ok(());
        };
        // SAFETY: the region is kept alive by `self.regions` until its slot is cleared in the
        // ring (`release_slot`), and `self.regions` is dropped after the ring.
        unsafe { ring.register_fixed(slot as u16, region.as_ptr(), region.len()) }.map_err(|e| {
            let errno = errno_of(&e);
            if errno == Errno::ENOMEM {
                Error::Pool(format!(
                    "registering {} bytes of buffer pool memory with io_uring failed (ENOMEM): \
                     RLIMIT_MEMLOCK is too low for a process without CAP_IPC_LOCK; raise it \
                     (ulimit -l) or make the pool smaller",
                    region.len()
                ))
            } else {
                Error::os("registering buffer pool memory with io_uring", errno)
            }
        })
    }

    /// The fixed-buffer slot whose region holds `[ptr, ptr + len)`, if any.
    pub(super) fn fixed_slot(&self, ptr: *const u8, len: usize) -> Option<u16> {
        if self.ring.is_none() || self.fixed_unavailable.is_some() {
            return None;
        }
        self.regions
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.contains(ptr, len)))
            .map(|slot| slot as u16)
    }
}
