//! The recovery sweep: removing temp files whose writer is dead.
//!
//! The rule: a writer holds an exclusive `flock` on its temp file from
//! creation until it commits, aborts or dies; the kernel drops the lock
//! with the writer's last descriptor, so also when the process is killed.
//! The sweep takes the same lock without waiting, and removes only the
//! files it gets: those have no live writer, in this process or any other
//! sharing the root. A file whose lock is held is left alone, however old.

use std::io;

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use safedisk_core::RecoveryReport;

use crate::NAME;
use crate::root::{Root, display_name};

/// Sweeps `tmp/`. Blocking.
pub(crate) fn sweep(root: &Root) -> io::Result<RecoveryReport> {
    let mut report = RecoveryReport::default();
    let tmp = root.tmp_fd();

    for name in root.temp_names()? {
        let stat = match rustix::fs::statat(tmp, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => {}
            // A symlink is no writer's temp file; removing the link itself
            // never touches what it points to.
            FileType::Symlink => {
                match rustix::fs::unlinkat(tmp, name.as_c_str(), AtFlags::empty()) {
                    Ok(()) => report.removed.push(display_name(&name)),
                    Err(Errno::NOENT) => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            _ => {
                tracing::warn!(backend = NAME, name = %display_name(&name),
                    "not a regular file in the temp area; left alone");
                continue;
            }
        }

        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK;
        let fd = match rustix::fs::openat(tmp, name.as_c_str(), flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::LOOP) => continue,
            Err(e) => return Err(e.into()),
        };
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => continue,
            Err(e) => return Err(e.into()),
        }

        // Unlink while holding the lock, and only the file that was locked.
        let locked = rustix::fs::fstat(&fd)?;
        match rustix::fs::statat(tmp, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(now) if now.st_dev == locked.st_dev && now.st_ino == locked.st_ino => {}
            Ok(_) | Err(Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        }
        match rustix::fs::unlinkat(tmp, name.as_c_str(), AtFlags::empty()) {
            Ok(()) => {
                report.removed.push(display_name(&name));
                report.bytes += (locked.st_blocks as u64) * 512;
            }
            Err(Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }

    if !report.removed.is_empty() {
        tracing::info!(backend = NAME, root = %root.path.display(),
            files = report.removed.len(), bytes = report.bytes,
            "removed temp files left by dead writers");
    }
    Ok(report)
}
