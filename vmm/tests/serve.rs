//! `vmm serve` and `vmm ctl` end to end: the real binary serves its control API on a
//! Unix socket in a fresh directory and the tests drive it over that socket (a small
//! HTTP/1.1 client below, and `vmm ctl`). They check the VM life cycle (create, run,
//! fork, verify in a clone, pause, resume, list, destroy), that bad requests are refused
//! with 4xx and change nothing, that a failing guest fails only its VM, that requests to
//! different VMs are served at once, and the socket's rules (mode 0600, never replacing a
//! file or a live socket, replacing a stale one, removed at exit).
//!
//! Needs /dev/kvm (fails saying so unless SKIP_KVM=1); the guests are small (32 MiB, a few
//! pages) because the software KVM here is slow.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{kvm, vmm};

/// A fresh directory for one test's socket.
fn tmpdir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "vmm-serve-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("make a test directory");
    d
}

/// One request over the socket: the status and the JSON reply.
fn http(sock: &Path, method: &str, target: &str, body: Option<&str>) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the reply");
    let text = String::from_utf8(raw).expect("a UTF-8 reply");
    let (head, rest) = text.split_once("\r\n\r\n").expect("an HTTP reply");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    assert!(
        head.to_ascii_lowercase().contains("content-length"),
        "{head}"
    );
    let json = serde_json::from_str(rest).unwrap_or_else(|e| panic!("{e}: {rest:?}"));
    (status, json)
}

/// A running `vmm serve`, shut down (POST /shutdown, then killed if it hangs) on drop.
struct Server {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Server {
    fn start(name: &str) -> Server {
        Server::start_with(name, &[])
    }

    fn start_with(name: &str, extra: &[&str]) -> Server {
        let dir = tmpdir(name);
        let sock = dir.join("sock");
        Server::start_at_with(dir, sock, extra)
    }

    fn start_at(dir: PathBuf, sock: PathBuf) -> Server {
        Server::start_at_with(dir, sock, &[])
    }

    fn start_at_with(dir: PathBuf, sock: PathBuf, extra: &[&str]) -> Server {
        let log = std::fs::File::create(dir.join("stderr")).expect("a log file");
        let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["serve", "--api"])
            .arg(&sock)
            .args(["--pool", "256M"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start vmm serve");
        let mut s = Server { child, dir, sock };
        let until = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(&s.sock).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("vmm serve exited ({st}): {}", s.log());
            }
            assert!(
                Instant::now() < until,
                "vmm serve did not listen: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    fn call(&self, method: &str, target: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        http(&self.sock, method, target, body.as_deref())
    }

    /// A request that must succeed with `status`.
    fn ok(&self, status: u16, method: &str, target: &str, body: Option<Value>) -> Value {
        let (st, v) = self.call(method, target, body);
        assert_eq!(st, status, "{method} {target}: {v}");
        v
    }

    /// A request that must be refused with `status` and an error message.
    fn refused(&self, status: u16, method: &str, target: &str, body: Option<&str>) -> String {
        let (st, v) = http(&self.sock, method, target, body);
        assert_eq!(st, status, "{method} {target} {body:?}: {v}");
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {v}"))
            .to_string()
    }

    fn create(&self) -> u64 {
        let v = self.ok(201, "POST", "/vms", Some(json!({"mem": "32M", "vcpus": 1})));
        v["id"].as_u64().expect("an id")
    }

    fn run(&self, id: u64, workload: &str) -> Value {
        let v = self.ok(
            200,
            "POST",
            &format!("/vms/{id}/run"),
            Some(json!({ "workload": workload })),
        );
        assert!(v["steps"].is_array(), "{v}");
        v
    }

    fn ctl(&self, args: &[&str]) -> Output {
        let sock = self.sock.to_str().expect("a UTF-8 path");
        let mut all = vec!["ctl", "--api", sock];
        all.extend_from_slice(args);
        vmm(&all)
    }

    /// Stops the server with `POST /shutdown` and returns its exit status.
    fn shutdown(&mut self) -> Option<i32> {
        let _ = self.call("POST", "/shutdown", None);
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The VM ids in `GET /vms`, with their states and known pages.
fn table(s: &Server) -> Vec<(u64, String, u64)> {
    let v = s.ok(200, "GET", "/vms", None);
    v["vms"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|vm| {
            (
                vm["id"].as_u64().unwrap(),
                vm["state"].as_str().unwrap().to_string(),
                vm["known_pages"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_vm_is_created_run_forked_verified_in_a_clone_paused_and_destroyed() {
    if !kvm() {
        return;
    }
    let s = Server::start("life");
    let v = s.ok(200, "GET", "/version", None);
    assert_eq!(v["name"], "vmm");
    let id = s.create();
    let r = s.run(id, "fill:seed=1:pages=64,verify:seed=1:pages=64");
    assert_eq!(r["mismatches"], 0, "{r}");
    assert_eq!(r["verified"], true);

    let f = s.ok(
        201,
        "POST",
        &format!("/vms/{id}/fork"),
        Some(json!({"clones": 2})),
    );
    let clones: Vec<u64> = f["clones"]
        .as_array()
        .expect("clone ids")
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    assert_eq!(clones.len(), 2, "{f}");
    let c = clones[1];
    // The clone inherits its parent's model: verify checks what the parent wrote.
    let v = s.ok(200, "POST", &format!("/vms/{c}/verify"), None);
    assert_eq!(v["pages_verified"], 64, "{v}");
    assert_eq!(v["mismatches"], 0, "{v}");
    let r = s.run(c, "verify:seed=1:pages=64");
    assert_eq!(r["mismatches"], 0, "{r}");
    // A wrong seed finds mismatches: reported, and not a failure of the VM.
    let r = s.run(c, "verify:seed=2:pages=64");
    assert!(r["mismatches"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["verified"], false);
    let shown = s.ok(200, "GET", &format!("/vms/{c}"), None);
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["parent"], id, "{shown}");

    // A clone's writes stay its own.
    s.run(clones[0], "fill:seed=5:pages=16");
    let v = s.ok(200, "POST", &format!("/vms/{id}/verify"), None);
    assert_eq!(v["mismatches"], 0, "{v}");

    let p = s.ok(200, "POST", &format!("/vms/{id}/pause"), None);
    assert_eq!(p["state"], "paused");
    let e = s.refused(
        409,
        "POST",
        &format!("/vms/{id}/run"),
        Some(r#"{"workload":"fill"}"#),
    );
    assert!(e.contains("paused"), "{e}");
    s.refused(409, "POST", &format!("/vms/{id}/pause"), None);
    let list = s.ok(200, "GET", "/vms", None);
    let vms = list["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3, "{list}");
    for vm in vms {
        assert!(
            vm["memory_pages"]["resident"].as_u64().unwrap() >= 64,
            "{vm}"
        );
        for k in ["resident", "shared", "private", "pss"] {
            assert!(vm["memory_mib"][k].is_number(), "{vm}");
        }
        assert!(
            vm["counters"].is_object() && vm["faults"].is_object(),
            "{vm}"
        );
    }
    assert_eq!(vms[0]["state"], "paused");
    let p = s.ok(200, "POST", &format!("/vms/{id}/resume"), None);
    assert_eq!(p["state"], "running");
    s.refused(409, "POST", &format!("/vms/{id}/resume"), None);
    let r = s.run(id, "verify:seed=1:pages=64");
    assert_eq!(r["mismatches"], 0, "{r}");

    let d = s.ok(200, "DELETE", &format!("/vms/{c}"), None);
    assert_eq!(d["destroyed"], c);
    s.refused(404, "GET", &format!("/vms/{c}"), None);
    s.refused(404, "DELETE", &format!("/vms/{c}"), None);
    assert_eq!(table(&s).len(), 2);
}

#[test]
fn bad_requests_get_4xx_with_a_message_and_change_nothing() {
    if !kvm() {
        return;
    }
    let s = Server::start("bad");
    let id = s.create();
    s.run(id, "fill:seed=1:pages=8");
    let before = table(&s);
    let run = format!("/vms/{id}/run");
    let bad: &[(u16, &str, &str, Option<&str>, &str)] = &[
        (400, "POST", "/vms", Some("{bad"), "JSON"),
        (
            400,
            "POST",
            "/vms",
            Some(r#"{"memory": "32M"}"#),
            "unknown field",
        ),
        (
            400,
            "POST",
            "/vms",
            Some(r#"{"mem": "3M"}"#),
            "multiple of 2 MiB",
        ),
        (400, "POST", "/vms", Some(r#"{"mem": "12Q"}"#), "unit"),
        (400, "POST", "/vms", Some(r#"{"mem": "1T"}"#), "64 GiB"),
        (400, "POST", "/vms", Some(r#"{"mem": "512M"}"#), "--pool"),
        (400, "POST", "/vms", Some(r#"{"vcpus": 0}"#), "vcpus"),
        (400, "POST", "/vms", Some(r#"{"vcpus": -1}"#), "JSON"),
        (
            400,
            "POST",
            "/vms",
            Some(r#"{"allocator": "slab"}"#),
            "magazine",
        ),
        (
            400,
            "POST",
            &run,
            Some(r#"{"workload": "fil"}"#),
            "unknown operation",
        ),
        (
            400,
            "POST",
            &run,
            Some(r#"{"workload": "fill:pages=1G"}"#),
            "slice",
        ),
        (
            400,
            "POST",
            &run,
            Some(r#"{"workload": "fill", "timeout": 0}"#),
            "timeout",
        ),
        (400, "POST", &run, None, "JSON"),
        (
            404,
            "POST",
            "/vms/99/run",
            Some(r#"{"workload": "fill"}"#),
            "VM 99",
        ),
        (404, "GET", "/vms/abc", None, "no route"),
        (404, "GET", "/nothing", None, "no route"),
        (404, "POST", &format!("/vms/{id}/explode"), None, "no route"),
        (405, "DELETE", "/vms", None, "GET, POST or PUT"),
        (405, "GET", &run, None, "POST"),
        (
            400,
            "POST",
            &format!("/vms/{id}/fork"),
            Some(r#"{"clones": 0}"#),
            "clones",
        ),
        (
            400,
            "POST",
            &format!("/vms/{id}/pause"),
            Some(r#"{"now": 1}"#),
            "unknown field",
        ),
    ];
    for (status, method, target, body, needle) in bad {
        let e = s.refused(*status, method, target, *body);
        assert!(
            e.to_lowercase().contains(&needle.to_lowercase()),
            "{method} {target} {body:?}: {e:?} should mention {needle:?}"
        );
    }
    let huge = format!(r#"{{"workload": "{}"}}"#, "fill,".repeat(20_000));
    s.refused(413, "POST", &run, Some(&huge));
    assert_eq!(table(&s), before, "a refused request changed the VMs");
    let v = s.ok(200, "GET", "/version", None);
    assert_eq!(v["vms"], 1);
}

#[test]
fn a_failing_guest_fails_only_its_vm_while_other_vms_are_served_at_once() {
    if !kvm() {
        return;
    }
    let s = Server::start("fail");
    let (a, b) = (s.create(), s.create());
    s.run(b, "fill:seed=3:pages=32");
    // About 20 s of guest work, stopped by its 6 s timeout.
    let sock = s.sock.clone();
    let slow = std::thread::spawn(move || {
        let body = json!({"workload": "random:count=1073741824", "timeout": 6}).to_string();
        http(&sock, "POST", &format!("/vms/{a}/run"), Some(&body))
    });
    let until = Instant::now() + Duration::from_secs(30);
    while s.ok(200, "GET", &format!("/vms/{a}"), None)["busy"] != "run" {
        assert!(Instant::now() < until, "the run never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    // VM b is served while VM a's run is in flight (a's lock is its own).
    let r = s.run(b, "verify:seed=3:pages=32");
    assert_eq!(r["mismatches"], 0, "{r}");
    let shown = s.ok(200, "GET", &format!("/vms/{a}"), None);
    assert_eq!(
        shown["busy"], "run",
        "VM a's run finished before VM b was served"
    );
    // Destroying a VM whose run is in flight is refused after a short wait (nothing
    // queues behind it: GET is still answered), and changes nothing.
    let (status, v) = http(&s.sock, "DELETE", &format!("/vms/{a}"), None);
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("busy"), "{v}");
    let shown = s.ok(200, "GET", &format!("/vms/{a}"), None);
    assert_eq!(shown["busy"], "run", "{shown}");

    let (status, v) = slow.join().expect("the slow request");
    assert_eq!(status, 504, "{v}");
    assert!(v["error"].as_str().unwrap().contains("timeout"), "{v}");
    let shown = s.ok(200, "GET", &format!("/vms/{a}"), None);
    assert_eq!(shown["state"], "failed", "{shown}");
    assert!(
        shown["error"].as_str().unwrap().contains("timeout"),
        "{shown}"
    );
    let e = s.refused(
        409,
        "POST",
        &format!("/vms/{a}/run"),
        Some(r#"{"workload":"fill"}"#),
    );
    assert!(e.contains("failed"), "{e}");
    s.refused(409, "POST", &format!("/vms/{a}/fork"), None);
    // The server and the other VM go on; the failed VM can still be destroyed.
    let r = s.run(b, "verify:seed=3:pages=32");
    assert_eq!(r["mismatches"], 0, "{r}");
    s.ok(200, "DELETE", &format!("/vms/{a}"), None);
    assert_eq!(table(&s), vec![(b, "running".to_string(), 32)]);
}

#[test]
fn a_crashing_guest_gets_a_500_and_fails_only_its_vm() {
    if !kvm() {
        return;
    }
    let s = Server::start("crash");
    let (a, b) = (s.create(), s.create());
    s.run(b, "fill:seed=4:pages=8");
    let (status, v) = http(
        &s.sock,
        "POST",
        &format!("/vms/{a}/run"),
        Some(r#"{"workload":"fill:pages=4,crash"}"#),
    );
    assert_eq!(status, 500, "{v}");
    assert!(v["error"].as_str().unwrap().contains("crashed"), "{v}");
    let shown = s.ok(200, "GET", &format!("/vms/{a}"), None);
    assert_eq!(shown["state"], "failed", "{shown}");
    let r = s.run(b, "verify:seed=4:pages=8");
    assert_eq!(r["mismatches"], 0, "{r}");
    s.ok(200, "DELETE", &format!("/vms/{a}"), None);
    assert_eq!(table(&s), vec![(b, "running".to_string(), 8)]);
}

#[test]
fn the_socket_is_mode_0600_and_sigterm_removes_it_and_exits_0() {
    if !kvm() {
        return;
    }
    let mut s = Server::start("mode");
    let mode = std::fs::metadata(&s.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    s.create();
    // SAFETY: kill only sends a signal to the server this test started (its pid).
    let r = unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(r, 0);
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < until, "vmm serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", s.log());
    assert!(!s.sock.exists(), "the socket outlived the server");
}

#[test]
fn an_existing_file_is_never_replaced() {
    // Refused before /dev/kvm is opened: no KVM needed.
    let d = tmpdir("file");
    let f = d.join("sock");
    std::fs::write(&f, b"precious").unwrap();
    let out = vmm(&["serve", "--api", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&f).unwrap(), b"precious");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    if !kvm() {
        return;
    }
    let d = tmpdir("stale");
    let sock = d.join("sock");
    // A socket nobody listens on any more, as a crashed server leaves it.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let s = Server::start_at(d.clone(), sock.clone());
    s.ok(200, "GET", "/", None);
    let out = vmm(&["serve", "--api", sock.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("in use"), "{err}");
    // The first server still serves.
    s.ok(200, "GET", "/version", None);
}

#[test]
fn ctl_prints_the_reply_and_exits_0_1_or_2() {
    if !kvm() {
        return;
    }
    let s = Server::start("ctl");
    let out = s.ctl(&["create", "--mem", "32M"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let id = v["id"].as_u64().unwrap().to_string();
    let out = s.ctl(&["run", &id, "fill:seed=1:pages=16,verify:seed=1:pages=16"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = s.ctl(&["fork", &id, "--clones", "1"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // A verify that finds mismatches exits 1, the reply still printed.
    let out = s.ctl(&["run", &id, "verify:seed=9:pages=16"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"mismatches\""));
    // A refused request exits 1 with the server's message on stderr.
    let out = s.ctl(&["show", "99"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("VM 99"),
        "{out:?}"
    );
    let out = s.ctl(&["list"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // No server: exit 2, saying how to start one.
    let out = vmm(&["ctl", "--api", "/nonexistent/vmm.sock", "list"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("vmm serve --api"));
}

#[test]
fn a_vms_memory_moves_to_another_node_while_its_guest_runs() {
    if !kvm() {
        return;
    }
    let s = Server::start_with("migrate", &["--nodes", "2"]);
    let id = s.create();
    s.run(id, "fill:seed=1");
    // The guest rewrites and verifies its memory while a second request moves it.
    let sock = s.sock.clone();
    let runner = std::thread::spawn(move || {
        http(
            &sock,
            "POST",
            &format!("/vms/{id}/run"),
            Some(
                &json!({"workload": "fill:seed=2,verify:seed=2,fill:seed=3,verify:seed=3"})
                    .to_string(),
            ),
        )
    });
    let m = s.ok(
        200,
        "POST",
        &format!("/vms/{id}/migrate"),
        Some(json!({"node": 1})),
    );
    assert!(m["stats"]["pages"].as_u64() > Some(7000), "{m}");
    assert_eq!(m["stats"]["failed"], 0, "{m}");
    let (st, r) = runner.join().expect("the run request");
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["mismatches"], 0, "{r}");
    let v = s.ok(200, "POST", &format!("/vms/{id}/verify"), None);
    assert_eq!(v["mismatches"], 0, "{v}");
    // A range, and a node the pool does not have.
    let back = s.ok(
        200,
        "POST",
        &format!("/vms/{id}/migrate"),
        Some(json!({"node": 0, "start": 256, "pages": 512, "walk": "unlocked"})),
    );
    assert_eq!(back["stats"]["pages"], 512, "{back}");
    let (st, e) = s.call(
        "POST",
        &format!("/vms/{id}/migrate"),
        Some(json!({"node": 2})),
    );
    assert_eq!(st, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("--nodes 3"), "{e}");
    let (st, e) = s.call(
        "POST",
        &format!("/vms/{id}/migrate"),
        Some(json!({"node": 0, "walk": "sideways"})),
    );
    assert_eq!(st, 400, "{e}");
}

#[test]
fn a_vm_with_vcpus_on_two_nodes_places_each_vcpus_slice_on_its_node() {
    if !kvm() {
        return;
    }
    let s = Server::start_with("vcpu-nodes", &["--nodes", "2"]);
    let vm = s.ok(
        201,
        "POST",
        "/vms",
        Some(json!({"mem": "64M", "vcpus": 2, "vcpu_nodes": [0, 1]})),
    );
    let id = vm["id"].as_u64().expect("an id");
    assert_eq!(vm["vcpu_nodes"], json!([0, 1]), "{vm}");
    s.run(id, "fill:seed=1");
    let v = s.ok(200, "GET", &format!("/vms/{id}"), None);
    let per = &v["pages_per_node"];
    assert!(
        per[0].as_u64() > Some(7000) && per[1].as_u64() > Some(7000),
        "each vCPU's slice on its node: {v}"
    );
    let (st, e) = s.call(
        "POST",
        "/vms",
        Some(json!({"mem": "64M", "vcpus": 2, "vcpu_nodes": [0, 3]})),
    );
    assert_eq!(st, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("--nodes 4"), "{e}");
}
