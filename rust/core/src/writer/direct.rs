//! Durable output written around the page cache (`O_DIRECT`).
//!
//! A durable merge is fsynced before it is renamed into place, so its bytes go to the disk
//! before the merge returns anyway. Through the page cache they are first copied into
//! freshly allocated cache pages (on a VM that hands freed guest pages back to the host,
//! each such page costs a host fault: 2.6 s/GB measured) and written back by the fsync.
//! Here, pieces are copied into aligned blocks instead; a block whose every byte has
//! arrived goes to one writer thread, which writes it with `O_DIRECT` while the merge goes
//! on (the queue is short: a merge never gets ahead of the disk by more than a few blocks).
//!
//! Pieces arrive in any order, so a few blocks are partly filled at a time (one per front
//! of the engine's workers). Past [`MAX_OPEN`] of them, further blocks take the page cache
//! instead (same bytes), so memory stays bounded whatever the order. A file system that
//! refuses `O_DIRECT` (at open, or a write whose alignment its device does not accept)
//! gets the page cache for that file too.
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Bytes per block (file offsets `[k·BLOCK, (k+1)·BLOCK)`). 4 MiB: a 1.1B passthrough took
/// 1.20 s against 1.54 s with 1 MiB blocks (medians of 3); merges hold ~5 open at a time.
pub const BLOCK: usize = 4 << 20;
/// Offset, length and memory alignment `O_DIRECT` needs (the largest logical block size
/// in common use).
const ALIGN: usize = 4096;
/// Partly filled blocks held at once, over all of a writer's files (64 MiB).
pub const MAX_OPEN: usize = 16;
/// Complete blocks waiting for the writer thread.
const QUEUE: usize = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `BLOCK` bytes at an `ALIGN`-aligned address (a window into a slightly larger vector).
struct Buf {
    v: Vec<u8>,
    at: usize,
}

impl Buf {
    fn new() -> Buf {
        let v = vec![0u8; BLOCK + ALIGN];
        let at = v.as_ptr().align_offset(ALIGN);
        Buf { v, at }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.v[self.at..self.at + BLOCK]
    }
}

/// One output file, as the writer thread sees it.
struct Target {
    path: PathBuf,
    direct: File,
    plain: File,
    /// Set when the device refused an aligned direct write: the rest goes through `plain`.
    refused: AtomicBool,
}

/// A block being filled: its buffer (`None`: this block goes through the page cache) and
/// how many of its bytes have arrived.
struct Block {
    buf: Option<Buf>,
    filled: usize,
}

/// One output file opened for direct writes.
pub struct DirectFile {
    target: Arc<Target>,
    len: u64,
    blocks: Mutex<HashMap<u64, Block>>,
}

struct Job {
    target: Arc<Target>,
    pos: u64,
    len: usize,
    buf: Buf,
}

#[derive(Default)]
struct Shared {
    /// Buffers the writer thread is done with, for reuse.
    free: Mutex<Vec<Buf>>,
    /// Partly filled staged blocks, over all files (bounded by `MAX_OPEN`).
    open: AtomicUsize,
    /// The first write error; later blocks are dropped.
    error: Mutex<Option<Error>>,
    /// The merge failed: nothing more to write.
    cancelled: AtomicBool,
}

/// The staging and the writer thread of one `ShardedWriter`.
pub struct Direct {
    shared: Arc<Shared>,
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    max_open: usize,
}

impl Direct {
    pub fn start() -> Result<Direct> {
        Self::with_max_open(MAX_OPEN)
    }

    /// With at most `max_open` partly filled staged blocks (0: every block through the page
    /// cache; for tests of that path).
    pub fn with_max_open(max_open: usize) -> Result<Direct> {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = sync_channel(QUEUE);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("merge-fast-writer".into())
            .spawn(move || write_blocks(rx, &s))
            .map_err(|e| Error::Internal(format!("cannot start the output writer thread: {e}")))?;
        Ok(Direct { shared, tx: Some(tx), thread: Some(thread), max_open })
    }

    /// Opens `path` (created by the caller as `plain`, `len` bytes when complete) for direct
    /// writes; `None` when the file system refuses them (the caller then writes through the
    /// page cache).
    pub fn open(&self, path: &Path, plain: &File, len: u64) -> Option<DirectFile> {
        #[cfg(target_os = "linux")]
        {
            let direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()?;
            Self::staged(path, direct, plain, len)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (path, plain, len);
            None
        }
    }

    /// A file staged in blocks like an `O_DIRECT` one, whose blocks are written through
    /// `direct` (whatever its flags).
    fn staged(path: &Path, direct: File, plain: &File, len: u64) -> Option<DirectFile> {
        let plain = plain.try_clone().ok()?;
        let target = Arc::new(Target { path: path.to_path_buf(), direct, plain, refused: AtomicBool::new(false) });
        Some(DirectFile { target, len, blocks: Mutex::default() })
    }

    /// A buffer for a new staged block, or `None` when `max_open` are already partly filled.
    fn stage(&self) -> Option<Buf> {
        let max = self.max_open;
        self.shared.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(lock(&self.shared.free).pop().unwrap_or_else(Buf::new))
    }

    /// Writes `data` at byte `pos` of `f` (any thread, any order; each byte exactly once).
    /// When it returns, the bytes are staged or written; a write error of the writer thread
    /// is returned by the next call (or by `finish`).
    pub fn put(&self, f: &DirectFile, pos: u64, data: &[u8]) -> Result<()> {
        if let Some(e) = lock(&self.shared.error).take() {
            // The merge stops with this error: the writer thread drops what is queued.
            self.shared.cancelled.store(true, Ordering::Release);
            return Err(e);
        }
        let mut done = 0;
        while done < data.len() {
            let p = pos + done as u64;
            let index = p / BLOCK as u64;
            let start = index * BLOCK as u64;
            let block_len = (f.len - start).min(BLOCK as u64) as usize;
            let at = (p - start) as usize;
            let n = (block_len - at).min(data.len() - done);
            let piece = &data[done..done + n];
            let (plain, complete) = {
                let mut blocks = lock(&f.blocks);
                let b = blocks.entry(index).or_insert_with(|| Block { buf: self.stage(), filled: 0 });
                if let Some(buf) = &mut b.buf {
                    buf.bytes()[at..at + n].copy_from_slice(piece);
                }
                b.filled += n;
                debug_assert!(b.filled <= block_len, "a byte of {} written twice", f.target.path.display());
                let plain = b.buf.is_none();
                let complete = if b.filled == block_len { blocks.remove(&index).and_then(|b| b.buf) } else { None };
                (plain, complete)
            };
            if plain {
                f.target.plain.write_all_at(piece, p).map_err(|e| Error::io(&f.target.path, e))?;
            }
            if let Some(buf) = complete {
                self.shared.open.fetch_sub(1, Ordering::AcqRel);
                let job = Job { target: f.target.clone(), pos: start, len: block_len, buf };
                // Blocks while the queue is full: the merge waits for the disk.
                self.tx.as_ref().expect("open until finish").send(job).map_err(|_| Error::Internal("the output writer thread stopped".into()))?;
            }
            done += n;
        }
        Ok(())
    }

    /// Waits until every block is on the disk, then cuts each file to its length (a last
    /// block is written padded to the alignment).
    pub fn finish<'a>(mut self, files: impl IntoIterator<Item = &'a DirectFile>) -> Result<()> {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| Error::Internal("the output writer thread panicked".into()))?;
        }
        if let Some(e) = lock(&self.shared.error).take() {
            return Err(e);
        }
        for f in files {
            let staged: usize = lock(&f.blocks).values().map(|b| b.filled).sum();
            if staged > 0 {
                return Err(Error::Internal(format!(
                    "{}: blocks incomplete at the end of the merge ({staged} bytes staged)",
                    f.target.path.display()
                )));
            }
            f.target.plain.set_len(f.len).map_err(|e| Error::io(&f.target.path, e))?;
        }
        Ok(())
    }
}

impl Drop for Direct {
    /// A merge that failed: the writer thread drops what is queued and stops.
    fn drop(&mut self) {
        self.shared.cancelled.store(true, Ordering::Release);
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread: writes each complete block, keeps the first error.
fn write_blocks(rx: Receiver<Job>, shared: &Shared) {
    for mut job in rx {
        if !shared.cancelled.load(Ordering::Acquire) && lock(&shared.error).is_none() {
            if let Err(e) = write_block(&mut job) {
                *lock(&shared.error) = Some(e);
            }
        }
        let mut free = lock(&shared.free);
        if free.len() < MAX_OPEN + QUEUE {
            free.push(job.buf);
        }
    }
}

fn write_block(job: &mut Job) -> Result<()> {
    let t = &*job.target;
    let bytes = job.buf.bytes();
    if !t.refused.load(Ordering::Acquire) {
        // Only a file's last block is short; past its end the padding is cut by `finish`.
        let padded = job.len.next_multiple_of(ALIGN);
        bytes[job.len..padded].fill(0);
        match t.direct.write_all_at(&bytes[..padded], job.pos) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => t.refused.store(true, Ordering::Release),
            Err(e) => return Err(Error::io(&t.path, e)),
        }
    }
    t.plain.write_all_at(&bytes[..job.len], job.pos).map_err(|e| Error::io(&t.path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Pages of `path` in the page cache (`mincore` on a mapping of the file).
    fn resident_pages(path: &Path) -> usize {
        let f = File::open(path).unwrap();
        // SAFETY: a read-only mapping of a file nothing else changes during the test.
        let m = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let page = 4096;
        let mut vec = vec![0u8; m.len().div_ceil(page)];
        // SAFETY: `vec` has one byte per page of the mapping, which lives until the end.
        let rc = unsafe { libc::mincore(m.as_ptr() as *mut libc::c_void, m.len(), vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore");
        vec.iter().filter(|&&v| v & 1 == 1).count()
    }

    /// tmpfs takes `O_DIRECT`, but its files live in the page cache.
    fn in_memory_fs(path: &Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `st` is a plain struct statfs fills in; `c` is a valid C string.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
        st.f_type == libc::TMPFS_MAGIC
    }

    /// Writes `data` into a new file at `path` in pieces of random sizes, in random order,
    /// from 4 threads, with at most `max_open` staged blocks; whether `O_DIRECT` was used
    /// (where the file system refuses it, the staging is tested on a buffered handle).
    fn write_scrambled(path: &Path, data: &[u8], max_open: usize, seed: u64) -> bool {
        let plain = File::create(path).unwrap();
        plain.set_len(data.len() as u64).unwrap();
        let d = Direct::with_max_open(max_open).unwrap();
        let len = data.len() as u64;
        let (f, direct) = match d.open(path, &plain, len) {
            Some(f) => (f, true),
            None => (Direct::staged(path, plain.try_clone().unwrap(), &plain, len).unwrap(), false),
        };
        let mut pieces = vec![];
        let mut s = 0;
        while s < data.len() {
            let n = 1 + (mix(seed ^ s as u64) % 300_000) as usize;
            pieces.push(s..(s + n).min(data.len()));
            s += n;
        }
        // Shuffled (Fisher–Yates), then dealt to the threads.
        for i in (1..pieces.len()).rev() {
            pieces.swap(i, (mix(seed + i as u64) % (i as u64 + 1)) as usize);
        }
        std::thread::scope(|sc| {
            for k in 0..4 {
                let (d, f, pieces) = (&d, &f, &pieces);
                sc.spawn(move || {
                    for r in pieces.iter().skip(k).step_by(4) {
                        d.put(f, r.start as u64, &data[r.clone()]).unwrap();
                    }
                });
            }
        });
        d.finish([&f]).unwrap();
        direct
    }

    #[test]
    fn pieces_in_any_order_make_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        // Three whole blocks and a last one that is not a multiple of the alignment.
        let data: Vec<u8> = (0..3 * BLOCK as u64 + 12_345).map(|i| mix(i) as u8).collect();
        // 0: every block through the page cache; 1 and 2: some staged, some not.
        for (max_open, seed) in [(MAX_OPEN, 1), (2, 2), (1, 3), (0, 4)] {
            let path = tmp.path().join(format!("out{max_open}"));
            let direct = write_scrambled(&path, &data, max_open, seed);
            // Staged blocks went around the page cache; buffered ones are in it (so the check
            // sees cached pages at all). Before reading the file back, which caches it.
            let pages = resident_pages(&path);
            match max_open {
                MAX_OPEN if direct && !in_memory_fs(&path) => assert_eq!(pages, 0),
                0 => assert_eq!(pages, data.len().div_ceil(4096)),
                _ => {}
            }
            assert!(std::fs::read(&path).unwrap() == data, "max_open {max_open}");
        }
    }
}
