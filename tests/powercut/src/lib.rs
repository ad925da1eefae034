//! `fogline-powercut`: a filesystem for tests that behaves like a disk with a volatile
//! write cache when the power goes.
//!
//! SIGKILL leaves the page cache intact — everything written reaches the disk even if it
//! was never synced — so crash tests with SIGKILL cannot tell code that syncs correctly
//! from code that does not. This filesystem keeps two images: what programs see, and what
//! has been made durable by `fsync`/`fdatasync` (of a file: its data and size) and by
//! `fsync` of a directory (its entries). A *cut* throws the first away.
//!
//! The model is POSIX's promise, not one filesystem's habits (`image` has it in full):
//!
//! - a file's data survives if it was written before the last `fsync`/`fdatasync` of
//!   that file; later writes are lost;
//! - a name survives if its directory was synced after the name was made (created,
//!   renamed into place, linked) — a file that was fsynced but whose creation was never
//!   made durable by a directory fsync is lost as a whole; a rename not followed by a
//!   directory fsync leaves the old names; an unlink not followed by one is undone;
//! - a name made durable before its file was synced points to an empty file.
//!
//! ext4, XFS and btrfs in their default modes are kinder: an fsync of a new file also
//! commits its directory entry, and a journal commit every few seconds makes all
//! metadata durable. Code that passes here does not depend on either.
//!
//! [`image::CutMode::Random`] keeps a random part of what was not synced instead of
//! nothing (each unsynced 4 KiB page, each file's size, a prefix of each directory's
//! entry changes), like a cache that had written some of it back.
//!
//! The binary (`fogline-powercut mount DIR`) serves one mount and takes commands on
//! standard input, one per line, each answered with one line on standard output:
//! `freeze` (the power goes: requests wait), `cut` (the waiting requests fail, the
//! mount is replaced by what survived), `stats`, `quit` (or end of input: unmount).

#![forbid(unsafe_code)]

pub mod fs;
pub mod image;

pub use fs::{lazy_unmount, Mounted, Stats};
pub use image::{CutMode, CutReport, Image};
