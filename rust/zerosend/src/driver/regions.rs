//! Buffer pool memory registered with the ring as fixed buffers, one slot per region, and given
//! back (slot and locked memory) once nothing can send from it any more.
//!
//! A send from a registered region carries a lease on its slot from submission until it is
//! finished ([`SlotLease`]); a slot is emptied (and may be reused) only when its region was
//! unregistered or let go *and* no lease on it remains. So a send waiting in a socket's queue
//! when its pool is closed still goes out from the pages its slot names.

use std::sync::Arc;

use nix::errno::Errno;

use super::Driver;
use crate::buf::IoBuf;
use crate::error::{errno_of, Error, Result};
use crate::region::{Region, SlotLease};

/// Fixed-buffer slots reserved in the ring, one per registered region.
pub(super) const FIXED_SLOTS: usize = 64;
/// The kernel's limit on one fixed buffer.
const MAX_FIXED_LEN: usize = 1 << 30;

/// One fixed-buffer slot in use.
pub(super) struct Slot {
    region: Arc<Region>,
    /// Counted by every [`SlotLease`] on the slot, plus this one.
    users: Arc<()>,
    /// Unregistered: no new send gets the slot; it is emptied when its last lease goes.
    retired: bool,
}

impl Slot {
    /// True while a send (queued or in the kernel) names the slot.
    fn leased(&self) -> bool {
        Arc::strong_count(&self.users) > 1
    }
}

impl<T, B: IoBuf> Driver<T, B> {
    /// Lets sends from `region` use io_uring's registered (fixed) buffers: no page pinning and
    /// lookup per send. Sends from anywhere else keep working as before. The driver holds a
    /// reference to the region until [`Driver::unregister_region`], or until it is the last
    /// holder (every pool handle and every send from it is gone), and then gives its slot back.
    pub fn register_region(&mut self, region: Arc<Region>) -> Result<()> {
        self.check_process()?;
        if let Some(slot) = self
            .regions
            .iter_mut()
            .flatten()
            .find(|s| Arc::ptr_eq(&s.region, &region))
        {
            slot.retired = false;
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
        self.regions[slot] = Some(Slot {
            region,
            users: Arc::new(()),
            retired: false,
        });
        if self.ring.is_some() && self.fixed_unavailable.is_none() {
            if let Err(e) = self.register_fixed(slot) {
                self.regions[slot] = None;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stops using `region` for new fixed-buffer sends and drops the driver's reference to it
    /// (the memory is unmapped, and unlocked, when its last holder lets go). Sends already
    /// submitted from it, queued or in the kernel, keep their slot registered until each is
    /// finished; the slot is given back after the last.
    pub fn unregister_region(&mut self, region: &Arc<Region>) -> Result<()> {
        self.check_process()?;
        if let Some(slot) = self
            .regions
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| Arc::ptr_eq(&s.region, region)))
        {
            if let Some(entry) = self.regions[slot].as_mut() {
                entry.retired = true;
            }
            self.release_if_unused(slot);
        }
        Ok(())
    }

    /// A send that named a slot is finished: give the slot back if it was waiting for that.
    pub(super) fn lease_dropped(&mut self, lease: SlotLease) {
        let slot = usize::from(lease.slot());
        drop(lease);
        self.release_if_unused(slot);
    }

    /// Empties a retired slot that no send names any more.
    fn release_if_unused(&mut self, slot: usize) {
        if self.regions[slot]
            .as_ref()
            .is_some_and(|s| s.retired && !s.leased())
        {
            self.release_slot(slot);
        }
    }

    /// Gives back the slots of regions that only this driver still holds and no send names.
    fn reclaim_regions(&mut self) {
        for slot in 0..self.regions.len() {
            if self.regions[slot]
                .as_ref()
                .is_some_and(|s| Arc::strong_count(&s.region) == 1 && !s.leased())
            {
                self.release_slot(slot);
            }
        }
    }

    fn release_slot(&mut self, slot: usize) {
        debug_assert!(
            !self.regions[slot].as_ref().is_some_and(Slot::leased),
            "a slot was emptied while a send names it"
        );
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
        let (Some(ring), Some(Some(Slot { region, .. }))) =
            (self.ring.as_ref(), self.regions.get(slot))
        else {
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

    /// A lease on the fixed-buffer slot whose region holds `[ptr, ptr + len)`, if any (a
    /// retired slot takes no new sends).
    pub(super) fn fixed_lease(&self, ptr: *const u8, len: usize) -> Option<SlotLease> {
        if self.ring.is_none() || self.fixed_unavailable.is_some() {
            return None;
        }
        self.regions.iter().enumerate().find_map(|(slot, s)| {
            s.as_ref()
                .filter(|s| !s.retired && s.region.contains(ptr, len))
                .map(|s| SlotLease::new(slot as u16, &s.users))
        })
    }
}
