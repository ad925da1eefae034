//! The FUSE side: serves an [`Image`] at a mount point (fuser, no libfuse), freezes it
//! (the power goes: requests wait, nothing more reaches the "disk"), and cuts it (the
//! frozen requests fail, the image becomes its durable part, and the mount is replaced by
//! a fresh one, so the kernel keeps no page, attribute or name cached from before).

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    Session, TimeOrNow, WriteFlags,
};

use crate::image::{Attr, CutReport, FsError, Image, Ino, Kind, PAGE};

/// How long the kernel may cache names and attributes: everything changes through this
/// mount, and a cut replaces the mount, so caching cannot show stale state.
const TTL: Duration = Duration::from_secs(1);

/// State shared by the current mount and the ones a cut replaced.
struct Shared {
    image: Image,
    /// Bumped by every cut; a mount of an older generation answers EIO.
    generation: u64,
    frozen: bool,
    /// Requests that arrived while frozen: answered (EIO) by the cut.
    held: Vec<Box<dyn FnOnce() + Send>>,
}

/// Something a request can be failed with.
trait Fail: Send + 'static {
    fn fail(self, e: Errno);
}

macro_rules! fail_impl {
    ($($t:ty),*) => {$(
        impl Fail for $t {
            fn fail(self, e: Errno) {
                self.error(e);
            }
        }
    )*};
}
fail_impl!(
    ReplyEntry,
    ReplyAttr,
    ReplyData,
    ReplyEmpty,
    ReplyWrite,
    ReplyCreate,
    ReplyOpen,
    ReplyDirectory,
    ReplyStatfs
);

fn errno(e: FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::Exists => Errno::EEXIST,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::Invalid => Errno::EINVAL,
        FsError::NameTooLong => Errno::ENAMETOOLONG,
        FsError::NoSpace => Errno::ENOSPC,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: PAGE as u32,
        flags: 0,
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
    }
}

/// One mount's view of the shared state.
struct PowercutFs {
    shared: Arc<Mutex<Shared>>,
    generation: u64,
}

impl PowercutFs {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, if this request may run now: a stale mount fails it, a frozen one
    /// holds it until the cut.
    fn gate<R: Fail>(&self, reply: R) -> Option<(MutexGuard<'_, Shared>, R)> {
        let mut s = self.lock();
        if s.generation != self.generation {
            reply.fail(Errno::EIO);
            return None;
        }
        if s.frozen {
            s.held.push(Box::new(move || reply.fail(Errno::EIO)));
            return None;
        }
        Some((s, reply))
    }

    fn reply_entry(image: &Image, ino: Ino, reply: ReplyEntry) {
        match image.attr(ino) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }
}

impl Filesystem for PowercutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some((s, reply)) = self.gate(reply) else {
            return;
        };
        match s.image.lookup(parent.0, name) {
            Ok(ino) => Self::reply_entry(&s.image, ino, reply),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let Some((s, reply)) = self.gate(reply) else {
            return;
        };
        match s.image.attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        let ino = ino.0;
        let result = (|| {
            if let Some(size) = size {
                s.image.truncate(ino, size)?;
            }
            if let Some(mode) = mode {
                s.image.set_perm(ino, (mode & 0o7777) as u16)?;
            }
            if uid.is_some() || gid.is_some() {
                s.image.set_owner(ino, uid, gid)?;
            }
            match mtime {
                Some(TimeOrNow::SpecificTime(t)) => s.image.set_mtime(ino, t)?,
                Some(TimeOrNow::Now) => s.image.set_mtime(ino, SystemTime::now())?,
                None => {}
            }
            s.image.attr(ino)
        })();
        match result {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        // Regular files only: the model has no devices, pipes or sockets.
        if mode & 0o170000 != 0o100000 {
            reply.error(Errno::EPERM);
            return;
        }
        let perm = (mode & !umask & 0o7777) as u16;
        match s
            .image
            .create(parent.0, name, Kind::File, perm, req.uid(), req.gid())
        {
            Ok(ino) => Self::reply_entry(&s.image, ino, reply),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        let perm = (mode & !umask & 0o7777) as u16;
        match s
            .image
            .create(parent.0, name, Kind::Dir, perm, req.uid(), req.gid())
        {
            Ok(ino) => Self::reply_entry(&s.image, ino, reply),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        match s.image.remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        match s.image.remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match s
            .image
            .rename(parent.0, name, newparent.0, newname, no_replace)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        match s.image.open(ino.0) {
            Ok(()) => reply.opened(FileHandle(ino.0), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        let perm = (mode & !umask & 0o7777) as u16;
        let created = s
            .image
            .create(parent.0, name, Kind::File, perm, req.uid(), req.gid())
            .and_then(|ino| {
                s.image.open(ino)?;
                s.image.attr(ino)
            });
        match created {
            Ok(a) => reply.created(
                &TTL,
                &file_attr(&a),
                Generation(0),
                FileHandle(a.ino),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((s, reply)) = self.gate(reply) else {
            return;
        };
        match s.image.read(ino.0, offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        match s.image.write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// `close` says nothing about durability; answered even while frozen, so that a
    /// dying program's descriptors close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        if s.generation == self.generation {
            s.image.release(ino.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        match s.image.sync(ino.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let Some((s, reply)) = self.gate(reply) else {
            return;
        };
        match s.image.entries(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some((s, r)) = self.gate(reply) else {
            return;
        };
        reply = r;
        let entries = match s.image.entries(ino.0) {
            Ok(e) => e,
            Err(e) => {
                reply.error(errno(e));
                return;
            }
        };
        let dots = [
            (OsStr::new(".").to_owned(), ino.0, Kind::Dir),
            (OsStr::new("..").to_owned(), ino.0, Kind::Dir),
        ];
        for (i, (name, child, kind)) in dots
            .into_iter()
            .chain(entries)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(INodeNo(child), i as u64 + 1, file_type(kind), &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        match s.image.sync(ino.0, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let Some((s, reply)) = self.gate(reply) else {
            return;
        };
        let block = PAGE as u64;
        let total = s.image.capacity_bytes() / block;
        let free = total.saturating_sub(s.image.used_bytes() / block);
        reply.statfs(
            total,
            free,
            free,
            1 << 20,
            (1 << 20) - s.image.inodes(),
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some((mut s, reply)) = self.gate(reply) else {
            return;
        };
        const KEEP_SIZE: i32 = 1;
        match mode {
            0 => match s.image.allocate(ino.0, offset + length) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            },
            // Reserving space beyond the end changes nothing the model keeps.
            KEEP_SIZE => reply.ok(),
            _ => reply.error(Errno::EOPNOTSUPP),
        }
    }
}

/// Counters and state of a mount, as `stats` prints them.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub generation: u64,
    pub frozen: bool,
    pub unsynced_pages: u64,
    pub used_bytes: u64,
    pub inodes: u64,
    pub counters: crate::image::Counters,
}

/// A mounted power-cut filesystem.
pub struct Mounted {
    shared: Arc<Mutex<Shared>>,
    dir: PathBuf,
    /// Every session ever mounted here. Never dropped: dropping one unmounts whatever is
    /// mounted at `dir` at that moment, which after a cut is its successor.
    sessions: Vec<BackgroundSession>,
}

fn config() -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("fogline-powercut".into()),
        MountOption::Subtype("powercut".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    config
}

/// Detaches whatever is mounted at `dir` (lazily: a dying program may still hold files).
pub fn lazy_unmount(dir: &Path) -> io::Result<()> {
    let run = |cmd: &mut Command| {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if run(Command::new("umount").arg("-l").arg(dir))
        || run(Command::new("fusermount3").arg("-u").arg("-z").arg(dir))
    {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "neither `umount -l` nor `fusermount3 -u -z` unmounted {}",
            dir.display()
        )))
    }
}

impl Mounted {
    /// Mounts `image` at `dir` (an existing, empty directory).
    pub fn mount(dir: &Path, image: Image) -> io::Result<Mounted> {
        let shared = Arc::new(Mutex::new(Shared {
            image,
            generation: 1,
            frozen: false,
            held: Vec::new(),
        }));
        let mut mounted = Mounted {
            shared,
            dir: dir.to_path_buf(),
            sessions: Vec::new(),
        };
        mounted.mount_generation(1)?;
        Ok(mounted)
    }

    fn mount_generation(&mut self, generation: u64) -> io::Result<()> {
        let fs = PowercutFs {
            shared: self.shared.clone(),
            generation,
        };
        let session = Session::new(fs, &self.dir, &config())?.spawn()?;
        self.sessions.push(session);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The power goes: from now on no request is answered until [`Mounted::cut`].
    /// Returns the unsynced pages at this moment (what the cut will throw away).
    pub fn freeze(&self) -> u64 {
        let mut s = self.lock();
        s.frozen = true;
        s.image.unsynced_pages()
    }

    /// Power loss: requests held by [`Mounted::freeze`] (or arriving now) fail with EIO,
    /// the image becomes what survives, and a fresh mount replaces this one.
    pub fn cut(&mut self) -> io::Result<(CutReport, usize)> {
        let (report, held, generation) = {
            let mut s = self.lock();
            s.frozen = true;
            let report = s.image.cut();
            s.generation += 1;
            let held = std::mem::take(&mut s.held);
            s.frozen = false;
            (report, held, s.generation)
        };
        let n = held.len();
        for h in held {
            h();
        }
        lazy_unmount(&self.dir)?;
        self.mount_generation(generation)?;
        Ok((report, n))
    }

    pub fn stats(&self) -> Stats {
        let s = self.lock();
        Stats {
            generation: s.generation,
            frozen: s.frozen,
            unsynced_pages: s.image.unsynced_pages(),
            used_bytes: s.image.used_bytes(),
            inodes: s.image.inodes(),
            counters: s.image.counters(),
        }
    }

    /// Unmounts (lazily) and ends.
    pub fn unmount(self) -> io::Result<()> {
        {
            let mut s = self.lock();
            s.generation += 1;
            for h in std::mem::take(&mut s.held) {
                h();
            }
        }
        let result = lazy_unmount(&self.dir);
        // See `sessions`: their threads end when the kernel lets go of the mounts.
        std::mem::forget(self.sessions);
        result
    }
}
