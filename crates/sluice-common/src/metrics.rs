//! A small process-wide metrics registry rendered in the Prometheus text format.
//!
//! Counters, gauges and histograms are lock-free atomics once created; creating (or
//! looking up) a series takes a lock, so callers keep the returned handle. Values that are
//! cheaper to compute at scrape time (disk usage, consumer lag) are registered as
//! collectors, closures that return samples when `/metrics` is rendered.
//! Names follow `sluice_<component>_<thing>_<unit>`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

type Labels = Vec<(String, String)>;
/// Collected samples grouped by family: help, type and (labels, value) pairs.
type Grouped = BTreeMap<String, (String, &'static str, Vec<(Labels, f64)>)>;

/// Latency buckets in seconds, 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in nanoseconds (or units × 1e9).
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct Histogram(Arc<HistogramInner>);

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram(Arc::new(HistogramInner {
            bounds,
            counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }))
    }

    /// Records an observation in seconds.
    pub fn observe(&self, v: f64) {
        let h = &self.0;
        if let Some(i) = h.bounds.iter().position(|b| v <= *b) {
            h.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        h.sum_nanos
            .fetch_add((v.max(0.0) * 1e9) as u64, Ordering::Relaxed);
        h.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: std::time::Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Debug)]
enum Series {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

struct Family {
    help: String,
    kind: &'static str,
    series: BTreeMap<Labels, Series>,
}

/// Samples produced by a collector: (family name, help, type, labels, value).
pub type Sample = (String, String, &'static str, Labels, f64);
type Collector = Box<dyn Fn() -> Vec<Sample> + Send + Sync>;

#[derive(Default)]
pub struct Registry {
    families: Mutex<BTreeMap<String, Family>>,
    collectors: Mutex<Vec<Collector>>,
}

fn labels(l: &[(&str, &str)]) -> Labels {
    l.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Registry {
    fn series(
        &self,
        name: &str,
        help: &str,
        kind: &'static str,
        l: &[(&str, &str)],
        make: impl FnOnce() -> Series,
    ) -> Series {
        let mut fams = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let fam = fams.entry(name.to_owned()).or_insert_with(|| Family {
            help: help.to_owned(),
            kind,
            series: BTreeMap::new(),
        });
        fam.series.entry(labels(l)).or_insert_with(make).clone()
    }

    pub fn counter(&self, name: &str, help: &str, l: &[(&str, &str)]) -> Counter {
        match self.series(name, help, "counter", l, || {
            Series::Counter(Counter::default())
        }) {
            Series::Counter(c) => c,
            _ => Counter::default(),
        }
    }

    pub fn gauge(&self, name: &str, help: &str, l: &[(&str, &str)]) -> Gauge {
        match self.series(name, help, "gauge", l, || Series::Gauge(Gauge::default())) {
            Series::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        l: &[(&str, &str)],
        bounds: &'static [f64],
    ) -> Histogram {
        match self.series(name, help, "histogram", l, || {
            Series::Histogram(Histogram::new(bounds))
        }) {
            Series::Histogram(h) => h,
            _ => Histogram::new(bounds),
        }
    }

    /// Adds a closure evaluated at every scrape.
    pub fn collector(&self, f: impl Fn() -> Vec<Sample> + Send + Sync + 'static) {
        self.collectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(f));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let fmt_labels = |l: &Labels, extra: Option<(&str, String)>| -> String {
            let mut parts: Vec<String> = l
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}=\"{}\"",
                        v.replace('\\', "\\\\")
                            .replace('"', "\\\"")
                            .replace('\n', "\\n")
                    )
                })
                .collect();
            if let Some((k, v)) = extra {
                parts.push(format!("{k}=\"{v}\""));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", parts.join(","))
            }
        };
        {
            let fams = self.families.lock().unwrap_or_else(|e| e.into_inner());
            for (name, f) in fams.iter() {
                let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {}", f.help, f.kind);
                for (l, s) in &f.series {
                    match s {
                        Series::Counter(c) => {
                            let _ = writeln!(out, "{name}{} {}", fmt_labels(l, None), c.get());
                        }
                        Series::Gauge(g) => {
                            let _ = writeln!(out, "{name}{} {}", fmt_labels(l, None), g.get());
                        }
                        Series::Histogram(h) => {
                            let h = &h.0;
                            let mut cum = 0;
                            for (b, c) in h.bounds.iter().zip(&h.counts) {
                                cum += c.load(Ordering::Relaxed);
                                let _ = writeln!(
                                    out,
                                    "{name}_bucket{} {cum}",
                                    fmt_labels(l, Some(("le", format!("{b}"))))
                                );
                            }
                            let count = h.count.load(Ordering::Relaxed);
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {count}",
                                fmt_labels(l, Some(("le", "+Inf".into())))
                            );
                            let _ = writeln!(
                                out,
                                "{name}_sum{} {}",
                                fmt_labels(l, None),
                                h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
                            );
                            let _ = writeln!(out, "{name}_count{} {count}", fmt_labels(l, None));
                        }
                    }
                }
            }
        }
        let collectors = self.collectors.lock().unwrap_or_else(|e| e.into_inner());
        let mut samples: Grouped = BTreeMap::new();
        for c in collectors.iter() {
            for (name, help, kind, l, v) in c() {
                samples
                    .entry(name)
                    .or_insert_with(|| (help, kind, Vec::new()))
                    .2
                    .push((l, v));
            }
        }
        for (name, (help, kind, vals)) in samples {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (l, v) in vals {
                let _ = writeln!(out, "{name}{} {v}", fmt_labels(&l, None));
            }
        }
        out
    }
}

/// The process-wide registry.
pub fn global() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::default();
        let c = r.counter("sluice_test_total", "A test counter.", &[("topic", "a\"b")]);
        c.inc_by(3);
        r.counter("sluice_test_total", "A test counter.", &[("topic", "a\"b")])
            .inc();
        r.gauge("sluice_test_gauge", "A gauge.", &[]).set(-2);
        let h = r.histogram(
            "sluice_test_seconds",
            "Latency.",
            &[("op", "send")],
            LATENCY_BUCKETS,
        );
        h.observe(0.0003);
        h.observe(20.0);
        r.collector(|| {
            vec![(
                "sluice_test_lag".into(),
                "Lag.".into(),
                "gauge",
                vec![("group".into(), "g".into())],
                7.0,
            )]
        });
        let t = r.render();
        assert!(t.contains("# TYPE sluice_test_total counter"));
        assert!(t.contains("sluice_test_total{topic=\"a\\\"b\"} 4"));
        assert!(t.contains("sluice_test_gauge -2"));
        assert!(t.contains("sluice_test_seconds_bucket{op=\"send\",le=\"0.0005\"} 1"));
        assert!(t.contains("sluice_test_seconds_bucket{op=\"send\",le=\"+Inf\"} 2"));
        assert!(t.contains("sluice_test_seconds_count{op=\"send\"} 2"));
        assert!(t.contains("sluice_test_lag{group=\"g\"} 7"));
    }
}
