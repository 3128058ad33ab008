//! The series of every traced process's latest report, and their exposition in both formats.
//!
//! A report replaces its process's series whole: a stack that left the top N, or whose kind
//! changed (the kind is a label, so a new series), is simply not in the next exposition, and
//! Prometheus marks what disappeared as stale. Both formats are encoded once per report, on
//! the reporter's thread, so a scrape costs the event loop one pointer copy, however often it
//! comes.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use crate::{
    metrics::stack_identity::{program_function, stack_id},
    model::location::Location,
    report::{
        render::{Header, json::round3},
        snapshot::{Snapshot, Totals},
        trends::Kind,
    },
    stacks::symbolize::{Frame, StackSymbolizer},
};

/// The numbers of one process's latest report, as exported.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessSeries {
    pub pid: u32,
    /// The process's name (`/proc/PID/comm`).
    pub comm: String,
    pub timestamp_ms: u64,
    pub totals: Totals,
    pub rss_bytes: Option<u64>,
    /// `--sample-bytes`: the numbers about the malloc family are estimates.
    pub sample_bytes: Option<u64>,
    /// Stacks holding memory; `stacks` are the top of them.
    pub stack_count: usize,
    pub stacks: Vec<StackSeries>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StackSeries {
    pub stack_id: String,
    pub function: String,
    pub kind: Kind,
    pub outstanding_bytes: u64,
    pub outstanding_allocations: u64,
    pub growth_bytes_per_s: f64,
    pub oldest_age_s: f64,
}

impl ProcessSeries {
    /// The series of a report whose watched stacks (`snapshot.watched`) are symbolized as
    /// `frames`.
    pub fn new(header: &Header, comm: String, snapshot: &Snapshot, frames: &[Vec<Frame>]) -> Self {
        let mut stacks: Vec<StackSeries> = Vec::with_capacity(snapshot.watched.len());
        for (stack, frames) in snapshot.watched.iter().zip(frames) {
            let id = stack_id(frames, stack.origin);
            // Two stacks that differ only in what symbolization cannot tell apart (a library
            // loaded twice) would be one series twice, which Prometheus rejects: one series
            // holds both.
            if let Some(same) = stacks.iter_mut().find(|s| s.stack_id == id) {
                same.outstanding_bytes += stack.outstanding_bytes;
                same.outstanding_allocations += stack.outstanding_allocations;
                same.growth_bytes_per_s += round3(stack.growth_bytes_per_s);
                same.oldest_age_s = same.oldest_age_s.max(round3(stack.oldest_age_s));
                continue;
            }
            stacks.push(StackSeries {
                stack_id: id,
                function: program_function(frames, &header.allocator_module),
                kind: stack.kind,
                outstanding_bytes: stack.outstanding_bytes,
                outstanding_allocations: stack.outstanding_allocations,
                // Rounded as in the JSON report: the same numbers.
                growth_bytes_per_s: round3(stack.growth_bytes_per_s),
                oldest_age_s: round3(stack.oldest_age_s),
            });
        }
        Self {
            pid: snapshot.pid,
            comm,
            timestamp_ms: snapshot.timestamp_ms,
            totals: snapshot.totals,
            rss_bytes: snapshot.rss_bytes,
            sample_bytes: snapshot.sample_bytes,
            stack_count: snapshot.stack_count,
            stacks,
        }
    }
}

/// One process's side of the exporter, on its reporter thread.
pub struct Watch {
    exporter: Arc<Exporter>,
    /// The process's name when last read (it is gone once the process has exited).
    comm: Option<String>,
}

impl Watch {
    pub fn new(exporter: Arc<Exporter>) -> Self {
        Self {
            exporter,
            comm: None,
        }
    }

    /// Publishes a report's watched stacks, symbolized; a final report retires the process.
    pub fn report(
        &mut self,
        header: &Header,
        snapshot: &Snapshot,
        symbolizer: &mut StackSymbolizer,
    ) {
        if snapshot.last {
            self.exporter.retire(snapshot.pid);
            return;
        }
        // Read at each report: a spawned command gets its name at exec, and a process may
        // rename itself.
        if let Some(comm) = crate::proc::process::comm(snapshot.pid) {
            self.comm = Some(comm);
        }
        let comm = self.comm.clone().unwrap_or_else(|| {
            let program = header.command.split(' ').next().unwrap_or_default();
            program.rsplit('/').next().unwrap_or(program).to_owned()
        });
        let stacks: Vec<&[Location]> = snapshot.watched.iter().map(|s| &*s.frames).collect();
        // The few watched stacks, each as a list of its own.
        let frames: Vec<Vec<Frame>> = symbolizer
            .symbolize_stacks(&stacks)
            .iter()
            .map(|stack| stack.iter().cloned().collect())
            .collect();
        self.exporter
            .publish(ProcessSeries::new(header, comm, snapshot, &frames));
    }
}

/// The latest series of every traced process, and their encoded exposition.
#[derive(Debug)]
pub struct Exporter {
    processes: Mutex<BTreeMap<u32, ProcessSeries>>,
    /// Swapped whole at each report; the server only clones the `Arc`.
    exposition: Mutex<Arc<Exposition>>,
}

/// What a scrape gets, in each format.
#[derive(Debug)]
pub struct Exposition {
    /// The Prometheus text format, version 0.0.4.
    pub text: Bytes,
    /// OpenMetrics 1.0.0 text.
    pub openmetrics: Bytes,
}

impl Default for Exporter {
    fn default() -> Self {
        Self {
            processes: Mutex::default(),
            exposition: Mutex::new(Arc::new(encode(&BTreeMap::new()))),
        }
    }
}

impl Exporter {
    /// Replaces the series of `series.pid` with these.
    pub fn publish(&self, series: ProcessSeries) {
        self.update(|processes| {
            processes.insert(series.pid, series);
        });
    }

    /// The process's trace ended: its series go.
    pub fn retire(&self, pid: u32) {
        self.update(|processes| {
            processes.remove(&pid);
        });
    }

    /// The latest exposition.
    pub fn exposition(&self) -> Arc<Exposition> {
        Arc::clone(
            &self
                .exposition
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn update(&self, change: impl FnOnce(&mut BTreeMap<u32, ProcessSeries>)) {
        // Held while encoding: two reporters never swap in their expositions out of order.
        let mut processes = self
            .processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        change(&mut processes);
        let encoded = Arc::new(encode(&processes));
        *self
            .exposition
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = encoded;
    }
}

fn encode(processes: &BTreeMap<u32, ProcessSeries>) -> Exposition {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Series(processes.values().cloned().collect())));
    let mut text = String::new();
    let mut openmetrics = String::new();
    // Writing to a String cannot fail, and every value is in range (u64s above i64::MAX
    // are not bytes of a real process).
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    let _ = prometheus_client::encoding::text::encode(&mut openmetrics, &registry);
    Exposition {
        text: Bytes::from(text),
        openmetrics: Bytes::from(openmetrics),
    }
}

/// The processes' series, for prometheus-client to encode.
#[derive(Debug)]
struct Series(Vec<ProcessSeries>);

/// One metric: its name (without unit), help, unit, and value for a process or a stack.
struct Metric<T> {
    name: &'static str,
    help: &'static str,
    /// The unit, which OpenMetrics wants as the name's suffix too.
    unit: Option<&'static str>,
    value: fn(&T) -> Option<Value>,
}

#[derive(Clone, Copy)]
enum Value {
    Gauge(f64),
    GaugeInt(u64),
    Counter(u64),
}

impl Value {
    fn metric_type(self) -> MetricType {
        match self {
            Self::Gauge(_) | Self::GaugeInt(_) => MetricType::Gauge,
            Self::Counter(_) => MetricType::Counter,
        }
    }
}

/// u64 values beyond i64::MAX cannot be encoded as gauges; no process holds that many bytes.
fn gauge(n: u64) -> Option<Value> {
    Some(Value::GaugeInt(n.min(i64::MAX as u64)))
}

const PROCESS_METRICS: [Metric<ProcessSeries>; 12] = [
    Metric {
        name: "leaktrace_outstanding",
        help: "Bytes allocated since attach and not freed (heap blocks and anonymous mappings).",
        unit: Some("bytes"),
        value: |p| gauge(p.totals.outstanding_bytes),
    },
    Metric {
        name: "leaktrace_outstanding_allocations",
        help: "Blocks and mappings allocated since attach and not freed.",
        unit: None,
        value: |p| gauge(p.totals.outstanding_allocations),
    },
    Metric {
        name: "leaktrace_allocations",
        help: "Allocations since attach.",
        unit: None,
        value: |p| Some(Value::Counter(p.totals.allocations)),
    },
    Metric {
        name: "leaktrace_frees",
        help: "Frees since attach.",
        unit: None,
        value: |p| Some(Value::Counter(p.totals.frees)),
    },
    Metric {
        name: "leaktrace_lost_events",
        help: "Events lost (ring buffer full, or undecodable): above zero, the numbers are a lower bound.",
        unit: None,
        value: |p| Some(Value::Counter(p.totals.lost_events)),
    },
    Metric {
        name: "leaktrace_unmatched_frees",
        help: "Frees of blocks allocated before attach (unknown under sampling).",
        unit: None,
        value: |p| {
            p.sample_bytes
                .is_none()
                .then_some(Value::Counter(p.totals.unmatched_frees))
        },
    },
    Metric {
        name: "leaktrace_rss",
        help: "The traced process's resident set (VmRSS).",
        unit: Some("bytes"),
        value: |p| p.rss_bytes.and_then(gauge),
    },
    Metric {
        name: "leaktrace_trace_complete",
        help: "1 when no event was lost since attach, 0 when the numbers are a lower bound.",
        unit: None,
        value: |p| Some(Value::GaugeInt(u64::from(p.totals.lost_events == 0))),
    },
    Metric {
        name: "leaktrace_sampling_enabled",
        help: "1 when only a sample of blocks is traced (--sample-bytes): the numbers are estimates.",
        unit: None,
        value: |p| Some(Value::GaugeInt(u64::from(p.sample_bytes.is_some()))),
    },
    Metric {
        name: "leaktrace_sample",
        help: "--sample-bytes: about one block is traced per this many bytes allocated.",
        unit: Some("bytes"),
        value: |p| p.sample_bytes.and_then(gauge),
    },
    Metric {
        name: "leaktrace_stacks",
        help: "Call stacks holding memory (the top of them are exported per stack).",
        unit: None,
        value: |p| gauge(p.stack_count as u64),
    },
    Metric {
        name: "leaktrace_report_timestamp",
        help: "When the report these numbers come from was made (Unix time).",
        unit: Some("seconds"),
        value: |p| Some(Value::Gauge(p.timestamp_ms as f64 / 1000.0)),
    },
];

const STACK_METRICS: [Metric<StackSeries>; 4] = [
    Metric {
        name: "leaktrace_stack_outstanding",
        help: "Bytes allocated by this call stack and not freed.",
        unit: Some("bytes"),
        value: |s| gauge(s.outstanding_bytes),
    },
    Metric {
        name: "leaktrace_stack_outstanding_allocations",
        help: "Blocks and mappings allocated by this call stack and not freed.",
        unit: None,
        value: |s| gauge(s.outstanding_allocations),
    },
    Metric {
        name: "leaktrace_stack_growth",
        help: "How fast this stack's outstanding bytes grow (least squares over the last reports).",
        unit: Some("bytes_per_second"),
        value: |s| Some(Value::Gauge(s.growth_bytes_per_s)),
    },
    Metric {
        name: "leaktrace_stack_oldest_age",
        help: "Age of this stack's oldest outstanding block.",
        unit: Some("seconds"),
        value: |s| Some(Value::Gauge(s.oldest_age_s)),
    },
];

impl Collector for Series {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for metric in &PROCESS_METRICS {
            let values: Vec<(&ProcessSeries, Value)> = self
                .0
                .iter()
                .filter_map(|p| (metric.value)(p).map(|v| (p, v)))
                .collect();
            let labels = |p: &ProcessSeries| [("pid", p.pid.to_string()), ("comm", p.comm.clone())];
            write_family(&mut encoder, metric, values, labels)?;
        }
        for metric in &STACK_METRICS {
            let values: Vec<((&ProcessSeries, &StackSeries), Value)> = self
                .0
                .iter()
                .flat_map(|p| p.stacks.iter().map(move |s| (p, s)))
                .filter_map(|(p, s)| (metric.value)(s).map(|v| ((p, s), v)))
                .collect();
            let labels = |(p, s): (&ProcessSeries, &StackSeries)| {
                [
                    ("pid", p.pid.to_string()),
                    ("comm", p.comm.clone()),
                    ("stack_id", s.stack_id.clone()),
                    ("function", s.function.clone()),
                    ("kind", s.kind.as_str().to_owned()),
                ]
            };
            write_family(&mut encoder, metric, values, labels)?;
        }
        Ok(())
    }
}

/// One metric's descriptor and series; nothing for a metric without series (the RSS of
/// processes that all exited, sampling's size when no process is sampled).
fn write_family<T, K: Copy, const N: usize>(
    encoder: &mut DescriptorEncoder,
    metric: &Metric<T>,
    values: Vec<(K, Value)>,
    labels: impl Fn(K) -> [(&'static str, String); N],
) -> Result<(), std::fmt::Error> {
    let Some(&(_, first)) = values.first() else {
        return Ok(());
    };
    let unit = metric.unit.map(|unit| Unit::Other(unit.to_owned()));
    let mut family =
        encoder.encode_descriptor(metric.name, metric.help, unit.as_ref(), first.metric_type())?;
    for (key, value) in values {
        let labels = labels(key);
        let series = family.encode_family(&labels)?;
        match value {
            Value::Gauge(v) => ConstGauge::new(v).encode(series)?,
            Value::GaugeInt(v) => ConstGauge::new(v as i64).encode(series)?,
            Value::Counter(v) => ConstCounter::new(v).encode(series)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{heap::Allocated, stack_table::Origin},
        report::snapshot::StackSummary,
    };

    fn header() -> Header {
        Header {
            pid: 42,
            command: "/srv/app --serve".into(),
            allocator: "glibc".into(),
            allocator_module: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
        }
    }

    fn summary(bytes: u64, kind: Kind) -> StackSummary {
        StackSummary {
            outstanding_bytes: bytes,
            outstanding_allocations: bytes / 1024,
            growth_bytes_per_s: 409.5004,
            oldest_age_s: 9.4996,
            kind,
            allocated: Allocated {
                bytes: 2 * bytes,
                count: 2,
            },
            frames: [crate::model::location::Location::unknown(0x5555_0000_1136)].into(),
            truncated: false,
            origin: Origin::Malloc,
        }
    }

    fn frames(function: &str, offset: u64) -> Vec<Frame> {
        vec![Frame {
            address: 0x5555_0000_1136,
            symbol: Some(function.to_owned()),
            offset,
            module: Some("/srv/app".into()),
            module_offset: 0x1136,
            file: Some("app.c".into()),
            line: Some(17),
            inlined: false,
            runtime: None,
        }]
    }

    fn snapshot(stacks: Vec<StackSummary>) -> Snapshot {
        let (_, mut snapshot) = crate::report::render::tests::report_of(&[]);
        snapshot.pid = 42;
        snapshot.timestamp_ms = 1_764_000_000_250;
        snapshot.totals = Totals {
            outstanding_bytes: 8192,
            outstanding_allocations: 8,
            allocations: 30,
            frees: 22,
            lost_events: 0,
            unmatched_frees: 1,
            ..Totals::default()
        };
        snapshot.rss_bytes = Some(5 << 20);
        snapshot.stack_count = 3;
        snapshot.watched = stacks;
        snapshot
    }

    fn exported(exporter: &Exporter) -> (String, String) {
        let exposition = exporter.exposition();
        (
            String::from_utf8(exposition.text.to_vec()).unwrap(),
            String::from_utf8(exposition.openmetrics.to_vec()).unwrap(),
        )
    }

    #[test]
    fn a_report_becomes_series_labelled_by_process_and_stack() {
        let exporter = Exporter::default();
        let snapshot = snapshot(vec![summary(4096, Kind::Leak), summary(2048, Kind::Stable)]);
        let series = ProcessSeries::new(
            &header(),
            "app".into(),
            &snapshot,
            &[frames("leak_site", 0x16), frames("cache_put", 0x2a)],
        );
        let leak_id = stack_id(&frames("leak_site", 0x16), Origin::Malloc);
        exporter.publish(series);
        let (text, openmetrics) = exported(&exporter);
        let labels = r#"pid="42",comm="app""#;
        for line in [
            format!("leaktrace_outstanding_bytes{{{labels}}} 8192"),
            format!("leaktrace_outstanding_allocations{{{labels}}} 8"),
            format!("leaktrace_allocations_total{{{labels}}} 30"),
            format!("leaktrace_frees_total{{{labels}}} 22"),
            format!("leaktrace_lost_events_total{{{labels}}} 0"),
            format!("leaktrace_unmatched_frees_total{{{labels}}} 1"),
            format!("leaktrace_rss_bytes{{{labels}}} 5242880"),
            format!("leaktrace_trace_complete{{{labels}}} 1"),
            format!("leaktrace_sampling_enabled{{{labels}}} 0"),
            format!("leaktrace_stacks{{{labels}}} 3"),
            format!("leaktrace_report_timestamp_seconds{{{labels}}} 1764000000.25"),
            format!(
                r#"leaktrace_stack_outstanding_bytes{{{labels},stack_id="{leak_id}",function="leak_site",kind="leak"}} 4096"#
            ),
            format!(
                r#"leaktrace_stack_outstanding_allocations{{{labels},stack_id="{leak_id}",function="leak_site",kind="leak"}} 4"#
            ),
            format!(
                r#"leaktrace_stack_growth_bytes_per_second{{{labels},stack_id="{leak_id}",function="leak_site",kind="leak"}} 409.5"#
            ),
            format!(
                r#"leaktrace_stack_oldest_age_seconds{{{labels},stack_id="{leak_id}",function="leak_site",kind="leak"}} 9.5"#
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
            assert!(
                openmetrics.lines().any(|l| l == line),
                "{line}\n{openmetrics}"
            );
        }
        assert!(
            text.contains(r#"function="cache_put",kind="stable"} 2048"#),
            "{text}"
        );
        // Unsampled: no sampling size.
        assert!(!text.contains("leaktrace_sample_bytes"), "{text}");
        // The formats differ where they must: counters' TYPE names, units, the end marker.
        assert!(text.contains("# TYPE leaktrace_allocations_total counter\n"));
        assert!(openmetrics.contains("# TYPE leaktrace_allocations counter\n"));
        assert!(openmetrics.contains("# UNIT leaktrace_stack_outstanding_bytes bytes\n"));
        assert!(!text.contains("# UNIT") && !text.contains("# EOF"));
        assert!(openmetrics.ends_with("# EOF\n"));
    }

    #[test]
    fn a_report_replaces_its_process_s_series_whole() {
        let exporter = Exporter::default();
        let with = |stacks: Vec<(StackSummary, Vec<Frame>)>| {
            let (summaries, frames): (Vec<_>, Vec<_>) = stacks.into_iter().unzip();
            ProcessSeries::new(&header(), "app".into(), &snapshot(summaries), &frames)
        };
        exporter.publish(with(vec![
            (summary(4096, Kind::Growing), frames("leak_site", 0x16)),
            (summary(2048, Kind::Stable), frames("cache_put", 0x2a)),
        ]));
        // The cache left the top N; the leak's kind changed.
        exporter.publish(with(vec![(
            summary(8192, Kind::Leak),
            frames("leak_site", 0x16),
        )]));
        let (text, _) = exported(&exporter);
        assert!(!text.contains("cache_put"), "{text}");
        assert!(!text.contains(r#"kind="growing""#), "{text}");
        assert!(
            text.contains(r#"function="leak_site",kind="leak"} 8192"#),
            "{text}"
        );
        // Another process is a series set of its own.
        let mut other = with(vec![]);
        other.pid = 43;
        other.comm = "worker".into();
        exporter.publish(other);
        let (text, _) = exported(&exporter);
        assert!(text.contains(r#"leaktrace_outstanding_bytes{pid="43",comm="worker"} 8192"#));
        assert!(text.contains(r#"leaktrace_outstanding_bytes{pid="42",comm="app"} 8192"#));
        exporter.retire(42);
        let (text, openmetrics) = exported(&exporter);
        assert!(!text.contains(r#"pid="42""#), "{text}");
        exporter.retire(43);
        let (text, openmetrics_empty) = exported(&exporter);
        assert_eq!(text, "");
        assert_eq!(openmetrics_empty, "# EOF\n");
        assert!(openmetrics.contains(r#"pid="43""#));
    }

    #[test]
    fn sampled_and_incomplete_traces_say_so() {
        let exporter = Exporter::default();
        let mut snapshot = snapshot(vec![]);
        snapshot.sample_bytes = Some(512 << 10);
        snapshot.totals.lost_events = 7;
        snapshot.rss_bytes = None;
        exporter.publish(ProcessSeries::new(&header(), "app".into(), &snapshot, &[]));
        let (text, _) = exported(&exporter);
        let labels = r#"{pid="42",comm="app"}"#;
        assert!(text.contains(&format!("leaktrace_sampling_enabled{labels} 1\n")));
        assert!(text.contains(&format!("leaktrace_sample_bytes{labels} 524288\n")));
        assert!(text.contains(&format!("leaktrace_trace_complete{labels} 0\n")));
        assert!(text.contains(&format!("leaktrace_lost_events_total{labels} 7\n")));
        // Unknown under sampling, and the RSS of an exited process: absent, not zero.
        assert!(!text.contains("unmatched_frees"), "{text}");
        assert!(!text.contains("leaktrace_rss"), "{text}");
    }

    #[test]
    fn label_values_are_escaped_and_stacks_that_symbolize_alike_are_one_series() {
        let exporter = Exporter::default();
        let snapshot = snapshot(vec![
            summary(4096, Kind::Leak),
            summary(1024, Kind::Growing),
        ]);
        // A library loaded twice: two stacks, the same frames once symbolized.
        let series = ProcessSeries::new(
            &header(),
            "a \"quoted\"\\name".into(),
            &snapshot,
            &[frames("leak_site", 0x16), frames("leak_site", 0x16)],
        );
        assert_eq!(series.stacks.len(), 1);
        assert_eq!(
            (
                series.stacks[0].outstanding_bytes,
                series.stacks[0].outstanding_allocations,
                series.stacks[0].kind
            ),
            (5120, 5, Kind::Leak)
        );
        exporter.publish(series);
        let (text, _) = exported(&exporter);
        assert!(text.contains(r#"comm="a \"quoted\"\\name""#), "{text}");
    }

    #[test]
    fn the_alerting_rules_use_only_series_that_are_exported() {
        let rules = include_str!("../../../deploy/prometheus/leaktrace-rules.yml");
        let exporter = Exporter::default();
        let mut snapshot = snapshot(vec![summary(4096, Kind::Leak)]);
        snapshot.sample_bytes = Some(4096);
        exporter.publish(ProcessSeries::new(
            &header(),
            "app".into(),
            &snapshot,
            &[frames("leak_site", 0x16)],
        ));
        let (text, _) = exported(&exporter);
        let names: Vec<&str> = rules
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("leaktrace_"))
            .collect();
        assert!(names.len() >= 4, "{names:?}");
        for name in names {
            assert!(
                text.contains(&format!("\n{name}{{")),
                "{name} is not exported:\n{text}"
            );
        }
    }
}
