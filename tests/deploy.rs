//! `deploy/`: the Prometheus config, rules and Grafana dashboard parse, and
//! every metric they name is one the service exports (src/metrics.rs), so
//! they cannot drift from it. The README's metrics table lists every metric.

use std::collections::BTreeSet;

use cachecoord::{
    metrics::{DEFS, Kind},
    rls::yaml::{self, Node, Value},
};

fn read(path: &str) -> String {
    let path = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn parse_yaml(path: &str) -> Node {
    match yaml::parse(&read(path)) {
        Ok(Some(node)) => node,
        Ok(None) => panic!("{path}: empty"),
        Err((line, err)) => panic!("{path}:{line}: {err}"),
    }
}

/// The value under `key` in a mapping node.
fn get<'a>(node: &'a Node, key: &str) -> Option<&'a Node> {
    match &node.value {
        Value::Map(entries) => {
            entries.iter().find(|(k, _)| matches!(&k.value, Value::Scalar { text, .. } if text == key)).map(|(_, v)| v)
        }
        _ => None,
    }
}

fn text(node: &Node) -> &str {
    match &node.value {
        Value::Scalar { text, .. } => text,
        other => panic!("line {}: expected a scalar, found {other:?}", node.line),
    }
}

fn items(node: &Node) -> &[Node] {
    match &node.value {
        Value::Seq(items) => items,
        _ => panic!("line {}: expected a list", node.line),
    }
}

/// Every identifier in a PromQL expression that names a service metric
/// (the `grpc_server_` and `cachecoord_` families; recording rules have
/// colons and are checked separately).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in expr.chars().chain([' ']) {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if !word.contains(':') && (word.starts_with("grpc_server_") || word.starts_with("cachecoord_")) {
            names.insert(word.clone());
        }
        word.clear();
    }
    names
}

/// Whether `name` is exported: a metric of [`DEFS`], or a histogram's
/// `_bucket`, `_sum` or `_count` series.
fn exported(name: &str) -> bool {
    DEFS.iter().any(|def| {
        def.name == name
            || (def.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"].iter().any(|suffix| name == format!("{}{suffix}", def.name)))
    })
}

/// Recording rule names used in `expr`.
fn recorded_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("cachecoord:"))
        .map(String::from)
        .collect()
}

#[test]
fn the_checker_itself_finds_names_and_rejects_unknown_ones() {
    let names = metric_names(r#"sum(rate(cachecoord_nope_total{x="cachecoord_in_a_label"}[5m])) / cachecoord:rec"#);
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["cachecoord_nope_total"]);
    assert!(!exported("cachecoord_nope_total"));
    assert!(exported("grpc_server_handling_seconds_bucket"));
    assert!(!exported("grpc_server_started_total_bucket"), "only histograms have buckets");
}

#[test]
fn rules_parse_and_use_only_exported_metrics() {
    let rules = parse_yaml("deploy/prometheus/rules.yml");
    let groups = items(get(&rules, "groups").expect("groups"));
    let mut recorded = BTreeSet::new();
    let mut alerts = BTreeSet::new();
    let mut used = BTreeSet::new();
    let mut uses_recorded = BTreeSet::new();
    for group in groups {
        for rule in items(get(group, "rules").expect("rules")) {
            let expr = text(get(rule, "expr").expect("every rule has an expr"));
            assert!(!expr.trim().is_empty(), "line {}: empty expr", rule.line);
            used.extend(metric_names(expr));
            uses_recorded.extend(recorded_names(expr));
            match (get(rule, "record"), get(rule, "alert")) {
                (Some(name), None) => assert!(recorded.insert(text(name).to_string()), "{} twice", text(name)),
                (None, Some(name)) => {
                    assert!(alerts.insert(text(name).to_string()), "{} twice", text(name));
                    let severity = get(rule, "labels").and_then(|labels| get(labels, "severity"));
                    assert!(severity.is_some(), "alert {} has a severity", text(name));
                    assert!(get(rule, "annotations").and_then(|a| get(a, "summary")).is_some());
                }
                _ => panic!("line {}: a rule is either a record or an alert", rule.line),
            }
        }
    }
    for name in &used {
        assert!(exported(name), "rules.yml uses {name}, which the service does not export");
    }
    for name in &uses_recorded {
        assert!(recorded.contains(name), "rules.yml uses {name}, which no rule records");
    }
    // The alerts issue #14 asks for.
    for alert in [
        "CachecoordRedisDown",
        "CachecoordHighErrorRatio",
        "CachecoordSlowRPCs",
        "CachecoordCacheHitRatioCollapse",
        "CachecoordLockWaitGrowing",
    ] {
        assert!(alerts.contains(alert), "{alert} missing");
    }
    assert!(used.len() >= 10, "the rules cover the service: {used:?}");
}

#[test]
fn dashboard_parses_and_uses_only_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/cachecoord.json")).expect("dashboard is JSON");
    assert_eq!(dashboard["uid"], "cachecoord");
    let mut exprs = Vec::new();
    fn walk<'a>(value: &'a serde_json::Value, exprs: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "query", serde_json::Value::String(expr)) => exprs.push(expr),
                        _ => walk(value, exprs),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|item| walk(item, exprs)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|expr| metric_names(expr)).collect();
    for name in &used {
        assert!(exported(name), "the dashboard uses {name}, which the service does not export");
    }
    // Every metric the service exports has a panel.
    for def in DEFS {
        let shown = used.iter().any(|name| name.starts_with(def.name));
        assert!(shown, "no dashboard panel shows {}", def.name);
    }
    // Panels do not overlap rows: every panel has a position.
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{panel}");
    }
}

#[test]
fn prometheus_and_grafana_configs_parse() {
    let prometheus = parse_yaml("deploy/prometheus/prometheus.yml");
    let jobs = items(get(&prometheus, "scrape_configs").expect("scrape_configs"));
    let job = jobs.iter().find(|job| get(job, "job_name").map(text) == Some("cachecoord")).expect("cachecoord job");
    assert_eq!(get(job, "metrics_path").map(text), Some("/metrics"));
    let rule_files = items(get(&prometheus, "rule_files").expect("rule_files"));
    assert!(rule_files.iter().any(|file| text(file).ends_with("rules.yml")));
    parse_yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    parse_yaml("deploy/grafana/provisioning/dashboards/cachecoord.yml");

    // The compose file's opt-in profile runs both, with these files.
    let compose = parse_yaml("docker-compose.yml");
    let services = get(&compose, "services").expect("services");
    for name in ["prometheus", "grafana"] {
        let service = get(services, name).unwrap_or_else(|| panic!("compose service {name}"));
        let profiles: Vec<&str> = items(get(service, "profiles").expect("profiles")).iter().map(text).collect();
        assert_eq!(profiles, ["observability"], "{name} is opt-in");
    }
    let cachecoord = get(services, "cachecoord").expect("cachecoord service");
    let env = get(cachecoord, "environment").expect("environment");
    assert!(get(env, "CACHECOORD_METRICS_LISTEN").is_some(), "compose's cachecoord serves /metrics");
}

#[test]
fn readme_lists_every_metric() {
    let readme = read("README.md");
    for def in DEFS {
        assert!(readme.contains(&format!("`{}`", def.name)), "README.md's metrics table lacks {}", def.name);
    }
}
