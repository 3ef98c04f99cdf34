//! `vmm ctl --api PATH OP ...`: the client of `vmm serve`. Each op is one HTTP/1.1
//! request over the Unix socket (written here on `UnixStream`: one request per
//! connection, `Connection: close`, the reply read to its end); the reply's JSON is
//! printed pretty on stdout.
//!
//! Exit status: 0 for a 2xx reply (for `run` and `verify`: and no mismatch); 1 for a 4xx or
//! 5xx reply (its message on stderr) or a verify that found mismatches; 2 when the socket
//! cannot be reached or does not speak the API (with what to do).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::args::{AllocatorArg, RmapArg};

/// `vmm ctl`'s options.
#[derive(Debug, Args)]
#[command(after_help = "\
Exit status: 0 for a 2xx reply (run and verify: with no mismatch); 1 for a 4xx/5xx reply
(the message on stderr) or a verify that found mismatches; 2 when the socket cannot be
reached. Example: vmm ctl --api /tmp/vmm.sock run 1 fill:seed=1,verify:seed=1")]
pub(crate) struct CtlArgs {
    /// The socket `vmm serve --api PATH` listens on.
    #[arg(long, value_name = "PATH")]
    pub api: PathBuf,
    /// What to ask.
    #[command(subcommand)]
    pub op: CtlOp,
}

/// One request to the server.
#[derive(Debug, Subcommand)]
pub(crate) enum CtlOp {
    /// The server's version, VM count and frame pools (GET /version).
    Version,
    /// Create a VM running the test guest (POST /vms); prints it with its id.
    Create {
        /// Guest RAM: 64M, 1G ... (a multiple of 2 MiB, 4 MiB to 64 GiB).
        #[arg(long, default_value = "64M")]
        mem: String,
        /// vCPUs (1 to 64).
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Frame allocator design.
        #[arg(long, value_enum, default_value = "magazine")]
        allocator: AllocatorArg,
        /// Reverse-map design.
        #[arg(long, value_enum, default_value = "chain")]
        rmap: RmapArg,
        /// Each vCPU's home node (vCPU i the (i mod len)-th entry; see `run --help`).
        #[arg(long, value_name = "LIST", value_delimiter = ',')]
        vcpu_nodes: Option<Vec<u16>>,
    },
    /// Every VM with its state and memory (GET /vms).
    List,
    /// One VM (GET /vms/ID).
    Show {
        /// The VM's id.
        id: u64,
    },
    /// Run a workload in a VM (POST /vms/ID/run; see `vmm run --help` for WORKLOAD).
    Run {
        /// The VM's id.
        id: u64,
        /// The guest commands, e.g. fill:seed=1,verify:seed=1.
        workload: String,
        /// Give up after SECS seconds (the VM is then marked failed).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Move a VM's memory (or pages START .. START+PAGES) to another node while it runs
    /// (POST /vms/ID/migrate; `vmm serve --nodes N`).
    Migrate {
        /// The VM's id.
        id: u64,
        /// The target node.
        node: u16,
        /// First guest page (gfn).
        #[arg(long)]
        start: Option<u64>,
        /// Pages to move.
        #[arg(long)]
        pages: Option<u64>,
        /// How the reverse-map walks lock: exclusive, shared or unlocked.
        #[arg(long, default_value = "shared")]
        walk: String,
    },
    /// Verify every page the VM's fills wrote, its parent's included (POST /vms/ID/verify).
    Verify {
        /// The VM's id.
        id: u64,
        /// Give up after SECS seconds (the VM is then marked failed).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Pause a VM's vCPUs (POST /vms/ID/pause).
    Pause {
        /// The VM's id.
        id: u64,
    },
    /// Resume a paused VM (POST /vms/ID/resume).
    Resume {
        /// The VM's id.
        id: u64,
    },
    /// Snapshot-fork a VM into clones (POST /vms/ID/fork); prints the clones' ids.
    Fork {
        /// The VM's id.
        id: u64,
        /// Clones to make (1 to 1000).
        #[arg(long, default_value_t = 1)]
        clones: usize,
        /// Frames reserved for each clone's own copies.
        #[arg(long, default_value_t = 0)]
        reserve_pages: u64,
    },
    /// Destroy a VM, returning its frames (DELETE /vms/ID).
    Destroy {
        /// The VM's id.
        id: u64,
    },
    /// Stop the server: its VMs are destroyed and the socket removed (POST /shutdown).
    Shutdown,
}

/// Why `ctl` failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CtlError {
    /// Nothing accepts on the socket (exit 2).
    #[error(
        "cannot reach a VMM at {path}: {source}. Start one with `vmm serve --api {path}` or \
         give the --api path it listens on"
    )]
    Connect {
        /// The socket.
        path: String,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke (exit 2).
    #[error("talking to the VMM at {path} failed: {source}; is it still running?")]
    Io {
        /// The socket.
        path: String,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// The reply is not an API reply (exit 2).
    #[error(
        "{path} did not answer as `vmm serve` does ({why}): is --api the socket of a vmm serve?"
    )]
    Protocol {
        /// The socket.
        path: String,
        /// What was wrong.
        why: String,
    },
    /// The server refused or failed the request (exit 1).
    #[error("{message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// A verify found mismatched words (exit 1).
    #[error("a verify found {0} mismatched word(s) (see the reply)")]
    Mismatch(u64),
    /// The reply could not be written out (exit 2; a closed pipe ends quietly).
    #[error("cannot write the reply: {0}: free some space or write it elsewhere")]
    Output(#[source] std::io::Error),
}

impl CtlError {
    /// The exit status.
    fn code(&self) -> u8 {
        match self {
            CtlError::Connect { .. }
            | CtlError::Io { .. }
            | CtlError::Protocol { .. }
            | CtlError::Output(_) => 2,
            CtlError::Api { .. } | CtlError::Mismatch(_) => 1,
        }
    }
}

/// A parsed HTTP reply.
#[derive(Debug)]
struct HttpReply {
    status: u16,
    body: Vec<u8>,
}

/// Decodes a chunked body.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..eol]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// Parses a whole HTTP/1.1 reply.
fn parse_reply(raw: &[u8]) -> Result<HttpReply, String> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of the HTTP headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "headers not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(format!("not an HTTP/1 status line: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let (mut length, mut chunked) = (None, false);
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {v:?}"))?,
            );
        } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest).ok_or("a broken chunked body")?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or("a body shorter than its Content-Length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpReply { status, body })
}

/// Sends one request and returns the status, the JSON body and its text (printed as the
/// server wrote it, fields in its order).
fn call(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&Value>,
) -> Result<(u16, Value, String), CtlError> {
    let path = socket.display().to_string();
    let mut s = UnixStream::connect(socket).map_err(|source| CtlError::Connect {
        path: path.clone(),
        source,
    })?;
    let io = |source| CtlError::Io {
        path: path.clone(),
        source,
    };
    let payload = body.map(Value::to_string).unwrap_or_default();
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Connection: close\r\nContent-Length: {}\r\n",
        payload.len()
    );
    if body.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(&payload);
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    let protocol = |why: String| CtlError::Protocol {
        path: path.clone(),
        why,
    };
    let reply = parse_reply(&raw).map_err(protocol)?;
    let json: Value = serde_json::from_slice(&reply.body)
        .map_err(|e| protocol(format!("the body is not JSON: {e}")))?;
    let text = String::from_utf8_lossy(&reply.body).trim_end().to_string();
    Ok((reply.status, json, text))
}

/// The clap name of a value (`magazine`, `chain`), as the API takes it.
fn value_name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// The method, path and body of `op`.
fn request(op: &CtlOp) -> (&'static str, String, Option<Value>) {
    match op {
        CtlOp::Version => ("GET", "/version".into(), None),
        CtlOp::Create {
            mem,
            vcpus,
            allocator,
            rmap,
            vcpu_nodes,
        } => (
            "POST",
            "/vms".into(),
            Some(json!({
                "mem": mem,
                "vcpus": vcpus,
                "allocator": value_name(allocator),
                "rmap": value_name(rmap),
                "vcpu_nodes": vcpu_nodes,
            })),
        ),
        CtlOp::List => ("GET", "/vms".into(), None),
        CtlOp::Show { id } => ("GET", format!("/vms/{id}"), None),
        CtlOp::Run {
            id,
            workload,
            timeout,
        } => (
            "POST",
            format!("/vms/{id}/run"),
            Some(json!({ "workload": workload, "timeout": timeout })),
        ),
        CtlOp::Verify { id, timeout } => (
            "POST",
            format!("/vms/{id}/verify"),
            Some(json!({ "timeout": timeout })),
        ),
        CtlOp::Migrate {
            id,
            node,
            start,
            pages,
            walk,
        } => (
            "POST",
            format!("/vms/{id}/migrate"),
            Some(json!({ "node": node, "start": start, "pages": pages, "walk": walk })),
        ),
        CtlOp::Pause { id } => ("POST", format!("/vms/{id}/pause"), None),
        CtlOp::Resume { id } => ("POST", format!("/vms/{id}/resume"), None),
        CtlOp::Fork {
            id,
            clones,
            reserve_pages,
        } => (
            "POST",
            format!("/vms/{id}/fork"),
            Some(json!({ "clones": clones, "reserve_pages": reserve_pages })),
        ),
        CtlOp::Destroy { id } => ("DELETE", format!("/vms/{id}"), None),
        CtlOp::Shutdown => ("POST", "/shutdown".into(), None),
    }
}

fn ctl(a: &CtlArgs) -> Result<(), CtlError> {
    let (method, target, body) = request(&a.op);
    let (status, reply, text) = call(&a.api, method, &target, body.as_ref())?;
    if !(200..300).contains(&status) {
        let message = reply
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| reply.to_string(), str::to_string);
        return Err(CtlError::Api { status, message });
    }
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        Err(e) => return Err(CtlError::Output(e)),
    }
    if reply.get("verified") == Some(&Value::Bool(false)) {
        let bad = reply.get("mismatches").and_then(Value::as_u64).unwrap_or(0);
        return Err(CtlError::Mismatch(bad));
    }
    Ok(())
}

/// `vmm ctl`: the exit status.
pub(crate) fn cmd_ctl(a: &CtlArgs) -> ExitCode {
    match ctl(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm ctl: {e}");
            ExitCode::from(e.code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_with_content_length_parses() {
        let r = parse_reply(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}extra").unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn a_chunked_reply_parses() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n";
        let r = parse_reply(raw).unwrap();
        assert_eq!(r.body, b"{\"a\":1}");
    }

    #[test]
    fn replies_that_are_not_http_are_refused() {
        assert!(parse_reply(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
        assert!(parse_reply(b"HTTP/1.1 200").is_err());
    }

    #[test]
    fn ops_become_their_routes() {
        let (m, t, b) = request(&CtlOp::Fork {
            id: 3,
            clones: 2,
            reserve_pages: 0,
        });
        assert_eq!((m, t.as_str()), ("POST", "/vms/3/fork"));
        assert_eq!(b.unwrap()["clones"], 2);
        let (m, t, _) = request(&CtlOp::Destroy { id: 1 });
        assert_eq!((m, t.as_str()), ("DELETE", "/vms/1"));
    }

    #[test]
    fn an_unreachable_socket_exits_2_and_says_how_to_start_a_server() {
        let e = call(Path::new("/nonexistent/vmm.sock"), "GET", "/", None).unwrap_err();
        assert_eq!(e.code(), 2);
        assert!(e.to_string().contains("vmm serve --api"), "{e}");
    }
}
