//! Slots: which cluster owns which `127.20.<slot>.0/24` addresses.
//!
//! A cluster owns slot `s` while an exclusive `flock` on `/tmp/portico-testbed-slots/<s>.lock`
//! is held. The lock's open file description is inherited by every process of the cluster
//! (see [`crate::process`]), so the slot stays taken exactly as long as anything of the cluster
//! still runs and may still be bound to the slot's addresses — whether the cluster belongs to
//! a `Testbed` value, to a detached `portico-testbed up`, or is a half-dead leftover.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;

use crate::address_plan::AddressPlan;
use crate::control_plane;

/// Where the lock files live; shared by every user of the machine's testbeds.
pub const SLOT_DIR: &str = "/tmp/portico-testbed-slots";
/// The demo's slot: stable addresses for humans.
pub const DEMO_SLOT: u8 = 1;
/// Slots tests pick from, leaving the demo's slot alone.
pub const TEST_SLOTS: RangeInclusive<u8> = 2..=199;
/// Every slot.
pub const ALL_SLOTS: RangeInclusive<u8> = 1..=199;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("slot {0} is taken by another cluster (or something else listens on its addresses)")]
    Busy(u8),
    #[error("slot {0} is outside 1..=199")]
    OutOfRange(u8),
    #[error("every testbed slot in {0:?} is taken")]
    NoneFree(RangeInclusive<u8>),
    #[error("slot lock in {SLOT_DIR}: {0}")]
    Io(#[from] io::Error),
}

/// An exclusively held slot. Dropping it releases the slot unless a cluster process inherited
/// the lock.
#[derive(Debug)]
pub struct SlotLock {
    slot: u8,
    file: File,
}

impl SlotLock {
    pub fn slot(&self) -> u8 {
        self.slot
    }

    pub fn plan(&self) -> AddressPlan {
        AddressPlan::new(self.slot)
    }

    /// The lock's descriptor, which cluster processes inherit.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Takes `slot` if it is free and nothing listens on its control-plane addresses.
    pub fn take(slot: u8) -> Result<SlotLock, SlotError> {
        if !ALL_SLOTS.contains(&slot) {
            return Err(SlotError::OutOfRange(slot));
        }
        let file = match hold_slot(slot) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(SlotError::Busy(slot)),
            Err(e) => return Err(e.into()),
        };
        // A lock nobody holds but a listener on the addresses means some cluster escaped its
        // lock (e.g. started by an older build); don't collide with it.
        if !control_plane_addresses_free(&AddressPlan::new(slot)) {
            return Err(SlotError::Busy(slot));
        }
        Ok(SlotLock { slot, file })
    }

    /// Takes the first free slot in `range`.
    pub fn take_first_free(range: RangeInclusive<u8>) -> Result<SlotLock, SlotError> {
        for slot in range.clone() {
            match Self::take(slot) {
                Ok(lock) => return Ok(lock),
                Err(SlotError::Busy(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(SlotError::NoneFree(range))
    }

    /// Takes `preferred` if free, else the first free test slot.
    pub fn take_preferring(preferred: u8) -> Result<SlotLock, SlotError> {
        match Self::take(preferred) {
            Err(SlotError::Busy(_)) => Self::take_first_free(TEST_SLOTS),
            other => other,
        }
    }
}

pub fn lock_path(slot: u8) -> PathBuf {
    PathBuf::from(SLOT_DIR).join(format!("{slot}.lock"))
}

/// Takes the exclusive lock on `slot` without waiting; fails with `WouldBlock` if another
/// cluster holds it. The slot is held for as long as the returned file (or a descriptor
/// inherited from it) stays open.
pub fn hold_slot(slot: u8) -> io::Result<File> {
    fs::create_dir_all(SLOT_DIR)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_path(slot))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Whether the slot's control-plane ports can be bound (nothing else listens there).
fn control_plane_addresses_free(plan: &AddressPlan) -> bool {
    control_plane::listen_ports()
        .iter()
        .all(|&port| TcpListener::bind(SocketAddr::from((plan.control_plane_ip(), port))).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_slot_cannot_be_taken_twice_and_is_free_again_after_release() {
        // Slot 199 is the last any cluster picks, so this test rarely contends with real ones.
        let Ok(first) = SlotLock::take(199) else {
            return; // taken by a real cluster right now; nothing to learn
        };
        assert!(matches!(SlotLock::take(199), Err(SlotError::Busy(199))));
        drop(first);
        let again = SlotLock::take(199).expect("released slot is free");
        assert_eq!(again.slot(), 199);
    }

    #[test]
    fn out_of_range_slots_are_rejected() {
        assert!(matches!(SlotLock::take(0), Err(SlotError::OutOfRange(0))));
        assert!(matches!(
            SlotLock::take(200),
            Err(SlotError::OutOfRange(200))
        ));
    }
}
