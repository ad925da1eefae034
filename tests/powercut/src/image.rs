//! The filesystem image and its durability model, without FUSE: every operation the
//! mount serves is a method here, so the model is unit-tested on its own.
//!
//! Two images are kept: the *live* one (what programs see) and the *durable* one (what a
//! power cut leaves). They share inode numbers, and file pages are shared between them
//! (`Arc`, copied on the next write), so a sync costs the pages it makes durable.
//!
//! What becomes durable, and when (the model in full; `lib.rs` explains why):
//!
//! - `fsync`/`fdatasync` of a file: its data and size as they are now (`fsync` also its
//!   permission bits). Nothing about its name.
//! - `fsync` of a directory: its entries as they are now — every name, what it points to,
//!   the removal of every name that is gone. A file or directory that one of those names
//!   points to and that was never synced itself becomes durable empty.
//! - Nothing else: no periodic write-back, no journal that makes a creation durable with
//!   the data of the created file.
//!
//! After [`Image::cut`], the live image is the durable one, minus everything no durable
//! name leads to from the root. In [`CutMode::Random`] some unsynced changes survive as a
//! disk with a volatile write cache may have written them before the power went: each
//! 4 KiB page written since the last sync of its file survives (with its latest content)
//! or not, independently; a file's size is its synced or its latest one; each directory
//! keeps a random prefix of its unsynced entry changes, in the order they were made.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::time::SystemTime;

/// Page size of the model: the unit a cut keeps or loses in [`CutMode::Random`].
pub const PAGE: usize = 4096;
const PAGE_U64: u64 = PAGE as u64;

/// An inode number.
pub type Ino = u64;

/// The root directory's inode (durable from the start, like a freshly made filesystem).
pub const ROOT: Ino = 1;

/// Why an operation was refused (each maps to one errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsError {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    Invalid,
    NameTooLong,
    NoSpace,
}

pub type FsResult<T> = Result<T, FsError>;

/// What kind of inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// Attributes the mount reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// How much of the unsynced state a cut keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Nothing that was not synced survives.
    All,
    /// A random part of the unsynced changes survives (see the module docs).
    Random,
}

#[derive(Debug, Clone, Default)]
struct FileData {
    pages: BTreeMap<u64, Arc<[u8; PAGE]>>,
    size: u64,
}

impl FileData {
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        if offset >= self.size {
            return Vec::new();
        }
        let end = self.size.min(offset + len as u64);
        let mut out = vec![0u8; (end - offset) as usize];
        let mut at = offset;
        while at < end {
            let idx = at / PAGE_U64;
            let in_page = (at % PAGE_U64) as usize;
            let n = (PAGE - in_page).min((end - at) as usize);
            if let Some(page) = self.pages.get(&idx) {
                let dst = (at - offset) as usize;
                out[dst..dst + n].copy_from_slice(&page[in_page..in_page + n]);
            }
            at += n as u64;
        }
        out
    }

    /// Writes `data` at `offset`; returns the pages it touched.
    fn write(&mut self, offset: u64, data: &[u8], dirty: &mut BTreeSet<u64>) {
        let mut at = offset;
        let mut src = 0usize;
        while src < data.len() {
            let idx = at / PAGE_U64;
            let in_page = (at % PAGE_U64) as usize;
            let n = (PAGE - in_page).min(data.len() - src);
            let page = self
                .pages
                .entry(idx)
                .or_insert_with(|| Arc::new([0u8; PAGE]));
            Arc::make_mut(page)[in_page..in_page + n].copy_from_slice(&data[src..src + n]);
            dirty.insert(idx);
            at += n as u64;
            src += n;
        }
        self.size = self.size.max(offset + data.len() as u64);
    }

    /// Sets the size; pages past it go, the tail of the last one is zeroed.
    fn truncate(&mut self, size: u64, dirty: &mut BTreeSet<u64>) {
        if size < self.size {
            let first_gone = size.div_ceil(PAGE_U64);
            let gone: Vec<u64> = self.pages.range(first_gone..).map(|(k, _)| *k).collect();
            for idx in gone {
                self.pages.remove(&idx);
                dirty.insert(idx);
            }
            let tail = (size % PAGE_U64) as usize;
            if tail != 0 {
                let idx = size / PAGE_U64;
                if let Some(page) = self.pages.get_mut(&idx) {
                    Arc::make_mut(page)[tail..].fill(0);
                    dirty.insert(idx);
                }
            }
        }
        self.size = size;
    }

    fn clip(&mut self) {
        let mut ignored = BTreeSet::new();
        let size = self.size;
        // Pages wholly past the size, and the tail of the last page, read as zeros.
        self.size = u64::MAX;
        self.truncate(size, &mut ignored);
    }
}

#[derive(Debug, Clone)]
enum Content {
    File(FileData),
    Dir(BTreeMap<OsString, Ino>),
}

/// One inode as stored (live or durable).
#[derive(Debug, Clone)]
struct Node {
    content: Content,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Node {
    fn new(kind: Kind, perm: u16, uid: u32, gid: u32) -> Node {
        let now = SystemTime::now();
        Node {
            content: match kind {
                Kind::File => Content::File(FileData::default()),
                Kind::Dir => Content::Dir(BTreeMap::new()),
            },
            perm,
            uid,
            gid,
            mtime: now,
            ctime: now,
        }
    }

    fn kind(&self) -> Kind {
        match self.content {
            Content::File(_) => Kind::File,
            Content::Dir(_) => Kind::Dir,
        }
    }

    /// The same inode with no content: what a name made durable before its inode was
    /// synced points to.
    fn empty_like(&self) -> Node {
        Node::new(self.kind(), self.perm, self.uid, self.gid)
    }
}

/// A change to a directory's entries since it was last synced.
#[derive(Debug, Clone)]
enum DirOp {
    Link(OsString, Ino),
    Unlink(OsString),
}

#[derive(Debug, Clone)]
struct Live {
    node: Node,
    /// File pages written or removed since the last sync of this file.
    dirty_pages: BTreeSet<u64>,
    /// Entry changes since the last sync of this directory, in order.
    dir_log: Vec<DirOp>,
    /// Live names pointing here.
    links: u32,
    /// Open file handles.
    open: u32,
}

impl Live {
    fn new(node: Node, links: u32) -> Live {
        Live {
            node,
            dirty_pages: BTreeSet::new(),
            dir_log: Vec::new(),
            links,
            open: 0,
        }
    }
}

/// What a cut threw away (and, in random mode, kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// File pages that were not synced at the cut.
    pub unsynced_pages: u64,
    /// Of those, the pages that survived anyway (random mode only).
    pub kept_pages: u64,
    /// Directory entry changes that were not synced.
    pub unsynced_dir_ops: u64,
    /// Of those, the changes that survived anyway (random mode only).
    pub kept_dir_ops: u64,
    /// Inodes that existed before the cut and are gone after it.
    pub lost_inodes: u64,
}

/// Counters since the image was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub writes: u64,
    pub bytes_written: u64,
    pub file_syncs: u64,
    pub dir_syncs: u64,
    pub cuts: u64,
}

/// The live and the durable image of one filesystem.
pub struct Image {
    live: HashMap<Ino, Live>,
    durable: HashMap<Ino, Node>,
    next_ino: Ino,
    mode: CutMode,
    rng: fastrand::Rng,
    capacity_bytes: u64,
    counters: Counters,
}

const NAME_MAX: usize = 255;

impl Image {
    /// An empty filesystem (a durable, empty root directory owned by `uid`/`gid`).
    pub fn new(mode: CutMode, seed: u64, capacity_bytes: u64, uid: u32, gid: u32) -> Image {
        let root = Node::new(Kind::Dir, 0o755, uid, gid);
        let mut live = HashMap::new();
        live.insert(ROOT, Live::new(root.clone(), 1));
        let mut durable = HashMap::new();
        durable.insert(ROOT, root);
        Image {
            live,
            durable,
            next_ino: ROOT + 1,
            mode,
            rng: fastrand::Rng::with_seed(seed),
            capacity_bytes,
            counters: Counters::default(),
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Pages written and not yet synced, over all files.
    pub fn unsynced_pages(&self) -> u64 {
        self.live.values().map(|l| l.dirty_pages.len() as u64).sum()
    }

    /// Bytes the live image holds in file pages.
    pub fn used_bytes(&self) -> u64 {
        self.live
            .values()
            .map(|l| match &l.node.content {
                Content::File(f) => f.pages.len() as u64 * PAGE_U64,
                Content::Dir(_) => 0,
            })
            .sum()
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Inodes in the live image.
    pub fn inodes(&self) -> u64 {
        self.live.len() as u64
    }

    fn get(&self, ino: Ino) -> FsResult<&Live> {
        self.live.get(&ino).ok_or(FsError::NotFound)
    }

    fn get_mut(&mut self, ino: Ino) -> FsResult<&mut Live> {
        self.live.get_mut(&ino).ok_or(FsError::NotFound)
    }

    fn dir(&self, ino: Ino) -> FsResult<&BTreeMap<OsString, Ino>> {
        match &self.get(ino)?.node.content {
            Content::Dir(entries) => Ok(entries),
            Content::File(_) => Err(FsError::NotDir),
        }
    }

    pub fn attr(&self, ino: Ino) -> FsResult<Attr> {
        let live = self.get(ino)?;
        let n = &live.node;
        let (kind, size, nlink) = match &n.content {
            Content::File(f) => (Kind::File, f.size, live.links),
            Content::Dir(e) => (Kind::Dir, 4096, 2 + e.len() as u32),
        };
        Ok(Attr {
            ino,
            kind,
            size,
            perm: n.perm,
            nlink,
            uid: n.uid,
            gid: n.gid,
            mtime: n.mtime,
            ctime: n.ctime,
        })
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> FsResult<Ino> {
        self.dir(parent)?
            .get(name)
            .copied()
            .ok_or(FsError::NotFound)
    }

    /// `(name, inode, kind)` of every entry, in name order.
    pub fn entries(&self, dir: Ino) -> FsResult<Vec<(OsString, Ino, Kind)>> {
        let entries = self.dir(dir)?;
        Ok(entries
            .iter()
            .map(|(name, ino)| {
                let kind = self.live.get(ino).map_or(Kind::File, |l| l.node.kind());
                (name.clone(), *ino, kind)
            })
            .collect())
    }

    fn set_entry(&mut self, dir: Ino, name: &OsStr, ino: Option<Ino>) -> FsResult<()> {
        let live = self.get_mut(dir)?;
        let Content::Dir(entries) = &mut live.node.content else {
            return Err(FsError::NotDir);
        };
        match ino {
            Some(ino) => {
                entries.insert(name.to_owned(), ino);
                live.dir_log.push(DirOp::Link(name.to_owned(), ino));
            }
            None => {
                entries.remove(name);
                live.dir_log.push(DirOp::Unlink(name.to_owned()));
            }
        }
        let now = SystemTime::now();
        live.node.mtime = now;
        live.node.ctime = now;
        Ok(())
    }

    /// One name fewer points to `ino`; an unnamed, closed inode leaves the live image.
    fn drop_link(&mut self, ino: Ino) {
        if let Some(live) = self.live.get_mut(&ino) {
            live.links = live.links.saturating_sub(1);
            if live.links == 0 && live.open == 0 {
                self.live.remove(&ino);
            }
        }
    }

    /// Creates a file or directory `name` in `parent`.
    pub fn create(
        &mut self,
        parent: Ino,
        name: &OsStr,
        kind: Kind,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> FsResult<Ino> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        if self.dir(parent)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.live
            .insert(ino, Live::new(Node::new(kind, perm, uid, gid), 1));
        self.set_entry(parent, name, Some(ino))?;
        Ok(ino)
    }

    /// Removes the file `name` (`dir: false`) or the empty directory `name` (`dir: true`).
    pub fn remove(&mut self, parent: Ino, name: &OsStr, dir: bool) -> FsResult<()> {
        let ino = self.lookup(parent, name)?;
        match (&self.get(ino)?.node.content, dir) {
            (Content::Dir(_), false) => return Err(FsError::IsDir),
            (Content::File(_), true) => return Err(FsError::NotDir),
            (Content::Dir(e), true) if !e.is_empty() => return Err(FsError::NotEmpty),
            _ => {}
        }
        self.set_entry(parent, name, None)?;
        self.drop_link(ino);
        Ok(())
    }

    /// `rename(2)`; with `no_replace`, an existing target is an error.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        no_replace: bool,
    ) -> FsResult<()> {
        if new_name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let ino = self.lookup(parent, name)?;
        self.dir(new_parent)?;
        let src_is_dir = self.get(ino)?.node.kind() == Kind::Dir;
        if src_is_dir && self.is_ancestor(ino, new_parent) {
            return Err(FsError::Invalid);
        }
        let target = self.dir(new_parent)?.get(new_name).copied();
        if let Some(target) = target {
            if no_replace {
                return Err(FsError::Exists);
            }
            if target == ino {
                return Ok(());
            }
            match (&self.get(target)?.node.content, src_is_dir) {
                (Content::Dir(_), false) => return Err(FsError::IsDir),
                (Content::File(_), true) => return Err(FsError::NotDir),
                (Content::Dir(e), true) if !e.is_empty() => return Err(FsError::NotEmpty),
                _ => {}
            }
        }
        self.set_entry(parent, name, None)?;
        self.set_entry(new_parent, new_name, Some(ino))?;
        if let Some(target) = target {
            self.drop_link(target);
        }
        Ok(())
    }

    /// Is `dir` the directory `ancestor` or inside it?
    fn is_ancestor(&self, ancestor: Ino, dir: Ino) -> bool {
        if ancestor == dir {
            return true;
        }
        // Directories have exactly one name; walk up through the parents.
        let mut at = dir;
        for _ in 0..4096 {
            let parent = self.live.iter().find_map(|(p, l)| match &l.node.content {
                Content::Dir(e) if e.values().any(|&i| i == at) => Some(*p),
                _ => None,
            });
            match parent {
                Some(p) if p == ancestor => return true,
                Some(p) if p != at => at = p,
                _ => return false,
            }
        }
        false
    }

    pub fn open(&mut self, ino: Ino) -> FsResult<()> {
        self.get_mut(ino)?.open += 1;
        Ok(())
    }

    pub fn release(&mut self, ino: Ino) {
        if let Some(live) = self.live.get_mut(&ino) {
            live.open = live.open.saturating_sub(1);
            if live.open == 0 && live.links == 0 {
                self.live.remove(&ino);
            }
        }
    }

    fn file_mut(&mut self, ino: Ino) -> FsResult<(&mut FileData, &mut BTreeSet<u64>)> {
        let live = self.get_mut(ino)?;
        match &mut live.node.content {
            Content::File(f) => Ok((f, &mut live.dirty_pages)),
            Content::Dir(_) => Err(FsError::IsDir),
        }
    }

    pub fn read(&self, ino: Ino, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        match &self.get(ino)?.node.content {
            Content::File(f) => Ok(f.read(offset, len)),
            Content::Dir(_) => Err(FsError::IsDir),
        }
    }

    pub fn write(&mut self, ino: Ino, offset: u64, data: &[u8]) -> FsResult<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let new_pages = {
            let (f, _) = self.file_mut(ino)?;
            let first = offset / PAGE_U64;
            let last = (offset + data.len() as u64 - 1) / PAGE_U64;
            (first..=last).filter(|i| !f.pages.contains_key(i)).count() as u64
        };
        if new_pages > 0 && self.used_bytes() + new_pages * PAGE_U64 > self.capacity_bytes {
            return Err(FsError::NoSpace);
        }
        let (f, dirty) = self.file_mut(ino)?;
        f.write(offset, data, dirty);
        let live = self.get_mut(ino)?;
        live.node.mtime = SystemTime::now();
        self.counters.writes += 1;
        self.counters.bytes_written += data.len() as u64;
        Ok(data.len())
    }

    pub fn truncate(&mut self, ino: Ino, size: u64) -> FsResult<()> {
        let (f, dirty) = self.file_mut(ino)?;
        f.truncate(size, dirty);
        self.get_mut(ino)?.node.mtime = SystemTime::now();
        Ok(())
    }

    /// `fallocate` mode 0: the file is at least `end` bytes long.
    pub fn allocate(&mut self, ino: Ino, end: u64) -> FsResult<()> {
        let (f, dirty) = self.file_mut(ino)?;
        if end > f.size {
            f.truncate(end, dirty);
        }
        Ok(())
    }

    pub fn set_perm(&mut self, ino: Ino, perm: u16) -> FsResult<()> {
        let live = self.get_mut(ino)?;
        live.node.perm = perm;
        live.node.ctime = SystemTime::now();
        Ok(())
    }

    pub fn set_owner(&mut self, ino: Ino, uid: Option<u32>, gid: Option<u32>) -> FsResult<()> {
        let live = self.get_mut(ino)?;
        if let Some(uid) = uid {
            live.node.uid = uid;
        }
        if let Some(gid) = gid {
            live.node.gid = gid;
        }
        Ok(())
    }

    pub fn set_mtime(&mut self, ino: Ino, mtime: SystemTime) -> FsResult<()> {
        self.get_mut(ino)?.node.mtime = mtime;
        Ok(())
    }

    /// `fsync` (`data_only: false`) or `fdatasync` of a file or a directory.
    pub fn sync(&mut self, ino: Ino, data_only: bool) -> FsResult<()> {
        let live = self.live.get_mut(&ino).ok_or(FsError::NotFound)?;
        let durable = self
            .durable
            .entry(ino)
            .or_insert_with(|| live.node.empty_like());
        match (&live.node.content, &mut durable.content) {
            (Content::File(now), Content::File(kept)) => {
                for idx in std::mem::take(&mut live.dirty_pages) {
                    match now.pages.get(&idx) {
                        Some(page) => kept.pages.insert(idx, page.clone()),
                        None => kept.pages.remove(&idx),
                    };
                }
                kept.size = now.size;
                durable.mtime = live.node.mtime;
                if !data_only {
                    durable.perm = live.node.perm;
                    durable.uid = live.node.uid;
                    durable.gid = live.node.gid;
                    durable.ctime = live.node.ctime;
                }
                self.counters.file_syncs += 1;
            }
            (Content::Dir(now), Content::Dir(kept)) => {
                *kept = now.clone();
                live.dir_log.clear();
                durable.perm = live.node.perm;
                durable.mtime = live.node.mtime;
                let children: Vec<Ino> = now.values().copied().collect();
                for child in children {
                    if self.durable.contains_key(&child) {
                        continue;
                    }
                    if let Some(c) = self.live.get(&child) {
                        self.durable.insert(child, c.node.empty_like());
                    }
                }
                self.counters.dir_syncs += 1;
            }
            _ => return Err(FsError::Invalid),
        }
        Ok(())
    }

    /// Power loss: the live image becomes what the durable one (and, in random mode,
    /// luck) left. Open handles are gone with the programs that held them.
    pub fn cut(&mut self) -> CutReport {
        let mut report = CutReport::default();
        let keep_prob = match self.mode {
            CutMode::All => 0.0,
            CutMode::Random => 0.5,
        };
        let mut next: HashMap<Ino, Node> = self.durable.clone();
        let mut inos: Vec<Ino> = self.live.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let Some(live) = self.live.get(&ino) else {
                continue;
            };
            report.unsynced_pages += live.dirty_pages.len() as u64;
            report.unsynced_dir_ops += live.dir_log.len() as u64;
            if keep_prob == 0.0 {
                continue;
            }
            let mut node = next.remove(&ino).unwrap_or_else(|| live.node.empty_like());
            match (&live.node.content, &mut node.content) {
                (Content::File(now), Content::File(kept)) => {
                    for idx in &live.dirty_pages {
                        if self.rng.f64() >= keep_prob {
                            continue;
                        }
                        report.kept_pages += 1;
                        match now.pages.get(idx) {
                            Some(page) => kept.pages.insert(*idx, page.clone()),
                            None => kept.pages.remove(idx),
                        };
                    }
                    if now.size != kept.size && self.rng.f64() < keep_prob {
                        kept.size = now.size;
                    }
                    kept.clip();
                }
                (Content::Dir(_), Content::Dir(kept)) => {
                    let upto = self.rng.usize(0..=live.dir_log.len());
                    for op in &live.dir_log[..upto] {
                        match op {
                            DirOp::Link(name, child) => kept.insert(name.clone(), *child),
                            DirOp::Unlink(name) => kept.remove(name),
                        };
                    }
                    report.kept_dir_ops += upto as u64;
                }
                _ => {}
            }
            next.insert(ino, node);
        }
        // Names that survived point to inodes that must exist (empty if never synced).
        let mut missing = Vec::new();
        for node in next.values() {
            if let Content::Dir(e) = &node.content {
                missing.extend(e.values().copied().filter(|c| !next.contains_key(c)));
            }
        }
        for child in missing {
            let empty = match self.live.get(&child) {
                Some(l) => l.node.empty_like(),
                None => Node::new(Kind::File, 0o644, 0, 0),
            };
            next.insert(child, empty);
        }
        // Keep what a name leads to from the root; count the links.
        let mut links: HashMap<Ino, u32> = HashMap::new();
        let mut stack = vec![ROOT];
        links.insert(ROOT, 1);
        while let Some(dir) = stack.pop() {
            if let Some(Node {
                content: Content::Dir(e),
                ..
            }) = next.get(&dir)
            {
                for child in e.values() {
                    let n = links.entry(*child).or_insert(0);
                    *n += 1;
                    if *n == 1 {
                        stack.push(*child);
                    }
                }
            }
        }
        report.lost_inodes = self
            .live
            .keys()
            .filter(|ino| !links.contains_key(ino))
            .count() as u64;
        next.retain(|ino, _| links.contains_key(ino));
        // A directory reached twice (a rename made durable in both directories only on
        // one side) keeps its first name only.
        for node in next.values_mut() {
            if let Content::Dir(e) = &mut node.content {
                e.retain(|_, c| links.contains_key(c));
            }
        }
        self.durable = next.clone();
        self.live = next
            .into_iter()
            .map(|(ino, node)| {
                let n = links.get(&ino).copied().unwrap_or(1);
                (ino, Live::new(node, n))
            })
            .collect();
        self.counters.cuts += 1;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        Image::new(CutMode::All, 1, 1 << 30, 0, 0)
    }

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn file_with(img: &mut Image, parent: Ino, n: &str, data: &[u8]) -> Ino {
        let ino = img
            .create(parent, name(n), Kind::File, 0o644, 0, 0)
            .expect("create");
        img.write(ino, 0, data).expect("write");
        ino
    }

    fn content(img: &Image, parent: Ino, n: &str) -> Option<Vec<u8>> {
        let ino = img.lookup(parent, name(n)).ok()?;
        img.read(ino, 0, 1 << 20).ok()
    }

    #[test]
    fn a_file_never_synced_is_gone_after_a_cut() {
        let mut img = image();
        file_with(&mut img, ROOT, "a", b"hello");
        assert_eq!(content(&img, ROOT, "a").as_deref(), Some(&b"hello"[..]));
        let report = img.cut();
        assert_eq!(content(&img, ROOT, "a"), None);
        assert_eq!(report.unsynced_pages, 1);
        assert_eq!(report.lost_inodes, 1);
    }

    #[test]
    fn a_synced_file_whose_directory_was_not_synced_is_gone() {
        let mut img = image();
        let ino = file_with(&mut img, ROOT, "a", b"hello");
        img.sync(ino, false).expect("fsync");
        img.cut();
        assert_eq!(content(&img, ROOT, "a"), None);
    }

    #[test]
    fn a_created_file_whose_directory_was_synced_but_not_its_data_is_empty() {
        let mut img = image();
        file_with(&mut img, ROOT, "a", b"hello");
        img.sync(ROOT, false).expect("fsync dir");
        img.cut();
        assert_eq!(content(&img, ROOT, "a").as_deref(), Some(&b""[..]));
    }

    #[test]
    fn a_file_and_its_directory_synced_survive_and_later_writes_do_not() {
        let mut img = image();
        let ino = file_with(&mut img, ROOT, "a", b"hello");
        img.sync(ino, true).expect("fdatasync");
        img.sync(ROOT, false).expect("fsync dir");
        img.write(ino, 5, b" world").expect("write");
        img.write(ino, 0, b"J").expect("write");
        assert_eq!(
            content(&img, ROOT, "a").as_deref(),
            Some(&b"Jello world"[..])
        );
        img.cut();
        assert_eq!(content(&img, ROOT, "a").as_deref(), Some(&b"hello"[..]));
    }

    #[test]
    fn a_rename_without_a_directory_sync_leaves_the_old_names() {
        let mut img = image();
        let old = file_with(&mut img, ROOT, "state", b"old");
        img.sync(old, false).expect("fsync");
        img.sync(ROOT, false).expect("fsync dir");
        let tmp = file_with(&mut img, ROOT, "state.tmp", b"new");
        img.sync(tmp, false).expect("fsync");
        img.rename(ROOT, name("state.tmp"), ROOT, name("state"), false)
            .expect("rename");
        assert_eq!(content(&img, ROOT, "state").as_deref(), Some(&b"new"[..]));
        img.cut();
        assert_eq!(content(&img, ROOT, "state").as_deref(), Some(&b"old"[..]));
        assert_eq!(content(&img, ROOT, "state.tmp"), None);
    }

    #[test]
    fn a_rename_with_a_directory_sync_survives() {
        let mut img = image();
        let old = file_with(&mut img, ROOT, "state", b"old");
        img.sync(old, false).expect("fsync");
        img.sync(ROOT, false).expect("fsync dir");
        let tmp = file_with(&mut img, ROOT, "state.tmp", b"new");
        img.sync(tmp, false).expect("fsync");
        img.rename(ROOT, name("state.tmp"), ROOT, name("state"), false)
            .expect("rename");
        img.sync(ROOT, false).expect("fsync dir");
        img.cut();
        assert_eq!(content(&img, ROOT, "state").as_deref(), Some(&b"new"[..]));
        assert_eq!(content(&img, ROOT, "state.tmp"), None);
    }

    #[test]
    fn an_unlink_without_a_directory_sync_is_undone() {
        let mut img = image();
        let ino = file_with(&mut img, ROOT, "a", b"kept");
        img.sync(ino, false).expect("fsync");
        img.sync(ROOT, false).expect("fsync dir");
        img.remove(ROOT, name("a"), false).expect("unlink");
        assert_eq!(content(&img, ROOT, "a"), None);
        img.cut();
        assert_eq!(content(&img, ROOT, "a").as_deref(), Some(&b"kept"[..]));
    }

    #[test]
    fn a_new_directory_needs_its_parent_synced_and_its_files_need_it_synced() {
        let mut img = image();
        let dir = img
            .create(ROOT, name("data"), Kind::Dir, 0o755, 0, 0)
            .expect("mkdir");
        let f = file_with(&mut img, dir, "buffer.redb", b"rows");
        img.sync(f, false).expect("fsync");
        img.sync(dir, false).expect("fsync data dir");
        // The data directory's own name was never made durable: all of it goes.
        img.cut();
        assert!(img.lookup(ROOT, name("data")).is_err());

        let dir = img
            .create(ROOT, name("data"), Kind::Dir, 0o755, 0, 0)
            .expect("mkdir");
        img.sync(ROOT, false).expect("fsync root");
        let f = file_with(&mut img, dir, "buffer.redb", b"rows");
        img.sync(f, false).expect("fsync");
        img.cut();
        // The directory survives (empty): the file's name in it was never synced.
        let dir = img.lookup(ROOT, name("data")).expect("data dir survives");
        assert!(img.entries(dir).expect("entries").is_empty());
    }

    #[test]
    fn truncation_is_undone_by_a_cut_and_made_durable_by_a_sync() {
        let mut img = image();
        let ino = file_with(&mut img, ROOT, "f", &[7u8; 3 * PAGE + 10]);
        img.sync(ino, false).expect("fsync");
        img.sync(ROOT, false).expect("fsync dir");
        img.truncate(ino, 100).expect("truncate");
        img.cut();
        let ino = img.lookup(ROOT, name("f")).expect("f");
        assert_eq!(img.attr(ino).expect("attr").size, (3 * PAGE + 10) as u64);
        img.truncate(ino, 100).expect("truncate");
        img.sync(ino, true).expect("fdatasync");
        img.truncate(ino, 5000).expect("extend");
        let data = img.read(ino, 0, 8192).expect("read");
        assert_eq!(data.len(), 5000);
        assert!(data[..100].iter().all(|&b| b == 7));
        assert!(
            data[100..].iter().all(|&b| b == 0),
            "the tail reads as zeros"
        );
        img.cut();
        let ino = img.lookup(ROOT, name("f")).expect("f");
        assert_eq!(img.read(ino, 0, 8192).expect("read"), vec![7u8; 100]);
    }

    #[test]
    fn an_open_unlinked_file_stays_readable_until_closed() {
        let mut img = image();
        let ino = file_with(&mut img, ROOT, "f", b"data");
        img.open(ino).expect("open");
        img.remove(ROOT, name("f"), false).expect("unlink");
        assert_eq!(img.read(ino, 0, 10).expect("read"), b"data");
        img.release(ino);
        assert_eq!(img.read(ino, 0, 10), Err(FsError::NotFound));
    }

    #[test]
    fn random_mode_keeps_some_unsynced_pages_and_never_invents_data() {
        let mut kept_some = false;
        let mut lost_some = false;
        for seed in 0..20 {
            let mut img = Image::new(CutMode::Random, seed, 1 << 30, 0, 0);
            let ino = file_with(&mut img, ROOT, "f", &[1u8; 8 * PAGE]);
            img.sync(ino, true).expect("fdatasync");
            img.sync(ROOT, false).expect("fsync dir");
            img.write(ino, 0, &[2u8; 8 * PAGE]).expect("write");
            let report = img.cut();
            assert_eq!(report.unsynced_pages, 8);
            let ino = img.lookup(ROOT, name("f")).expect("f");
            let data = img.read(ino, 0, 8 * PAGE).expect("read");
            assert_eq!(data.len(), 8 * PAGE);
            for page in data.chunks(PAGE) {
                let first = page[0];
                assert!(first == 1 || first == 2, "a page is old or new");
                assert!(page.iter().all(|&b| b == first), "pages are not torn");
                kept_some |= first == 2;
                lost_some |= first == 1;
            }
        }
        assert!(kept_some && lost_some);
    }

    #[test]
    fn random_mode_keeps_a_prefix_of_directory_changes() {
        let mut seen = BTreeSet::new();
        for seed in 0..40 {
            let mut img = Image::new(CutMode::Random, seed, 1 << 30, 0, 0);
            for n in ["a", "b", "c"] {
                let ino = file_with(&mut img, ROOT, n, n.as_bytes());
                img.sync(ino, false).expect("fsync");
            }
            img.cut();
            let names: Vec<String> = img
                .entries(ROOT)
                .expect("entries")
                .into_iter()
                .map(|(n, _, _)| n.to_string_lossy().into_owned())
                .collect();
            assert!(
                ["", "a", "a b", "a b c"].contains(&names.join(" ").as_str()),
                "{names:?} is not a prefix of the creations"
            );
            seen.insert(names.len());
        }
        assert!(seen.len() > 2, "different prefixes survive: {seen:?}");
    }

    #[test]
    fn a_full_image_refuses_to_grow() {
        let mut img = Image::new(CutMode::All, 1, 2 * PAGE as u64, 0, 0);
        let ino = img
            .create(ROOT, name("f"), Kind::File, 0o644, 0, 0)
            .expect("create");
        img.write(ino, 0, &[0u8; PAGE]).expect("first page");
        assert_eq!(
            img.write(ino, PAGE as u64, &[0u8; 2 * PAGE]),
            Err(FsError::NoSpace)
        );
    }
}
