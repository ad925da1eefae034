//! Durable names: fsync of a file's directory. Every store calls it after opening.

use std::path::Path;

/// Makes the name of the (just opened or created) file at `path` durable: fsyncs its
/// directory, and that directory's parent (which holds the directory's own name, when
/// it was just created). An fsynced file whose directory entry was never synced can
/// vanish at a power cut with everything in it — POSIX promises no more, and the
/// power-cut filesystem of the fault lab holds every store to that.
pub fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}
