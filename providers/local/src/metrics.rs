//! The daemon's Prometheus text exposition, formatted by hand from the data planes' atomic
//! counters (nothing on the traffic path touches a metrics registry).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::dataplane::health::Health;
use crate::dataplane::http::stats::CLASSES;
use crate::dataplane::{ListenerStats, LoadBalancer};
use crate::pool::AddressPool;

const PREFIX: &str = "portico_local_cloud";

/// Renders the metrics of `lbs` (name, data plane) and of the pool.
pub fn render(pool: AddressPool, lbs: &[(&str, &LoadBalancer)]) -> String {
    let mut out = String::with_capacity(4096);
    header(
        &mut out,
        "load_balancers",
        "gauge",
        "Load balancers served.",
    );
    let _ = writeln!(out, "{PREFIX}_load_balancers {}", lbs.len());
    header(
        &mut out,
        "pool_addresses",
        "gauge",
        "Addresses in the pool.",
    );
    let _ = writeln!(out, "{PREFIX}_pool_addresses {}", pool.len());

    let listeners: Vec<(&str, ListenerStats<'_>)> = lbs
        .iter()
        .flat_map(|(name, lb)| lb.listener_stats().map(move |s| (*name, s)))
        .collect();
    let labels = |lb: &str, s: &ListenerStats<'_>| {
        format!(
            "lb=\"{}\",listener=\"{}\",protocol=\"{}\",port=\"{}\"",
            escape(lb),
            escape(s.name),
            s.protocol,
            s.port
        )
    };

    header(
        &mut out,
        "connections_accepted_total",
        "counter",
        "Connections (UDP: flows) sent to a target.",
    );
    for (lb, s) in &listeners {
        let v = s.stats.accepted.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{PREFIX}_connections_accepted_total{{{}}} {v}",
            labels(lb, s)
        );
    }
    header(
        &mut out,
        "connections_rejected_total",
        "counter",
        "Connections (UDP: datagrams of new flows) refused, by reason.",
    );
    for (lb, s) in &listeners {
        let l = labels(lb, s);
        let source = s.stats.rejected_source.load(Ordering::Relaxed);
        let no_target = s.stats.rejected_no_target.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{PREFIX}_connections_rejected_total{{{l},reason=\"source_range\"}} {source}"
        );
        let _ = writeln!(
            out,
            "{PREFIX}_connections_rejected_total{{{l},reason=\"no_target\"}} {no_target}"
        );
    }
    header(
        &mut out,
        "connections_active",
        "gauge",
        "Connections (UDP: flows) open now.",
    );
    for (lb, s) in &listeners {
        let v = s.stats.active.load(Ordering::Relaxed);
        let _ = writeln!(out, "{PREFIX}_connections_active{{{}}} {v}", labels(lb, s));
    }
    header(
        &mut out,
        "bytes_total",
        "counter",
        "Bytes proxied (TCP: counted when a connection ends).",
    );
    for (lb, s) in &listeners {
        let l = labels(lb, s);
        let to_target = s.stats.bytes_in.load(Ordering::Relaxed);
        let to_client = s.stats.bytes_out.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{PREFIX}_bytes_total{{{l},direction=\"to_target\"}} {to_target}"
        );
        let _ = writeln!(
            out,
            "{PREFIX}_bytes_total{{{l},direction=\"to_client\"}} {to_client}"
        );
    }

    header(
        &mut out,
        "http_requests_total",
        "counter",
        "HTTP responses of application load balancers by backend (empty: none, e.g. 404) and status class.",
    );
    for (lb, plane) in lbs {
        let Some(http) = plane.http() else { continue };
        for (backend, counters) in http.request_stats() {
            for (i, class) in CLASSES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{PREFIX}_http_requests_total{{lb=\"{}\",backend=\"{}\",class=\"{class}\"}} {}",
                    escape(lb),
                    escape(backend.unwrap_or("")),
                    counters.get(i)
                );
            }
        }
    }

    header(
        &mut out,
        "target_health",
        "gauge",
        "Health-check verdict per target address and probe (1 for the current state).",
    );
    for (lb, plane) in lbs {
        let mut states: Vec<_> = plane.health().states().collect();
        states.sort_by(|a, b| a.0.cmp(b.0));
        for (key, node, health) in states {
            for state in [Health::Unknown, Health::Healthy, Health::Unhealthy] {
                let _ = writeln!(
                    out,
                    "{PREFIX}_target_health{{lb=\"{}\",node=\"{}\",address=\"{}\",probe=\"{}\",probe_port=\"{}\",state=\"{}\"}} {}",
                    escape(lb),
                    escape(node),
                    key.address,
                    key.kind(),
                    key.port,
                    state.as_str(),
                    u8::from(health == state)
                );
            }
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {PREFIX}_{name} {help}");
    let _ = writeln!(out, "# TYPE {PREFIX}_{name} {kind}");
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
