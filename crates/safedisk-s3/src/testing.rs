//! A real S3 server in-process, and the tools fault tests need around it.
//!
//! Enabled by the `testing` feature. Everything here is for tests and
//! benchmarks, of this crate and of crates built on it:
//!
//! - [`S3TestServer`]: `s3s-fs` (an S3 implementation storing objects as
//!   files) served over hyper on `127.0.0.1`, in a background task of the
//!   current tokio runtime, with one bucket and fixed credentials.
//!   Conditional writes (`If-None-Match`) are serialised, since s3s-fs
//!   checks the condition and writes in two steps where S3 makes them one. Its data
//!   directory can be one the test chose, such as a small tmpfs, so a full
//!   disk gives real `500` answers.
//! - [`TcpRelay`]: a loopback TCP relay in front of a server that can be told
//!   to stop answering, for a server that hangs mid-request.
//!
//! Leak checks count connections with `safedisk_testkit::probe`.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use safedisk_s3::testing::S3TestServer;
//!
//! let server = S3TestServer::start().await?;
//! let store = server.store();
//! # let _ = store;
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, S3CopyIfNotExists};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The bucket every [`S3TestServer`] serves.
pub const BUCKET: &str = "safedisk";

/// The access key the server accepts.
pub const ACCESS_KEY: &str = "safedisk-test-access";

/// The secret key the server accepts.
pub const SECRET_KEY: &str = "safedisk-test-secret";

/// The idle deadline that stores built by [`S3TestServer::store`] are
/// configured for: 5 s, the fills' default idle deadline
/// ([`safedisk_core::DEFAULT_IDLE_DEADLINE`]). Debug builds on a busy
/// machine can take seconds per part, so shorter settings make tests flaky.
pub const TEST_REQUEST_TIMEOUT: Duration = safedisk_core::DEFAULT_IDLE_DEADLINE;

/// An S3 server on loopback, serving [`BUCKET`] from a data directory.
///
/// The server runs as tasks of the runtime that started it; dropping the
/// value stops accepting and closes every connection. The data directory is
/// removed on drop when the server created it.
#[derive(Debug)]
pub struct S3TestServer {
    addr: SocketAddr,
    root: PathBuf,
    _temp: Option<tempfile::TempDir>,
    _tasks: JoinSet<()>,
}

impl S3TestServer {
    /// Starts a server whose data lives in a new temporary directory.
    ///
    /// # Errors
    ///
    /// Failure to create the directory or bind the port.
    pub async fn start() -> io::Result<Self> {
        let temp = tempfile::tempdir()?;
        let root = temp.path().to_owned();
        let mut server = Self::start_in(&root).await?;
        server._temp = Some(temp);
        Ok(server)
    }

    /// Starts a server whose data lives in `root`, which must exist (a
    /// size-limited tmpfs, for instance). The bucket directory is created in
    /// it; nothing is removed on drop.
    ///
    /// # Errors
    ///
    /// Failure to create the bucket directory or bind the port.
    pub async fn start_in(root: &FsPath) -> io::Result<Self> {
        std::fs::create_dir_all(root.join(BUCKET))?;
        let fs = s3s_fs::FileSystem::new(root)
            .map_err(|e| io::Error::other(format!("s3s-fs refused {}: {e:?}", root.display())))?;
        let service = {
            let mut builder = s3s::service::S3ServiceBuilder::new(fs);
            builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            builder.build()
        };

        // s3s-fs checks `If-None-Match: *` and then writes, so two
        // conditional writes racing on one key can both succeed. S3 makes
        // the check and the write one step; serialising conditional writes
        // gives this server the same guarantee.
        let conditional = Arc::new(tokio::sync::Mutex::new(()));

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            // Connections live in this set so that stopping the server
            // closes them too.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((socket, _)) = accepted else { continue };
                        // Without it a response's head and body, written
                        // apart, wait out the client's delayed ACK (40 ms).
                        let _ = socket.set_nodelay(true);
                        let service = service.clone();
                        let conditional = conditional.clone();
                        let serve = hyper::service::service_fn(move |request| {
                            let service = service.clone();
                            let conditional = conditional.clone();
                            async move {
                                let _turn = match request.headers().contains_key("if-none-match") {
                                    true => Some(conditional.lock_owned().await),
                                    false => None,
                                };
                                hyper::service::Service::call(&service, request).await
                            }
                        });
                        connections.spawn(async move {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(socket), serve)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });

        Ok(Self {
            addr,
            root: root.to_owned(),
            _temp: None,
            _tasks: tasks,
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The data directory; objects are under `BUCKET/`, upload state in
    /// hidden files at the top.
    pub fn data_dir(&self) -> &FsPath {
        &self.root
    }

    /// A builder for a store talking to `endpoint` (this server, or a relay
    /// in front of it) with the server's credentials, path-style requests,
    /// conditional puts, copy-if-not-exists by multipart copy, and the
    /// client settings of [`client_options_for`](crate::client_options_for)
    /// and [`retry_config_for`](crate::retry_config_for) at
    /// [`TEST_REQUEST_TIMEOUT`].
    ///
    /// Requests are signed but their payloads are not (`UNSIGNED-PAYLOAD`),
    /// which saves hashing every body twice more (client and server) in
    /// debug builds; the server still checks every signature.
    pub fn store_builder_for(endpoint: &str) -> AmazonS3Builder {
        // Client options first: they replace the whole set, `allow_http`
        // included.
        AmazonS3Builder::new()
            .with_client_options(crate::client_options_for(TEST_REQUEST_TIMEOUT))
            .with_retry(crate::retry_config_for(TEST_REQUEST_TIMEOUT))
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name(BUCKET)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_virtual_hosted_style_request(false)
            .with_unsigned_payload(true)
            .with_copy_if_not_exists(S3CopyIfNotExists::Multipart)
    }

    /// [`store_builder_for`](Self::store_builder_for) this server.
    pub fn store_builder(&self) -> AmazonS3Builder {
        Self::store_builder_for(&self.endpoint())
    }

    /// A store for this server, built from
    /// [`store_builder`](Self::store_builder).
    ///
    /// # Panics
    ///
    /// If the builder refuses its own settings, which would be a bug here.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(self.store_builder().build().expect("valid test store"))
    }

    /// Every object in the bucket, as paths relative to it, sorted. Reads
    /// the data directory directly, not through S3.
    ///
    /// # Errors
    ///
    /// Failure to read the directory.
    pub fn objects(&self) -> io::Result<Vec<String>> {
        let bucket = self.root.join(BUCKET);
        let mut found = Vec::new();
        let mut stack = vec![bucket.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    stack.push(entry.path());
                } else if let Ok(relative) = entry.path().strip_prefix(&bucket) {
                    found.push(relative.to_string_lossy().into_owned());
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// Files the server keeps for multipart uploads that are neither
    /// completed nor aborted (upload records and stored parts).
    ///
    /// # Errors
    ///
    /// Failure to read the directory.
    pub fn open_uploads(&self) -> io::Result<Vec<String>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(".upload") {
                found.push(name);
            }
        }
        found.sort();
        Ok(found)
    }
}

/// A TCP relay on `127.0.0.1` that forwards to a target until told to stop
/// answering.
///
/// While stopped it keeps every connection open and keeps reading (so a
/// client can still send, and its close is noticed), but forwards nothing
/// either way: to the client the server has hung. When either side of a
/// relayed connection closes, both are closed.
#[derive(Debug)]
pub struct TcpRelay {
    addr: SocketAddr,
    stopped: Arc<AtomicBool>,
    _tasks: JoinSet<()>,
}

impl TcpRelay {
    /// Starts a relay to `target` in the current runtime.
    ///
    /// # Errors
    ///
    /// Failure to bind the port.
    pub async fn start(target: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stopped = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();

        let flag = stopped.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        connections.spawn(relay(client, target, flag.clone()));
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });

        Ok(Self {
            addr,
            stopped,
            _tasks: tasks,
        })
    }

    /// The relay's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops forwarding, on open connections and new ones.
    pub fn stop_answering(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Forwards again.
    pub fn resume(&self) {
        self.stopped.store(false, Ordering::SeqCst);
    }
}

async fn relay(client: TcpStream, target: SocketAddr, stopped: Arc<AtomicBool>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();

    // Whichever direction ends first ends the connection: dropping both
    // halves of both sockets closes them.
    tokio::select! {
        () = pump(client_read, server_write, stopped.clone()) => {}
        () = pump(server_read, client_write, stopped) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stopped: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stopped.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
