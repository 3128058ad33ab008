//! `--metrics ADDR`: the reports' numbers at GET /metrics, scraped from leaktrace tracing
//! fixtures with known ground truth.

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    os::fd::{FromRawFd as _, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    http::{self, Response, Sample},
    support::{
        Fixture, Leaktrace, compile, have_commands, installed, malloc_bytes_in, require_root,
        run_leaktrace,
    },
};

/// The value of the one series of `name` whose labels include `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = series(samples, name, labels).map(|s| s.2).collect();
    assert!(found.len() <= 1, "{name} {labels:?}: {found:?}");
    found.first().copied()
}

pub fn series<'a>(
    samples: &'a [Sample],
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a Sample> {
    samples.iter().filter(move |(n, l, _)| {
        n == name
            && labels
                .iter()
                .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
    })
}

pub fn label<'a>(sample: &'a Sample, name: &str) -> &'a str {
    sample
        .1
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// Scrapes until `done` holds for the samples (30 s at most); returns that scrape.
pub fn scrape_until(address: &str, done: impl Fn(&[Sample]) -> bool) -> (Response, Vec<Sample>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = http::get(address, "/metrics", None).expect("leaktrace answers");
        assert_eq!(response.status, 200, "{}", response.body);
        let samples = http::samples(&response.body);
        if done(&samples) {
            return (response, samples);
        }
        assert!(
            Instant::now() < deadline,
            "never got there; last scrape:\n{}",
            response.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// promtool comes with Debian's prometheus package, which `cargo xtask setup` installs.
pub fn have_promtool() -> bool {
    installed(
        "promtool (Debian's prometheus)",
        have_commands(&["promtool"]),
    )
}

/// The JSON report that a scrape's numbers came from (same timestamp).
fn report_of<'a>(reports: &'a [Value], samples: &[Sample]) -> &'a Value {
    let seconds = value(samples, "leaktrace_report_timestamp_seconds", &[]).unwrap();
    let ms = (seconds * 1000.0).round() as u64;
    reports
        .iter()
        .find(|r| r["timestamp_ms"] == ms)
        .unwrap_or_else(|| panic!("no JSON report at {ms} ms"))
}

/// Traces one round of `leaky` (100 leaks of 4096 bytes, 1000 blocks freed at once) with
/// `--metrics` and scrapes a report made after it.
fn scrape_a_round_of_leaky(binary: &crate::support::Binary) -> (Vec<Sample>, Response, Vec<Value>) {
    let mut fixture = Fixture::start(binary, &["100", "4096", "1000"]);
    let trace = Leaktrace::attach(fixture.pid(), &["--metrics", "127.0.0.1:0"]);
    let address = trace.metrics_address();
    fixture.round();
    let (text, samples) = scrape_until(&address, |s| {
        value(s, "leaktrace_allocations_total", &[]) == Some(1100.0)
    });
    let openmetrics = http::get(
        &address,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .unwrap();
    let pid = fixture.pid().to_string();
    let process = [("pid", pid.as_str()), ("comm", "leaky")];
    for (name, want) in [
        ("leaktrace_outstanding_bytes", 409_600.0),
        ("leaktrace_outstanding_allocations", 100.0),
        ("leaktrace_frees_total", 1000.0),
        ("leaktrace_lost_events_total", 0.0),
        ("leaktrace_unmatched_frees_total", 0.0),
        ("leaktrace_trace_complete", 1.0),
        ("leaktrace_sampling_enabled", 0.0),
        ("leaktrace_stacks", 1.0),
    ] {
        assert_eq!(
            value(&samples, name, &process),
            Some(want),
            "{name}\n{}",
            text.body
        );
    }
    assert!(value(&samples, "leaktrace_rss_bytes", &process).unwrap() > 0.0);
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    fixture.finish();
    (samples, openmetrics, outcome.reports)
}

/// The outstanding bytes of the stack whose function is `leak_site`.
fn leak_site_series(samples: &[Sample]) -> &Sample {
    const LEAK_SITE: [(&str, &str); 1] = [("function", "leak_site")];
    series(samples, "leaktrace_stack_outstanding_bytes", &LEAK_SITE)
        .next()
        .expect("the leak's series")
}

#[test]
fn metrics_are_the_json_report_s_numbers_in_both_formats_and_the_stack_id_survives_a_restart() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let (samples, openmetrics, reports) = scrape_a_round_of_leaky(&binary);
    let leak = leak_site_series(&samples);
    assert_eq!(leak.2, 409_600.0);
    let stack_id = label(leak, "stack_id").to_owned();
    assert!(
        stack_id.len() == 16 && stack_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{stack_id}"
    );
    let this_stack = [("stack_id", stack_id.as_str())];
    assert_eq!(
        value(
            &samples,
            "leaktrace_stack_outstanding_allocations",
            &this_stack
        ),
        Some(100.0)
    );

    // The same numbers as the JSON report made at the same instant, to the last digit.
    let report = report_of(&reports, &samples);
    let json_leak = &report["stacks"][0];
    assert_eq!(json_leak["frames"][0]["symbol"], "leak_site");
    for (name, field) in [
        ("leaktrace_stack_outstanding_bytes", "outstanding_bytes"),
        (
            "leaktrace_stack_outstanding_allocations",
            "outstanding_allocations",
        ),
        (
            "leaktrace_stack_growth_bytes_per_second",
            "growth_bytes_per_s",
        ),
        ("leaktrace_stack_oldest_age_seconds", "oldest_age_s"),
    ] {
        assert_eq!(
            value(&samples, name, &this_stack),
            json_leak[field].as_f64(),
            "{name}"
        );
    }
    let kind = label(leak, "kind");
    assert_eq!(json_leak["kind"], kind);
    for (name, field) in [
        ("leaktrace_outstanding_bytes", "outstanding_bytes"),
        ("leaktrace_allocations_total", "allocations"),
        ("leaktrace_frees_total", "frees"),
    ] {
        assert_eq!(value(&samples, name, &[]), report["totals"][field].as_f64());
    }

    // OpenMetrics when asked for, with the same series.
    assert_eq!(
        openmetrics.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(openmetrics.body.ends_with("# EOF\n"));
    assert!(
        openmetrics
            .body
            .contains("# UNIT leaktrace_stack_outstanding_bytes bytes\n")
    );
    let om = http::samples(&openmetrics.body.replace("# EOF\n", ""));
    assert_eq!(
        value(&om, "leaktrace_stack_outstanding_bytes", &this_stack),
        Some(409_600.0)
    );

    // Another run of the same program (another process, loaded elsewhere): the same id.
    let (again, _, _) = scrape_a_round_of_leaky(&binary);
    let leak_again = leak_site_series(&again);
    assert_eq!(label(leak_again, "stack_id"), stack_id);
    assert_ne!(label(leak_again, "pid"), label(leak, "pid"));
}

#[test]
fn the_text_format_passes_promtool_and_only_the_top_n_stacks_are_exported() {
    if !require_root() || !have_promtool() {
        return;
    }
    let binary = compile("patterns", &[]);
    let mut fixture = Fixture::start(&binary, &["1024"]);
    let trace = Leaktrace::attach(
        fixture.pid(),
        &[
            "--interval",
            "0.25",
            "--metrics",
            "127.0.0.1:0",
            "--metrics-top",
            "1",
        ],
    );
    let address = trace.metrics_address();
    fixture.send("go");
    // The leak, the cache and (for its first 100 ms) the burst hold memory: one is exported.
    let (text, samples) = scrape_until(&address, |s| {
        value(s, "leaktrace_stacks", &[]).is_some_and(|n| n >= 2.0)
    });
    let stacks: Vec<&Sample> = series(&samples, "leaktrace_stack_outstanding_bytes", &[]).collect();
    assert_eq!(stacks.len(), 1, "{}", text.body);
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.body.as_bytes())
        .unwrap();
    let lint = lint.wait_with_output().unwrap();
    assert!(
        lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
        "promtool check metrics: {}{}\n{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr),
        text.body
    );
    fixture.send("quiet");
    fixture.expect_line("quiet");
    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    // The exported stack is the top of the JSON report made at the same instant.
    let report = report_of(&outcome.reports, &samples);
    assert_eq!(
        Some(report["stacks"][0]["outstanding_bytes"].as_f64().unwrap()),
        Some(stacks[0].2)
    );
    assert_eq!(
        report["stacks"][0]["frames"][0]["symbol"].as_str(),
        Some(label(stacks[0], "function"))
    );
}

#[test]
fn bad_metrics_addresses_get_one_line_and_nothing_is_attached() {
    if !require_root() {
        return;
    }
    let binary = compile("leaky", &[]);
    let fixture = Fixture::start(&binary, &["1", "1", "1"]);
    let pid = fixture.pid().to_string();
    let before = malloc_bytes_in(fixture.pid());

    let malformed = run_leaktrace(&["-p", &pid, "--metrics", "9464"]);
    // Argument errors are one line with status 1, as every error (issue 17).
    assert_eq!(malformed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&malformed.stderr);
    assert_eq!(
        stderr,
        "leaktrace: error: invalid value '9464' for '--metrics <ADDR>': `9464` is not an address to listen on: give IP:PORT (127.0.0.1:9464, [::1]:9464) or :PORT for every interface (:9464) (see `leaktrace --help`)\n"
    );

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let in_use = run_leaktrace(&["-p", &pid, "--metrics", &address]);
    assert_eq!(in_use.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&in_use.stderr),
        format!(
            "leaktrace: error: --metrics {address}: cannot listen there (Address already in use (os error 98)): another process listens there: pick another port\n"
        )
    );
    // An address this host does not have (TEST-NET-1, RFC 5737).
    let foreign = run_leaktrace(&["-p", &pid, "--metrics", "192.0.2.1:9464"]);
    assert_eq!(foreign.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&foreign.stderr),
        "leaktrace: error: --metrics 192.0.2.1:9464: cannot listen there (Cannot assign requested address (os error 99)): no interface of this host has that address: give one it has, or :PORT\n"
    );
    let orphan = run_leaktrace(&["-p", &pid, "--metrics-top", "5"]);
    assert_eq!(orphan.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&orphan.stderr),
        "leaktrace: error: --metrics-top needs --metrics ADDR: it bounds the stacks exported there\n"
    );
    // None of them touched the target.
    assert_eq!(malloc_bytes_in(fixture.pid()), before);
}

/// A TCP connection to `address` with a receive buffer as small as the kernel allows, so that
/// a peer writing to it blocks as soon as a few KiB wait unread.
fn tiny_receiver(address: &str) -> TcpStream {
    let addr: std::net::SocketAddrV4 = address.parse().unwrap();
    // SAFETY: a new socket, then setsockopt and connect on it with valid pointers and sizes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let owned = OwnedFd::from_raw_fd(fd);
        let size: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let connected = libc::connect(
            fd,
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(connected, 0, "{}", std::io::Error::last_os_error());
        TcpStream::from(owned)
    }
}

#[test]
fn stuck_scrapers_never_stall_event_intake() {
    if !require_root() {
        return;
    }
    // 200,000 blocks allocated and freed in a round: 400,000 events, more than the default
    // 32 MiB ring buffer holds, so an event loop stalled for the round would lose events.
    let binary = compile("leaky", &[]);
    let mut fixture = Fixture::start(&binary, &["1000", "64", "200000"]);
    let trace = Leaktrace::attach(
        fixture.pid(),
        &["--interval", "0.25", "--metrics", "127.0.0.1:0"],
    );
    let address = trace.metrics_address();
    let mut stuck = Vec::new();
    // Half a request, never finished.
    for _ in 0..8 {
        let mut stream = TcpStream::connect(&address).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        stuck.push(stream);
    }
    // Thousands of pipelined requests whose answers are never read: the server's writes to
    // them block as soon as the socket buffers are full.
    let pipelined = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(5000);
    for _ in 0..8 {
        let mut stream = tiny_receiver(&address);
        stream.set_nonblocking(true).unwrap();
        // As much as the server takes in before it stops reading.
        let _ = stream.write(pipelined.as_bytes());
        stuck.push(stream);
    }
    // Connected, silent.
    for _ in 0..4 {
        stuck.push(TcpStream::connect(&address).unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));

    fixture.round();
    // While all of them hang on, a scraper that behaves gets the round's exact numbers.
    let (_, samples) = scrape_until(&address, |s| {
        value(s, "leaktrace_allocations_total", &[]) == Some(201_000.0)
    });
    assert_eq!(
        value(&samples, "leaktrace_frees_total", &[]),
        Some(200_000.0)
    );
    assert_eq!(
        value(&samples, "leaktrace_outstanding_bytes", &[]),
        Some(64_000.0)
    );
    assert_eq!(
        value(&samples, "leaktrace_lost_events_total", &[]),
        Some(0.0)
    );
    let outcome = trace.stop();
    drop(stuck);
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let report = outcome.last();
    assert_eq!(report["totals"]["lost_events"], 0, "{report}");
    assert_eq!(report["totals"]["allocations"], 201_000);
    assert_eq!(report["totals"]["outstanding_bytes"], 64_000);
    // Reports kept coming every interval meanwhile.
    assert!(
        outcome.reports.len() >= 4,
        "{} reports",
        outcome.reports.len()
    );
    fixture.finish();
}
