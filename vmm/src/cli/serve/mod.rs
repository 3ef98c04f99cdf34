//! `vmm serve --api PATH`: a long-running VMM whose VMs are created, driven, forked and
//! destroyed through a control API, JSON over HTTP/1.1 on a Unix socket (the convention
//! of Firecracker and Cloud Hypervisor). This module owns the socket and the request
//! loop; [`api`] the routes and bodies, [`state`] the VMs.
//!
//! The socket is made with mode 0600 (under a umask, so it is never wider), an existing
//! path is replaced only when it is a stale socket (nobody accepts on it), and it is
//! removed at exit. Requests are served by a few worker threads at once (`--workers`),
//! each VM behind its own lock; a handler that panics answers 500 and the server goes
//! on. SIGINT, SIGTERM or `POST /shutdown` stop it: no new request is taken, the ones in
//! flight get a grace period, the VMs are destroyed and the socket removed (exit 0). A
//! second signal exits at once (status 130).

pub(crate) mod api;
pub(crate) mod state;

use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;

use super::error::CliError;
use super::limits::{PAGE, check_cpu, hypervisor, parse_size};
use api::{ApiError, BODY_LIMIT, Reply};
use state::{State, StateConfig};

/// How often the workers and the main thread look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// How long requests in flight may take to finish after a stop.
const GRACE: Duration = Duration::from_secs(10);

/// The API, after `vmm serve --help`.
const SERVE_HELP: &str = "\
API (JSON bodies; every error is {\"error\": \"...\"} with 4xx when nothing changed):
  GET    /version                  version, VM count, frame pools
  POST   /vms                      create {mem?: \"64M\", vcpus?: 1, allocator?, rmap?} -> 201
  GET    /vms, /vms/ID             state, memory (resident/shared/private/PSS), faults
  POST   /vms/ID/run               {workload: \"fill:seed=1,verify:seed=1\", timeout?: SECS}
  POST   /vms/ID/verify            every page the VM's model knows {timeout?}
  POST   /vms/ID/pause, /resume
  POST   /vms/ID/fork              {clones?: 1, reserve_pages?: 0} -> 201 the clones' ids
  DELETE /vms/ID
  POST   /shutdown
Client: vmm ctl --api PATH OP, or curl --unix-socket PATH http://localhost/vms
Exit status: 0 after a clean stop; 2 when it cannot start (the message says why); 130
after a second Ctrl-C.";

/// `vmm serve`'s options.
#[derive(Debug, Clone, Args)]
#[command(after_help = SERVE_HELP)]
pub(crate) struct ServeArgs {
    /// Unix socket to serve the control API on (created with mode 0600; an existing
    /// path is replaced only if it is a stale socket nobody listens on).
    #[arg(long, value_name = "PATH")]
    pub api: PathBuf,
    /// Size of each frame pool (one per allocator/rmap pair in use, made with its first
    /// VM; a multiple of 4 KiB). The pool is sparse: host memory is used only for frames
    /// handed out. Every VM must fit in it; together they may overcommit it.
    #[arg(long, default_value = "1G")]
    pub pool: String,
    /// Default limit for each run and verify that gives no `timeout` (SECS, fractions
    /// allowed): a guest still busy then fails its VM. Default: no limit.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// Pin every VM's vCPUs and fault handler to this host CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Requests served at once (1 to 64); requests for one VM take turns (a migrate
    /// runs beside them: it moves the VM's memory while its guest works).
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Memory nodes of each frame pool (1 to 64); each node has the size of --pool.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
}

/// `--timeout` as positive seconds.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (like 30 or 0.5)"))?;
    api::seconds("--timeout", secs)
}

/// Why the server could not start (exit 2).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    /// Bad options, or no KVM.
    #[error(transparent)]
    Setup(#[from] CliError),
    /// Another server accepts on the path.
    #[error(
        "{0} is in use: a server is listening on it. Stop it (`vmm ctl --api {0} shutdown`) or \
         give another --api path"
    )]
    InUse(PathBuf),
    /// The path is something other than a socket.
    #[error(
        "{0} exists and is not a socket: remove it if it is not needed, or give another --api path"
    )]
    NotASocket(PathBuf),
    /// The path could not be examined or cleared.
    #[error("cannot use {path} for the API socket: {source}; give another --api path")]
    Path {
        /// The path.
        path: PathBuf,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// bind/listen failed.
    #[error(
        "cannot listen on {path}: {source}; check that its directory exists and is writable, \
         and that the path is under 108 bytes"
    )]
    Bind {
        /// The path.
        path: PathBuf,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server or a worker thread could not start.
    #[error("cannot start the API server: {0}")]
    Start(String),
}

impl ServeError {
    /// The exit status: 2 (bad input or a host problem), or the setup error's own.
    fn code(&self) -> u8 {
        match self {
            ServeError::Setup(e) => e.code(),
            _ => 2,
        }
    }
}

/// Makes room for the socket at `path`: nothing there, or a stale socket (removed).
fn clear_path(path: &Path) -> Result<(), ServeError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Path {
                path: path.into(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket(path.into()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServeError::InUse(path.into())),
        // Nobody accepts: a socket left by a server that died.
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            tracing::info!("replacing the stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| ServeError::Path {
                path: path.into(),
                source,
            })
        }
        Err(source) => Err(ServeError::Path {
            path: path.into(),
            source,
        }),
    }
}

/// Binds the socket with mode 0600. Call before any thread is spawned (the umask is
/// process-wide).
fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    clear_path(path)?;
    vmm::sys::umask::with_umask(0o177, || UnixListener::bind(path)).map_err(|source| {
        ServeError::Bind {
            path: path.into(),
            source,
        }
    })
}

/// Removes the socket when the server ends, however it ends (if it is still a socket).
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// The pool size from `--pool`, checked.
fn pool_bytes(s: &str) -> Result<u64, CliError> {
    let b = parse_size(s).map_err(|e| CliError::Usage(format!("--pool: {e}")))?;
    if b % PAGE != 0 {
        return Err(CliError::Usage(format!(
            "--pool {s} must be a multiple of 4 KiB"
        )));
    }
    Ok(b)
}

/// `vmm serve`: runs until stopped; the exit status.
pub(crate) fn cmd_serve(a: &ServeArgs) -> ExitCode {
    match serve(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm serve: {e}");
            ExitCode::from(e.code())
        }
    }
}

fn serve(a: &ServeArgs) -> Result<(), ServeError> {
    let pool = pool_bytes(&a.pool)?;
    if !(1..=64).contains(&a.nodes) {
        return Err(
            CliError::Usage(format!("--nodes {} must be between 1 and 64", a.nodes)).into(),
        );
    }
    check_cpu(a.cpu)?;
    if !(1..=64).contains(&a.workers) {
        return Err(CliError::Usage("--workers must be between 1 and 64".into()).into());
    }
    // Before any thread exists: the socket is bound under a umask.
    let listener = bind(&a.api)?;
    let socket = SocketFile(a.api.clone());
    let hv = hypervisor()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal sets `stop`, a second one exits at once. Registration fails
        // only for signals that cannot be caught; these two can.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone());
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    let state = Arc::new(State::new(
        hv,
        StateConfig {
            pool: a.pool.clone(),
            pool_bytes: pool,
            cpu: a.cpu,
            timeout: a.timeout,
            nodes: a.nodes,
        },
    ));
    let server = Arc::new(
        tiny_http::Server::from_listener(listener, None)
            .map_err(|e| ServeError::Start(e.to_string()))?,
    );
    let mut workers = Vec::with_capacity(a.workers);
    for i in 0..a.workers {
        let (server, state, flag) = (server.clone(), state.clone(), stop.clone());
        let h = std::thread::Builder::new()
            .name(format!("api-{i}"))
            .spawn(move || worker(&server, &state, &flag))
            .map_err(|e| ServeError::Start(format!("a worker thread: {e}")));
        match h {
            Ok(h) => workers.push(h),
            Err(e) => {
                // Release: pairs with the workers' Acquire loads.
                stop.store(true, Ordering::Release);
                return Err(e);
            }
        }
    }
    // On stderr, like every other line serve prints: a closed or full stdout must not
    // stop (or panic) a server whose work is on its socket.
    eprintln!(
        "vmm serve: listening on {} (frame pools of {} MiB; stop with Ctrl-C or POST /shutdown)",
        a.api.display(),
        pool >> 20
    );
    // Acquire: pairs with the Release store of POST /shutdown (signal-hook's handler
    // stores SeqCst).
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(POLL);
    }
    eprintln!("vmm serve: stopping");
    // The workers stop taking requests; give the ones in flight a grace period.
    let until = Instant::now() + GRACE;
    while workers.iter().any(|h| !h.is_finished()) && Instant::now() < until {
        std::thread::sleep(POLL / 4);
    }
    let busy = workers.iter().filter(|h| !h.is_finished()).count();
    for h in workers.into_iter().filter(|h| h.is_finished()) {
        let _ = h.join();
    }
    let left = state.destroy_all();
    if busy > 0 || left > 0 {
        eprintln!(
            "vmm serve: {busy} request(s) still running after {} s; {left} VM(s) stop with \
             the process",
            GRACE.as_secs()
        );
    }
    drop(server);
    drop(socket);
    Ok(())
}

/// Takes requests until `stop` is set, answering each.
fn worker(server: &tiny_http::Server, state: &State, stop: &AtomicBool) {
    // Acquire: pairs with the Release store of POST /shutdown.
    while !stop.load(Ordering::Acquire) {
        match server.recv_timeout(POLL) {
            Ok(Some(req)) => serve_one(req, state, stop),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("the API socket failed: {e}; stopping");
                // Release: pairs with the main thread's Acquire load.
                stop.store(true, Ordering::Release);
            }
        }
    }
}

/// Reads `req`'s body (at most [`BODY_LIMIT`] bytes).
fn read_body(req: &mut tiny_http::Request) -> Result<Vec<u8>, ApiError> {
    if req.body_length().is_some_and(|n| n > BODY_LIMIT) {
        return Err(ApiError::TooLarge);
    }
    let mut body = Vec::new();
    req.as_reader()
        .take(BODY_LIMIT as u64 + 1)
        .read_to_end(&mut body)
        .map_err(ApiError::Read)?;
    if body.len() > BODY_LIMIT {
        return Err(ApiError::TooLarge);
    }
    Ok(body)
}

/// Answers one request; a panic in its handler answers 500.
fn serve_one(mut req: tiny_http::Request, state: &State, stop: &AtomicBool) {
    let method = req.method().as_str().to_ascii_uppercase();
    let url = req.url().to_string();
    let reply = match read_body(&mut req) {
        Err(e) => e.reply(),
        Ok(body) => catch_unwind(AssertUnwindSafe(|| {
            api::route(state, stop, &method, &url, &body)
        }))
        .unwrap_or_else(|_| {
            tracing::error!("a handler panicked serving {method} {url}");
            ApiError::Panicked.reply()
        }),
    };
    tracing::debug!("{method} {url} -> {}", reply.status);
    respond(req, &reply);
}

fn respond(req: tiny_http::Request, reply: &Reply) {
    let mut resp = tiny_http::Response::from_string(format!("{}\n", reply.body))
        .with_status_code(reply.status);
    if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]) {
        resp.add_header(h);
    }
    // The client may have gone; nothing is left to tell it.
    let _ = req.respond(resp);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-serve-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_missing_path_is_free_and_a_plain_file_is_refused() {
        let d = tmp("plain");
        assert!(clear_path(&d.join("none")).is_ok());
        std::fs::write(d.join("f"), b"keep me").unwrap();
        assert!(matches!(
            clear_path(&d.join("f")),
            Err(ServeError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(d.join("f")).unwrap(), b"keep me");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_removed() {
        let d = tmp("sock");
        let p = d.join("s");
        let l = UnixListener::bind(&p).unwrap();
        assert!(matches!(clear_path(&p), Err(ServeError::InUse(_))));
        drop(l);
        assert!(clear_path(&p).is_ok());
        assert!(!p.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pool_sizes_are_checked() {
        assert_eq!(pool_bytes("1G").ok(), Some(1 << 30));
        assert!(pool_bytes("1000").is_err());
        assert!(pool_bytes("lots").is_err());
    }
}
