//! A full disk: the reserve file that gives redb room to delete, reopening after an
//! I/O error, and holding the buffer's size while the disk is short of room.

use std::path::{Path, PathBuf};

use super::error::corrupt;
use super::{open_db, open_db_placeholder, Buffer, BufferError, Room};

/// Bytes available to this process on the filesystem holding `dir`.
pub(super) fn free_disk_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A file of real (not sparse) bytes kept beside the buffer. A copy-on-write database
/// needs free pages even to delete, so when the disk is completely full this file is
/// deleted to give redb room to drop the oldest readings. Recreated once there is room.
pub(super) struct Reserve {
    path: PathBuf,
    size: u64,
}

impl Reserve {
    pub(super) fn new(data_dir: &Path, min_free: u64) -> Reserve {
        Reserve {
            path: data_dir.join("reserve.bin"),
            size: (min_free / 2).min(8 << 20),
        }
    }

    /// Creates the reserve if it is missing and `spare` bytes allow it.
    pub(super) fn ensure(&self, spare: u64) {
        if self.size == 0 || spare < self.size || self.path.exists() {
            return;
        }
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&self.path)?;
            let chunk = vec![0u8; 64 * 1024];
            let mut left = self.size;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                f.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&self.path);
            tracing::warn!(
                "cannot create the disk reserve {}: {e}",
                self.path.display()
            );
        }
    }

    /// Deletes the reserve; true if there was one.
    pub(super) fn release(&self) -> bool {
        std::fs::remove_file(&self.path).is_ok()
    }
}

impl Buffer {
    /// After an I/O error redb refuses further writes until it is reopened.
    pub fn reopen(&mut self) -> Result<(), BufferError> {
        let mut db = self.db.write().map_err(|_| corrupt("lock", "poisoned"))?;
        drop(std::mem::replace(&mut *db, open_db_placeholder()?));
        *db = open_db(&self.path, self.cfg.cache_bytes)?;
        Ok(())
    }

    /// Frees space after the disk filled up: releases the reserve file so redb has room
    /// for the transaction, reopens the database, drops (does not downsample, which
    /// would write more) the oldest tenth of the readings and holds the buffer at that
    /// size until the disk has room again.
    pub fn free_disk(&mut self) -> Result<Room, BufferError> {
        let released = self.reserve.release();
        self.reopen()?;
        let cap = self.lower_disk_cap();
        let room = self.make_room_until(cap, true)?;
        tracing::warn!(
            dropped = room.dropped,
            reserve_released = released,
            held_at_bytes = cap,
            "disk full: dropped the oldest readings to keep ingesting"
        );
        Ok(room)
    }

    /// Lowers the disk-pressure cap to nine tenths of the current size (or of the cap).
    pub(super) fn lower_disk_cap(&mut self) -> u64 {
        let total = self.meta.total_bytes();
        let base = self.disk_cap.map_or(total, |cap| cap.min(total));
        let cap = base - base / 10;
        self.disk_cap = Some(cap);
        cap
    }

    /// Keeps `buffer.min_free_disk_bytes` free on the filesystem. While less is free the
    /// buffer becomes a ring at a fixed size: every commit is followed by dropping as
    /// many of the oldest readings, so redb reuses the freed pages instead of growing
    /// the file into the last free bytes. When the file grows anyway (fragmentation) or
    /// the disk gets critically low, the size is lowered by a tenth. Once the disk has
    /// room again the cap is lifted. Returns the readings dropped.
    pub fn keep_disk_free(&mut self) -> Result<u64, BufferError> {
        let Some(free) = free_disk_bytes(&self.cfg.data_dir) else {
            return Ok(0);
        };
        let min_free = self.cfg.min_free_disk_bytes;
        if free >= min_free {
            self.reserve.ensure(free - min_free);
            if self.disk_cap.take().is_some() {
                tracing::info!(
                    free_bytes = free,
                    "the disk has room again: buffer cap lifted"
                );
            }
            self.file_len_at_pressure = 0;
            return Ok(0);
        }
        let len = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        let grew = len > self.file_len_at_pressure;
        let critical = free < min_free / 4 && grew;
        let lowered =
            self.disk_cap.is_none() || (grew && self.file_len_at_pressure > 0) || critical;
        self.file_len_at_pressure = self.file_len_at_pressure.max(len);
        let cap = if lowered {
            self.lower_disk_cap()
        } else {
            self.disk_cap.unwrap_or(0)
        };
        if self.meta.total_bytes() <= cap {
            return Ok(0);
        }
        let room = self.make_room_until(cap, true)?;
        if lowered {
            tracing::warn!(
                free_bytes = free,
                min_free_disk_bytes = min_free,
                dropped = room.dropped,
                held_at_bytes = cap,
                "the disk is nearly full: dropping the oldest readings instead of growing the buffer"
            );
        }
        Ok(room.dropped)
    }
}
