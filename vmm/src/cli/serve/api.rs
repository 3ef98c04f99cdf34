//! The control API's routes and JSON bodies: a request (method, path, body bytes) becomes
//! a call on [`State`] and a [`Reply`] (status and JSON body). Free of any HTTP library, so
//! that routing and body checks are tested as plain functions.
//!
//! | method | path | body | reply |
//! |---|---|---|---|
//! | `GET` | `/`, `/version` | | 200 `{name, version, vms, pools}` |
//! | `POST`/`PUT` | `/vms` | `{mem?, vcpus?, allocator?, rmap?, vcpu_nodes?}` | 201 the VM |
//! | `GET` | `/vms` | | 200 `{vms: [...]}` |
//! | `GET` | `/vms/{id}` | | 200 the VM |
//! | `POST` | `/vms/{id}/run` | `{workload, timeout?}` | 200 `{id, steps, mismatches, verified}` |
//! | `POST` | `/vms/{id}/verify` | `{timeout?}` | 200 `{id, pages_verified, mismatches, verified}` |
//! | `POST` | `/vms/{id}/pause`, `/resume` | | 200 the VM |
//! | `POST` | `/vms/{id}/fork` | `{clones?, reserve_pages?}` | 201 `{parent, clones, fork_ms, clone_ms}` |
//! | `POST` | `/vms/{id}/migrate` | `{node, start?, pages?, walk?}` | 200 `{id, node, stats, seconds, pages_per_node}` (runs beside the VM's other requests) |
//! | `DELETE` | `/vms/{id}` | | 200 `{destroyed}` |
//! | `POST` | `/shutdown` | | 202 `{shutting_down: true}` |
//!
//! `PUT` is taken wherever `POST` is. Every error is `{"error": "..."}` with a 4xx status
//! when the request was refused and nothing changed (400 bad JSON, field, size or
//! workload; 404 unknown VM or path; 405 wrong method; 409 the VM's state does not allow
//! it; 413 body too large), 503 for a host limit, 504 when the guest passed its timeout
//! and 500 when the guest or the VMM failed (the VM is then marked failed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::state::{ApiId, CreateSpec, OpError, State};

/// The largest request body taken.
pub(crate) const BODY_LIMIT: usize = 64 * 1024;

/// What a VM is made with when a create leaves a field out.
pub(crate) const DEFAULT_MEM: &str = "64M";

/// A response: HTTP status and JSON body (pretty, fields in their declared order).
#[derive(Debug)]
pub(crate) struct Reply {
    /// HTTP status.
    pub status: u16,
    /// JSON text.
    pub body: String,
}

/// Why a request was refused before it reached a VM, or what the VM operation said.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// No such route (404).
    #[error("no route {method} {path}: see GET /version, /vms, /vms/{{id}} and its actions")]
    NoRoute {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// A route that does not take this method (405).
    #[error("{path} does not take {method}: use {allowed}")]
    Method {
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// The methods it takes.
        allowed: &'static str,
    },
    /// A body that is not the JSON the route takes (400).
    #[error("the request body is not the JSON this call takes: {0}")]
    Body(#[source] serde_json::Error),
    /// A field with a value out of range (400).
    #[error("{0}")]
    Field(String),
    /// A body larger than [`BODY_LIMIT`] (413).
    #[error("the request body is larger than {BODY_LIMIT} bytes")]
    TooLarge,
    /// Reading the request failed (400).
    #[error("cannot read the request body: {0}")]
    Read(#[source] std::io::Error),
    /// A handler panicked (500); the server goes on.
    #[error("the server failed handling this request (a panic; see its log) and goes on serving")]
    Panicked,
    /// What the VM operation said.
    #[error(transparent)]
    Op(#[from] OpError),
}

impl ApiError {
    /// The HTTP status.
    pub(crate) fn status(&self) -> u16 {
        match self {
            ApiError::NoRoute { .. } => 404,
            ApiError::Method { .. } => 405,
            ApiError::Body(_) | ApiError::Field(_) | ApiError::Read(_) => 400,
            ApiError::TooLarge => 413,
            ApiError::Panicked => 500,
            ApiError::Op(e) => e.status(),
        }
    }

    /// The error as a reply.
    pub(crate) fn reply(&self) -> Reply {
        to_json(self.status(), &json!({ "error": self.to_string() }))
    }
}

/// `GET /version`.
#[derive(Debug, serde::Serialize)]
struct Version {
    /// `vmm`.
    name: &'static str,
    /// The program's version.
    version: &'static str,
    /// VMs in the table.
    vms: usize,
    /// The frame pools made so far.
    pools: Vec<super::state::PoolView>,
}

/// A size: bytes, or text with a K/M/G/T unit.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

/// `POST /vms`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateReq {
    /// Guest RAM (default [`DEFAULT_MEM`]).
    mem: Option<Size>,
    /// vCPUs (default 1).
    vcpus: Option<u32>,
    /// `magazine` (default), `percpu`, `global`.
    allocator: Option<String>,
    /// `chain` (default), `flat`.
    rmap: Option<String>,
    /// Each vCPU's home node (vCPU i the (i mod len)-th); default: all on node 0.
    vcpu_nodes: Option<Vec<u16>>,
}

/// `POST /vms/{id}/run`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunReq {
    /// WORKLOAD syntax.
    workload: String,
    /// Seconds.
    timeout: Option<f64>,
}

/// `POST /vms/{id}/verify`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyReq {
    /// Seconds.
    timeout: Option<f64>,
}

/// `POST /vms/{id}/fork`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForkReq {
    /// Clones (default 1).
    clones: Option<usize>,
    /// Frames reserved for each clone's own copies (default 0).
    reserve_pages: Option<u64>,
}

/// `POST /vms/{id}/migrate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateReq {
    /// The target node.
    node: u16,
    /// First guest page (gfn; default 0).
    start: Option<u64>,
    /// Pages (default: to the end of guest memory).
    pages: Option<u64>,
    /// "exclusive", "shared" (default) or "unlocked".
    walk: Option<String>,
}

/// Routes without a body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// `body` as `T`; an empty body is `T::default()` when `T` has one.
fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], empty: Option<T>) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace)
        && let Some(d) = empty
    {
        return Ok(d);
    }
    serde_json::from_slice(body).map_err(ApiError::Body)
}

/// Positive, finite seconds.
pub(crate) fn seconds(what: &str, secs: f64) -> Result<Duration, String> {
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!(
            "{what} {secs}: give more than 0 seconds (leave it out for no limit)"
        ));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{what} {secs} seconds is too long: leave it out for no limit"))
}

fn timeout(t: Option<f64>) -> Result<Option<Duration>, ApiError> {
    t.map(|s| seconds("timeout", s))
        .transpose()
        .map_err(ApiError::Field)
}

/// `v` as the reply's JSON text.
fn to_json<T: serde::Serialize>(status: u16, v: &T) -> Reply {
    match serde_json::to_string_pretty(v) {
        Ok(body) => Reply { status, body },
        Err(e) => Reply {
            status: 500,
            body: json!({ "error": format!("cannot write the reply as JSON: {e}") }).to_string(),
        },
    }
}

/// The path's segments, without the query and empty segments.
fn segments(url: &str) -> Vec<&str> {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// Serves one request. `stop` is set by `POST /shutdown`.
pub(crate) fn route(
    state: &State,
    stop: &AtomicBool,
    method: &str,
    url: &str,
    body: &[u8],
) -> Reply {
    handle(state, stop, method, url, body).unwrap_or_else(|e| e.reply())
}

fn handle(
    state: &State,
    stop: &AtomicBool,
    method: &str,
    url: &str,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let segs = segments(url);
    let path = format!("/{}", segs.join("/"));
    let wrong = |allowed| ApiError::Method {
        method: method.into(),
        path: path.clone(),
        allowed,
    };
    let post = matches!(method, "POST" | "PUT");
    let id = |s: &str| {
        s.parse::<u64>().map(ApiId).map_err(|_| ApiError::NoRoute {
            method: method.into(),
            path: path.clone(),
        })
    };
    match segs.as_slice() {
        [] | ["version"] => match method {
            "GET" => Ok(to_json(
                200,
                &Version {
                    name: "vmm",
                    version: env!("CARGO_PKG_VERSION"),
                    vms: state.vm_count(),
                    pools: state.pools(),
                },
            )),
            _ => Err(wrong("GET")),
        },
        ["vms"] => match method {
            "GET" => Ok(to_json(200, &json!({ "vms": state.list() }))),
            _ if post => {
                let r: CreateReq = parse(body, Some(CreateReq::default()))?;
                let mem = match r.mem {
                    None => DEFAULT_MEM.to_string(),
                    Some(Size::Bytes(b)) => b.to_string(),
                    Some(Size::Text(t)) => t,
                };
                let spec = CreateSpec {
                    mem,
                    vcpus: r.vcpus.unwrap_or(1),
                    allocator: r.allocator.unwrap_or_else(|| "magazine".into()),
                    rmap: r.rmap.unwrap_or_else(|| "chain".into()),
                    vcpu_nodes: r.vcpu_nodes,
                };
                Ok(to_json(201, &state.create(&spec)?))
            }
            _ => Err(wrong("GET, POST or PUT")),
        },
        ["vms", n] => {
            let n = id(n)?;
            match method {
                "GET" => Ok(to_json(200, &state.show(n)?)),
                "DELETE" => {
                    parse::<NoFields>(body, Some(NoFields {}))?;
                    state.destroy(n)?;
                    Ok(to_json(200, &json!({ "destroyed": n })))
                }
                _ => Err(wrong("GET or DELETE")),
            }
        }
        ["vms", n, action] => {
            let n = id(n)?;
            if !post {
                return Err(wrong("POST or PUT"));
            }
            match *action {
                "run" => {
                    let r: RunReq = parse(body, None)?;
                    let t = timeout(r.timeout)?;
                    Ok(to_json(200, &state.run(n, &r.workload, t)?))
                }
                "verify" => {
                    let r: VerifyReq = parse(body, Some(VerifyReq::default()))?;
                    let t = timeout(r.timeout)?;
                    Ok(to_json(200, &state.verify(n, t)?))
                }
                "pause" => {
                    parse::<NoFields>(body, Some(NoFields {}))?;
                    Ok(to_json(200, &state.pause(n)?))
                }
                "resume" => {
                    parse::<NoFields>(body, Some(NoFields {}))?;
                    Ok(to_json(200, &state.resume(n)?))
                }
                "migrate" => {
                    let r: MigrateReq = parse(body, None)?;
                    let walk = match r.walk.as_deref() {
                        None | Some("shared") => guestmem::MigrateWalk::Shared,
                        Some("exclusive") => guestmem::MigrateWalk::Exclusive,
                        Some("unlocked") => guestmem::MigrateWalk::Unlocked,
                        Some(w) => {
                            return Err(ApiError::Field(format!(
                                "walk {w:?}: give exclusive, shared or unlocked"
                            )));
                        }
                    };
                    Ok(to_json(
                        200,
                        &state.migrate(n, r.node, r.start, r.pages, walk)?,
                    ))
                }
                "fork" => {
                    let r: ForkReq = parse(body, Some(ForkReq::default()))?;
                    let f = state.fork(n, r.clones.unwrap_or(1), r.reserve_pages.unwrap_or(0))?;
                    Ok(to_json(201, &f))
                }
                _ => Err(ApiError::NoRoute {
                    method: method.into(),
                    path,
                }),
            }
        }
        ["shutdown"] => {
            if !post {
                return Err(wrong("POST or PUT"));
            }
            parse::<NoFields>(body, Some(NoFields {}))?;
            // Release: pairs with the server loop's Acquire load; the reply is written
            // before the loop stops taking requests.
            stop.store(true, Ordering::Release);
            Ok(to_json(202, &json!({ "shutting_down": true })))
        }
        _ => Err(ApiError::NoRoute {
            method: method.into(),
            path,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn paths_lose_their_query_and_empty_segments() {
        assert_eq!(segments("/vms/3/run?x=1"), ["vms", "3", "run"]);
        assert_eq!(segments("//vms/"), ["vms"]);
        assert!(segments("/").is_empty());
    }

    #[test]
    fn an_empty_body_takes_the_defaults_but_bad_json_and_unknown_fields_are_refused() {
        let r: ForkReq = parse(b" ", Some(ForkReq::default())).unwrap();
        assert_eq!(r.clones, None);
        for bad in [&b"{"[..], b"{\"clone\": 2}", b"[]", b"{\"clones\": -1}"] {
            let e = parse::<ForkReq>(bad, Some(ForkReq::default())).unwrap_err();
            assert_eq!(e.status(), 400, "{}", String::from_utf8_lossy(bad));
        }
        // A run has no default: its workload is required.
        assert_eq!(parse::<RunReq>(b"", None).unwrap_err().status(), 400);
    }

    #[test]
    fn sizes_are_bytes_or_text() {
        let r: CreateReq = parse(br#"{"mem": 67108864}"#, None).unwrap();
        assert!(matches!(r.mem, Some(Size::Bytes(67108864))));
        let r: CreateReq = parse(br#"{"mem": "64M", "vcpus": 2}"#, None).unwrap();
        assert!(matches!(r.mem, Some(Size::Text(ref t)) if t == "64M"));
    }

    #[test]
    fn timeouts_must_be_positive_finite_seconds() {
        assert_eq!(seconds("timeout", 0.5), Ok(Duration::from_millis(500)));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            assert!(seconds("timeout", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_reply_with_their_status_and_a_message() {
        let r = ApiError::TooLarge.reply();
        assert_eq!(r.status, 413);
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert!(body["error"].as_str().unwrap().contains("larger"));
    }
}
