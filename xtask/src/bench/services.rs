//! Real services under load, untraced and traced side by side: Debian's redis-server (jemalloc)
//! under redis-benchmark, and the bench's C echo server on glibc, built with and without frame
//! pointers (distribution packages are built without). Each round runs every configuration once,
//! on a fresh service, in a rotating order; the table shows medians over rounds and, per round,
//! throughput relative to the untraced run of that round.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    Args, CONNECTIONS, Config, FLOOR, FLOOR_ENTRIES, Fixture, LEAKTRACE, SAMPLED, UNTRACED,
    bench_dir, load, rotated,
    stats::Summary,
    tracer::{self, Tracing},
};
use crate::{Child, step};

pub const CONFIGS: [Config; 5] = [UNTRACED, FLOOR, FLOOR_ENTRIES, LEAKTRACE, SAMPLED];

/// What one run of a configuration measured: per test (SET, GET; or the one echo test)
/// throughput and p99 latency, and for a traced run what leaktrace said.
#[derive(Clone, Debug, Default)]
struct Run {
    /// test -> (requests/s, p99 latency in us)
    tests: BTreeMap<&'static str, (f64, f64)>,
    detach_s: Option<f64>,
    lost_events: u64,
    events: u64,
    /// leaktrace's own CPU seconds per second of load (intake, heap model; from the end of
    /// its attach to SIGINT).
    leaktrace_cpu: Option<f64>,
    /// leaktrace's CPU seconds to load and attach.
    attach_cpu_s: Option<f64>,
    /// The service's own CPU time per request, in us: the probes run in its threads, so this
    /// is what tracing costs it, less sensitive than throughput to the other load of a shared
    /// machine.
    service_cpu_us: f64,
}

/// A service's results over rounds.
pub struct Service {
    title: String,
    tests: Vec<&'static str>,
    rounds: Vec<BTreeMap<&'static str, Run>>,
    /// Per test, the allocator's calls per request, per function (redis).
    calls: Vec<(&'static str, BTreeMap<String, f64>)>,
}

/// Runs `load` against a fresh service (`start`) under each configuration, in `args.rounds`
/// interleaved rounds.
fn measure(
    args: &Args,
    title: String,
    tests: Vec<&'static str>,
    mut start: impl FnMut() -> anyhow::Result<(Box<dyn std::any::Any>, u32, u16)>,
    mut load: impl FnMut(&Config, u16, usize) -> anyhow::Result<Served>,
) -> anyhow::Result<Service> {
    let mut service = Service {
        title,
        tests,
        rounds: Vec::new(),
        calls: Vec::new(),
    };
    for round in 0..args.rounds {
        let mut results = BTreeMap::new();
        for config in rotated(&CONFIGS, round) {
            step(&format!(
                "{} round {}/{}: {}",
                service.title,
                round + 1,
                args.rounds,
                config.name
            ));
            let (child, pid, port) = start()?;
            let tracing = Tracing::start(config.tracer, pid, &bench_dir())?;
            let loaded = Instant::now();
            let cpu_before = tracer::cpu_seconds(pid);
            let (tests, requests) = load(&config, port, round)?;
            let service_cpu_s = tracer::cpu_seconds(pid) - cpu_before;
            let load_s = loaded.elapsed().as_secs_f64();
            let mut run = Run {
                tests,
                service_cpu_us: service_cpu_s * 1e6 / requests.max(1) as f64,
                ..Run::default()
            };
            if let Some(outcome) = tracing.stop()? {
                run.detach_s = Some(outcome.detach_s);
                run.lost_events = outcome.lost_events;
                run.events = outcome.allocations + outcome.frees;
                run.leaktrace_cpu = Some(outcome.cpu_s / load_s);
                run.attach_cpu_s = Some(outcome.attach_cpu_s);
            }
            drop(child);
            results.insert(config.name, run);
        }
        service.rounds.push(results);
    }
    Ok(service)
}

/// What a load did: per test (requests/s, p99 us), and the requests served in all.
type Served = (BTreeMap<&'static str, (f64, f64)>, u64);

/// A port on 127.0.0.1 that was free an instant ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until something listens on `port`.
fn wait_listening(port: u16, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        if let Some(status) = child.0.try_wait()? {
            bail!("the service exited before it listened ({status})");
        }
        if Instant::now() > deadline {
            bail!("nothing listened on port {port} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Clients of redis-benchmark, and the size of its values: the measurement.
const REDIS_CLIENTS: u32 = 20;
const REDIS_VALUE_BYTES: u32 = 100;

/// Debian's redis-server under redis-benchmark: SET and GET, 20 clients, 100-byte values, on
/// 127.0.0.1, no persistence.
pub fn redis(args: &Args) -> anyhow::Result<Service> {
    let start = || -> anyhow::Result<(Box<dyn std::any::Any>, u32, u16)> {
        let port = free_port()?;
        let mut child = Child(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting redis-server (run `cargo xtask setup`)")?,
        );
        wait_listening(port, &mut child)?;
        let pid = child.0.id();
        Ok((Box::new(child), pid, port))
    };
    // Requests per test, per configuration: sized in the first round so that each test runs
    // about --server-seconds (a traced redis does a few thousand requests/s, an untraced one
    // over a hundred thousand).
    let mut requests: BTreeMap<&'static str, u64> = BTreeMap::new();
    let load = |config: &Config, port: u16, _round: usize| {
        // The sizing run's requests count too: the service's CPU time covers them.
        let mut served = 0;
        let n = match requests.get(config.name) {
            Some(&n) => n,
            None => {
                let probe = redis_benchmark(port, 2000)?;
                served += 2 * 2000;
                let slowest = probe.values().map(|&(rps, _)| rps).fold(f64::MAX, f64::min);
                let n = ((slowest * args.server_seconds) as u64).clamp(2000, 5_000_000);
                requests.insert(config.name, n);
                n
            }
        };
        Ok((redis_benchmark(port, n)?, served + 2 * n))
    };
    let mut service = measure(
        args,
        format!(
            "redis-server (Debian, jemalloc) under redis-benchmark: {REDIS_CLIENTS} clients, {REDIS_VALUE_BYTES}-byte values, 127.0.0.1"
        ),
        vec!["SET", "GET"],
        &start,
        load,
    )?;
    for test in ["SET", "GET"] {
        step(&format!(
            "redis: allocator calls per {test} request (bpftrace)"
        ));
        let (_child, pid, port) = start()?;
        let counting = tracer::count_calls(pid, "libjemalloc.so", JEMALLOC_API, &bench_dir())?;
        redis_benchmark_one(port, REDIS_COUNTED_REQUESTS, test)?;
        let per_request = counting
            .counts()?
            .into_iter()
            .map(|(function, calls)| (function, calls as f64 / REDIS_COUNTED_REQUESTS as f64))
            .collect();
        service.calls.push((test, per_request));
    }
    Ok(service)
}

/// jemalloc's allocation functions that leaktrace probes, whose calls per request the redis
/// part counts: what each request costs in traps.
const JEMALLOC_API: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "free",
    "mallocx",
    "rallocx",
    "sdallocx",
    "dallocx",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
];

/// Requests of one test while the calls are counted: enough that the 20 clients' connections
/// (a few allocations each) weigh nothing.
const REDIS_COUNTED_REQUESTS: u64 = 20_000;

/// redis-benchmark running `test` alone.
fn redis_benchmark_one(port: u16, requests: u64, test: &str) -> anyhow::Result<()> {
    let status = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-c",
            &REDIS_CLIENTS.to_string(),
            "-d",
            &REDIS_VALUE_BYTES.to_string(),
        ])
        .args(["-n", &requests.to_string(), "-t", test, "-q"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("running redis-benchmark (run `cargo xtask setup`)")?;
    if !status.success() {
        bail!("redis-benchmark -t {test} failed ({status})");
    }
    Ok(())
}

/// One run of redis-benchmark: test -> (requests/s, p99 us).
fn redis_benchmark(port: u16, requests: u64) -> anyhow::Result<BTreeMap<&'static str, (f64, f64)>> {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-c",
            &REDIS_CLIENTS.to_string(),
            "-d",
            &REDIS_VALUE_BYTES.to_string(),
        ])
        .args(["-n", &requests.to_string(), "-t", "set,get", "--csv"])
        .stdin(Stdio::null())
        .output()
        .context("running redis-benchmark (run `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_redis_csv(&String::from_utf8_lossy(&out.stdout))
}

/// redis-benchmark's `--csv`: a header naming the columns, then a line per test.
fn parse_redis_csv(text: &str) -> anyhow::Result<BTreeMap<&'static str, (f64, f64)>> {
    let unquote = |field: &str| field.trim().trim_matches('"').to_owned();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .context("redis-benchmark printed nothing")?
        .split(',')
        .map(unquote)
        .collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no {name} column in redis-benchmark's output"))
    };
    let (rps, p99) = (column("rps")?, column("p99_latency_ms")?);
    let mut tests = BTreeMap::new();
    for line in lines {
        let fields: Vec<String> = line.split(',').map(unquote).collect();
        let test = match fields.first().map(String::as_str) {
            Some("SET") => "SET",
            Some("GET") => "GET",
            _ => continue,
        };
        let value = |i: usize| -> anyhow::Result<f64> {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .with_context(|| format!("unexpected redis-benchmark line `{line}`"))
        };
        tests.insert(test, (value(rps)?, value(p99)? * 1000.0));
    }
    if tests.len() != 2 {
        bail!("redis-benchmark did not report both SET and GET: {text}");
    }
    Ok(tests)
}

/// The bench's echo server (tests/fixtures/echo_server.c, glibc), under the closed-loop load
/// generator; `binary` was built with or without frame pointers, as `build` says.
pub fn echo(args: &Args, binary: &Path, build: &str) -> anyhow::Result<Service> {
    // The server runs until its stdin closes: the fixture is the handle that stops it.
    let start = || -> anyhow::Result<(Box<dyn std::any::Any>, u32, u16)> {
        let fixture = Fixture::start(binary)?;
        let line = fixture.line(Duration::from_secs(10))?;
        let port: u16 = line
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("the server said `{line}`, not its port"))?;
        let pid = fixture.pid();
        Ok((Box::new(fixture), pid, port))
    };
    let load = |_: &Config, port: u16, _round: usize| {
        let result = load::run(
            port,
            CONNECTIONS,
            Duration::from_secs_f64(args.server_seconds),
        )?;
        Ok((
            BTreeMap::from([("echo", (result.requests_per_s, result.p99_us))]),
            result.requests,
        ))
    };
    measure(
        args,
        format!(
            "echo server (tests/fixtures/echo_server.c, glibc, {build}; 6 allocations per request): {CONNECTIONS} connections on 127.0.0.1, closed loop"
        ),
        vec!["echo"],
        start,
        load,
    )
}

impl Service {
    fn summary(&self, f: impl Fn(&BTreeMap<&'static str, Run>) -> Option<f64>) -> Summary {
        Summary::of(self.rounds.iter().filter_map(f))
    }

    pub fn print(&self) {
        println!();
        println!(
            "{}; median [min..max] over {} rounds:",
            self.title,
            self.rounds.len()
        );
        print!("{:<12}", "config");
        for test in &self.tests {
            print!(
                " {:>24} {:>20}",
                format!("{test} requests/s"),
                format!("{test} p99 us")
            );
        }
        for test in &self.tests {
            print!(" {:>18}", format!("{test} vs untraced"));
        }
        println!(
            " {:>20} {:>22} {:>22}",
            "detach s", "service CPU us/req", "added us/req"
        );
        for config in CONFIGS {
            print!("{:<12}", config.name);
            for &test in &self.tests {
                let rps = self.summary(|r| Some(r.get(config.name)?.tests.get(test)?.0));
                let p99 = self.summary(|r| Some(r.get(config.name)?.tests.get(test)?.1));
                print!(" {:>24} {:>20}", rps.show(0), p99.show(0));
            }
            for &test in &self.tests {
                let relative = self.summary(|r| {
                    Some(
                        r.get(config.name)?.tests.get(test)?.0
                            / r.get(UNTRACED.name)?.tests.get(test)?.0,
                    )
                });
                print!(" {:>18}", relative.show(2));
            }
            let detach = self.summary(|r| r.get(config.name)?.detach_s);
            print!(" {:>20}", detach.show(2));
            let cpu = self.summary(|r| Some(r.get(config.name)?.service_cpu_us));
            let added = self.summary(|r| {
                Some(r.get(config.name)?.service_cpu_us - r.get(UNTRACED.name)?.service_cpu_us)
            });
            println!(" {:>22} {:>22}", cpu.show(2), added.show(2));
        }
        for config in CONFIGS.iter().filter(|c| c.name != UNTRACED.name) {
            let detach: Vec<String> = self
                .rounds
                .iter()
                .filter_map(|r| r.get(config.name)?.detach_s)
                .map(|s| format!("{s:.2}"))
                .collect();
            let lost: u64 = self
                .rounds
                .iter()
                .filter_map(|r| Some(r.get(config.name)?.lost_events))
                .sum();
            let events: u64 = self
                .rounds
                .iter()
                .filter_map(|r| Some(r.get(config.name)?.events))
                .sum();
            let cpu = self.summary(|r| r.get(config.name)?.leaktrace_cpu);
            let attach_cpu = self.summary(|r| r.get(config.name)?.attach_cpu_s);
            println!(
                "  {:<11} detach per round (SIGINT to exit, final report included): {} s; lost {lost} of {events} events; leaktrace's own CPU {} s per s of load, {} s to attach",
                config.name,
                detach.join(" "),
                cpu.show(2),
                attach_cpu.show(2)
            );
        }
        for (test, calls) in &self.calls {
            let total: f64 = calls.values().sum();
            let each: Vec<String> = calls
                .iter()
                .filter(|&(_, &n)| n > 0.0)
                .map(|(function, n)| format!("{function} {n:.2}"))
                .collect();
            println!(
                "  allocator calls per {test} request ({REDIS_COUNTED_REQUESTS} requests, bpftrace): {total:.2}: {}",
                each.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_benchmark_csv() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"SET\",\"129870.13\",\"0.085\",\"0.024\",\"0.079\",\"0.135\",\"0.207\",\"1.071\"\n\
                   \"GET\",\"131578.95\",\"0.082\",\"0.024\",\"0.079\",\"0.127\",\"0.191\",\"0.423\"\n";
        let tests = parse_redis_csv(csv).unwrap();
        assert_eq!(tests["SET"], (129870.13, 207.0));
        assert_eq!(tests["GET"], (131578.95, 191.0));
        assert!(parse_redis_csv("").is_err());
        assert!(parse_redis_csv("\"test\",\"rps\"\n\"SET\",\"1\"\n").is_err());
        assert!(parse_redis_csv(&csv.replace("129870.13", "fast")).is_err());
    }
}
