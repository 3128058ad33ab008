//! A real Prometheus (Debian's package, installed by `cargo xtask setup`) scraping leaktrace
//! every second, queried through its HTTP API; and the alerting rules of
//! `deploy/prometheus/`, checked and unit-tested with promtool.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    http,
    metrics::have_promtool,
    support::{
        Fixture, Leaktrace, compile, expected_sites, have_commands, installed, require_root,
        stack_of,
    },
};

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

#[test]
fn the_alerting_rules_pass_promtool_check_and_their_unit_tests() {
    if !have_promtool() {
        return;
    }
    for args in [
        ["check", "rules", "leaktrace-rules.yml"],
        ["test", "rules", "leaktrace-rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(rules_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A Prometheus server of the test's own: loopback only, its storage in a temporary
/// directory, killed and removed on drop whatever happened.
struct Prometheus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`127.0.0.1:PORT`) every second, with leaktrace's
    /// alerting rules, and waits until it is ready.
    fn start(target: &str) -> Self {
        // Its port was free an instant ago; another test could take it meanwhile: a few tries.
        for _ in 0..3 {
            if let Some(server) = Self::try_start(target) {
                return server;
            }
        }
        panic!("prometheus did not start (scraping {target}); see its log above")
    }

    fn try_start(target: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        // No alertmanager, no remote write, no discovery: nothing but the one target.
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: leaktrace\n    static_configs:\n      - targets: ['{target}']\n",
                rules_dir().join("leaktrace-rules.yml").display()
            ),
        )
        .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let log_path = dir.path().join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("prometheus starts");
        let mut server = Self {
            child,
            address,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && server.child.try_wait().unwrap().is_none() {
            if http::get(&server.address, "/-/ready", None).is_ok_and(|r| r.status == 200) {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        eprintln!("prometheus did not start on {}: {log}", server.address);
        None
    }

    /// An instant query's result vector.
    fn query(&self, query: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", http::encode(query));
        let response = http::get(&self.address, &path, None).expect("prometheus answers");
        let body: Value = serde_json::from_str(&response.body)
            .unwrap_or_else(|e| panic!("{e}: {}", response.body));
        assert_eq!(body["status"], "success", "{query}: {body}");
        body["data"]["result"].as_array().unwrap().clone()
    }

    fn api(&self, path: &str) -> Value {
        let response = http::get(&self.address, path, None).expect("prometheus answers");
        serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("{e}: {}", response.body))
    }

    /// Queries until `done` holds for the result (60 s at most); returns it.
    fn query_until(&self, query: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = self.query(query);
            if done(&result) {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "{query}: never got there; last result {result:?}; targets {}",
                self.api("/api/v1/targets")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A vector element's value.
fn sample_value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

fn have_prometheus() -> bool {
    installed("prometheus", have_commands(&["prometheus"]))
}

#[test]
fn prometheus_sees_the_exact_leak_call_it_a_leak_and_the_cache_stable() {
    if !require_root() || !have_prometheus() {
        return;
    }
    let binary = compile("patterns", &[]);
    let mut fixture = Fixture::start(&binary, &["1024"]);
    let trace = Leaktrace::attach(fixture.pid(), &["--metrics", "127.0.0.1:0"]);
    let prometheus = Prometheus::start(&trace.metrics_address());
    fixture.send("go");

    // A leak of 1 KiB every 5 ms, and a full cache that churns.
    let leak = prometheus.query_until(
        r#"leaktrace_stack_outstanding_bytes{job="leaktrace",function="leak_site",kind="leak"}"#,
        |r| r.len() == 1,
    );
    let stack_id = leak[0]["metric"]["stack_id"].as_str().unwrap().to_owned();
    assert_eq!(leak[0]["metric"]["comm"], "patterns");
    assert_eq!(leak[0]["metric"]["pid"], fixture.pid().to_string());
    prometheus.query_until(
        r#"leaktrace_stack_outstanding_bytes{function="cache_put",kind="stable"} == 25600"#,
        |r| r.len() == 1,
    );
    // The rules are loaded, and the leak alert waits out its 10 minutes.
    let alerts = prometheus.query_until(
        r#"ALERTS{alertname="LeaktraceStackLeaking",function="leak_site"}"#,
        |r| !r.is_empty(),
    );
    assert_eq!(alerts[0]["metric"]["alertstate"], "pending");
    let rules = prometheus.api("/api/v1/rules");
    let rules = rules["data"]["groups"][0]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 3);
    assert!(rules.iter().all(|r| r["health"] == "ok"), "{rules:?}");
    // Prometheus asked for OpenMetrics and got it: the units come with the metadata.
    let metadata = prometheus.api("/api/v1/metadata?metric=leaktrace_stack_outstanding_bytes");
    assert_eq!(
        metadata["data"]["leaktrace_stack_outstanding_bytes"][0]["unit"], "bytes",
        "{metadata}"
    );

    // The leak stops: its series settles at exactly what the fixture leaked, under the same
    // id, and once flat it is no longer a leak (its `leak` series is gone, not stale).
    fixture.send("quiet");
    fixture.expect_line("quiet");
    let expected = expected_sites(&fixture.round());
    let (site, bytes, count, _) = &expected[0];
    assert_eq!(site, "leak_site");
    assert!(*count > 100, "{expected:?}");
    let settled = prometheus.query_until(
        r#"leaktrace_stack_outstanding_bytes{function="leak_site"}"#,
        |r| {
            r.len() == 1 && sample_value(&r[0]) == *bytes as f64 && r[0]["metric"]["kind"] != "leak"
        },
    );
    assert_eq!(settled[0]["metric"]["stack_id"], stack_id.as_str());
    assert_eq!(
        prometheus
            .query(&format!(
                r#"leaktrace_stack_outstanding_allocations{{stack_id="{stack_id}"}}"#
            ))
            .iter()
            .map(sample_value)
            .collect::<Vec<_>>(),
        [*count as f64]
    );
    for (query, want) in [
        ("leaktrace_lost_events_total", 0.0),
        ("leaktrace_trace_complete", 1.0),
        (
            r#"count(leaktrace_stack_outstanding_bytes{kind="leak"})"#,
            f64::NAN,
        ),
    ] {
        let result = prometheus.query(query);
        if want.is_nan() {
            assert!(result.is_empty(), "{query}: {result:?}");
        } else {
            assert_eq!(
                result.iter().map(sample_value).collect::<Vec<_>>(),
                [want],
                "{query}"
            );
        }
    }

    let outcome = trace.stop();
    assert!(outcome.status.success(), "{:?}", outcome.stderr);
    let report = outcome.last();
    assert_eq!(
        stack_of(report, "leak_site").unwrap()["outstanding_bytes"],
        *bytes
    );
    drop(prometheus);
    fixture.send("exit");
    assert!(fixture.finish().success());
}
