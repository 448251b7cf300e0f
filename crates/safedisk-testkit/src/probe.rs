//! Leak probes: count what a process holds, and check that it returns to a
//! baseline.

mod sockets;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use safedisk_core::CacheBackend;

/// What the process holds at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Snapshot {
    /// Open file descriptors of this process (`/proc/self/fd`), with what
    /// each points at, by descriptor number.
    pub fds: BTreeMap<u32, String>,
    /// Live tasks of the current tokio runtime; 0 outside a runtime.
    pub tasks: usize,
    /// The backend's unpublished fills ([`CacheBackend::pending`]): temp
    /// files, open uploads, buffers.
    pub pending: u64,
    /// ESTABLISHED TCP connections to or from the watched port, as
    /// `local -> remote`.
    pub connections: Vec<String>,
}

impl Snapshot {
    /// Number of open file descriptors.
    pub fn fd_count(&self) -> usize {
        self.fds.len()
    }
}

/// What was still held after the grace period, compared to the baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leak {
    /// The baseline.
    pub before: Snapshot,
    /// The last snapshot taken.
    pub after: Snapshot,
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("resources not released:")?;
        let new_fds: Vec<_> = self
            .after
            .fds
            .iter()
            .filter(|(fd, _)| !self.before.fds.contains_key(fd))
            .map(|(fd, target)| format!("{fd} -> {target}"))
            .collect();
        if self.after.fd_count() > self.before.fd_count() {
            write!(
                f,
                " fds {} -> {} (new: {});",
                self.before.fd_count(),
                self.after.fd_count(),
                new_fds.join(", ")
            )?;
        }
        if self.after.tasks > self.before.tasks {
            write!(f, " tasks {} -> {};", self.before.tasks, self.after.tasks)?;
        }
        if self.after.pending > self.before.pending {
            write!(
                f,
                " pending fills {} -> {};",
                self.before.pending, self.after.pending
            )?;
        }
        if self.after.connections.len() > self.before.connections.len() {
            write!(
                f,
                " connections {} -> {} ({});",
                self.before.connections.len(),
                self.after.connections.len(),
                self.after.connections.join(", ")
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Leak {}

/// Takes snapshots of the resources a cache can leak and checks that they
/// return to a baseline.
///
/// ```
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() {
/// use std::{sync::Arc, time::Duration};
/// use safedisk_core::MemoryBackend;
/// use safedisk_testkit::probe::LeakProbe;
///
/// let probe = LeakProbe::new().backend(Arc::new(MemoryBackend::new()));
/// let baseline = probe.snapshot().await;
/// // ... run fills, tees, requests ...
/// probe.settled(&baseline, Duration::from_secs(2)).await.expect("nothing leaked");
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct LeakProbe {
    backend: Option<Arc<dyn CacheBackend>>,
    port: Option<u16>,
}

impl LeakProbe {
    /// A probe of fds and tasks only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also counts this backend's pending fills. Default: none.
    #[must_use]
    pub fn backend(mut self, backend: Arc<dyn CacheBackend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Also counts ESTABLISHED connections with this local or remote port.
    /// Default: none.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// What the process holds now.
    ///
    /// A backend whose `pending` fails counts as `u64::MAX` pending, so the
    /// failure shows up as a leak instead of passing unseen.
    pub async fn snapshot(&self) -> Snapshot {
        let pending = match &self.backend {
            Some(backend) => backend.pending().await.unwrap_or(u64::MAX),
            None => 0,
        };
        Snapshot {
            fds: open_fds(),
            tasks: alive_tasks(),
            pending,
            connections: self.port.map(established).unwrap_or_default(),
        }
    }

    /// Waits up to `grace` for every count to be at or below `baseline`.
    ///
    /// # Errors
    ///
    /// A [`Leak`] listing what was still held when the grace period ended.
    pub async fn settled(&self, baseline: &Snapshot, grace: Duration) -> Result<Snapshot, Leak> {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let now = self.snapshot().await;
            let settled = now.fd_count() <= baseline.fd_count()
                && now.tasks <= baseline.tasks
                && now.pending <= baseline.pending
                && now.connections.len() <= baseline.connections.len();
            if settled {
                return Ok(now);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Leak {
                    before: baseline.clone(),
                    after: now,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Open file descriptors of this process and their targets. Empty where
/// `/proc` is missing.
pub fn open_fds() -> BTreeMap<u32, String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return BTreeMap::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((fd, target.display().to_string()))
        })
        .collect()
}

/// Live tasks of the current tokio runtime; 0 outside one.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::try_current()
        .map(|handle| handle.metrics().num_alive_tasks())
        .unwrap_or(0)
}

/// ESTABLISHED TCP connections (IPv4 and IPv6) whose local or remote port
/// is `port`, as `local -> remote`. Both ends of a loopback connection
/// are listed.
///
/// Read from the kernel's socket diagnostics over netlink, which stays
/// cheap with thousands of sockets; from `/proc/net/tcp` and `tcp6` where
/// netlink is refused. Empty where neither can be read.
pub fn established(port: u16) -> Vec<String> {
    sockets::established()
        .into_iter()
        .filter(|(local, remote)| local.port() == port || remote.port() == port)
        .map(|(local, remote)| format!("{local} -> {remote}"))
        .collect()
}

/// Distinct ESTABLISHED connections with one of `ports` at either end,
/// per port, in the order given. Both ends of a loopback connection live
/// in this process; each connection counts once. One read of the kernel's
/// table serves every port, as in [`established`].
pub fn connections(ports: &[u16]) -> Vec<usize> {
    let sockets = sockets::established();
    ports
        .iter()
        .map(|&port| {
            let pairs: HashSet<_> = sockets
                .iter()
                .filter(|(a, b)| a.port() == port || b.port() == port)
                .map(|&(a, b)| if a <= b { (a, b) } else { (b, a) })
                .collect();
            pairs.len()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leaked_fd_and_task_are_named() {
        let probe = LeakProbe::new();
        let baseline = probe.snapshot().await;

        let file = std::fs::File::open("/proc/self/status").unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = rx.await;
        });

        let leak = probe
            .settled(&baseline, Duration::from_millis(50))
            .await
            .unwrap_err();
        let message = leak.to_string();
        assert!(message.contains("/proc/"), "{message}");
        assert!(message.contains("tasks"), "{message}");

        drop(file);
        tx.send(()).unwrap();
        task.await.unwrap();
        probe
            .settled(&baseline, Duration::from_secs(2))
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn established_connections_on_a_port_are_counted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let probe = LeakProbe::new().port(port);
        let baseline = probe.snapshot().await;
        assert!(baseline.connections.is_empty());

        let client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // Both ends of the loopback connection name the port; it is one
        // connection.
        assert_eq!(probe.snapshot().await.connections.len(), 2);
        assert_eq!(connections(&[port, 1]), vec![1, 0]);

        drop(client);
        drop(server);
        probe
            .settled(&baseline, Duration::from_secs(2))
            .await
            .unwrap();
    }
}
