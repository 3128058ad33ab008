//! A real, widely used service that runs on jemalloc: Debian's redis-server (linked with
//! libjemalloc2), under a loopback load from redis-benchmark, traced with no flag beyond `-p`.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::{Leaktrace, Service, have_commands, installed, require_root};

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The server's own accounting: `used_memory` of `INFO memory` (the usable size of every
/// block it holds, as jemalloc rounds it).
fn used_memory(port: u16) -> u64 {
    redis_cli(port, &["info", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .expect("INFO memory has used_memory")
        .trim()
        .parse()
        .unwrap()
}

fn benchmark(port: u16, requests: u32) {
    let status = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "set"])
        .args([
            "-n",
            &requests.to_string(),
            "-r",
            "100000000",
            "-d",
            "100",
            "-P",
            "16",
            "-q",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("redis-benchmark runs");
    assert!(status.success());
}

fn have_redis() -> bool {
    let tools = ["redis-server", "redis-cli", "redis-benchmark"];
    installed("redis (redis-server, redis-tools)", have_commands(&tools))
}

#[test]
fn redis_on_jemalloc_agrees_with_its_own_memory_accounting() {
    if !require_root() || !have_redis() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Service(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_cli(port, &["ping"]).trim() != "PONG" {
        assert!(Instant::now() < deadline, "redis-server never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Warm up (client buffers, lazily created structures), then start from an empty keyspace.
    benchmark(port, 2000);
    redis_cli(port, &["flushall"]);

    // Debian's redis-server is a link to another name of the same executable.
    let exe = std::fs::read_link(format!("/proc/{}/exe", server.0.id())).unwrap();
    // The BPF counters on stderr: a lost event says which of them lost it.
    let trace = Leaktrace::attach(server.0.id(), &["--top", "5", "--print-bpf-stats"]);
    let before = used_memory(port);
    let requests = 20_000;
    benchmark(port, requests);
    let after = used_memory(port);
    let keys: u64 = redis_cli(port, &["dbsize"]).trim().parse().unwrap();
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let report = outcome.last();
    assert_eq!(report["allocator"], "jemalloc");
    assert!(
        report["allocator_module"]
            .as_str()
            .unwrap()
            .contains("libjemalloc.so.2"),
        "{}",
        report["allocator_module"]
    );
    assert_eq!(report["totals"]["lost_events"], 0, "{:?}", outcome.stderr);

    // redis counts each block at its usable size (jemalloc's size class, up to 25% above the
    // request for the small classes it uses here); leaktrace counts the bytes requested. So
    // the requested bytes lie between 75% and 100% of redis's own growth (plus a little for
    // the blocks redis freed that were allocated before attach, which lower its count only).
    let outstanding = report["totals"]["outstanding_bytes"].as_u64().unwrap();
    let grown = after - before;
    let ratio = outstanding as f64 / grown as f64;
    eprintln!(
        "redis: {keys} keys; used_memory grew by {grown} B; leaktrace: {outstanding} B outstanding (ratio {ratio:.3})"
    );
    assert!(keys > u64::from(requests) * 9 / 10, "{keys} keys");
    assert!(
        (0.75..=1.02).contains(&ratio),
        "ratio {ratio:.3}: {grown} vs {outstanding}"
    );

    // The top stacks name the service's own functions (its allocation wrappers: zmalloc,
    // zmalloc_usable, ...), in the service's own executable.
    let stacks: Vec<&Value> = report["stacks"].as_array().unwrap().iter().collect();
    let top = stacks[0]["frames"][0].clone();
    assert_eq!(top["module"], exe.to_str().unwrap(), "{top}");
    let symbol = top["symbol"].as_str().unwrap_or_default();
    assert!(symbol.starts_with('z') && symbol.contains("alloc"), "{top}");
    assert!(
        stacks[0]["outstanding_bytes"].as_u64().unwrap() > outstanding / 2,
        "the keyspace's stack holds most of the memory"
    );
}
