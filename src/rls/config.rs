//! envoyproxy/ratelimit's YAML configuration, read into [`Rules`].
//!
//! One file per domain, as envoyproxy/ratelimit has it:
//!
//! ```yaml
//! domain: edge
//! descriptors:
//!   - key: remote_address          # any value: one counter per address
//!     rate_limit: {unit: minute, requests_per_unit: 60}
//!   - key: path
//!     value: /login                # this value only
//!     rate_limit: {unit: second, requests_per_unit: 5, name: login}
//!   - key: path
//!     value: /api/*                # a wildcard value
//!     descriptors:                 # nested: a limit applies at the last entry
//!       - key: user
//!         rate_limit: {unit: hour, requests_per_unit: 1000}
//! ```
//!
//! Stricter than envoyproxy/ratelimit where it silently accepted mistakes: a
//! key unknown at its level, a key given twice in one mapping, a value of the
//! wrong type, and the same descriptor twice at one level are errors naming
//! the file and line. Keys envoyproxy/ratelimit knows but cachecoord does
//! not implement (`quota_mode`, `share_threshold`, `metadata`) are errors
//! too, rather than silently meaning something else; `value_to_metric` and
//! `detailed_metric` only name metrics there and are accepted.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
};

use super::{
    Level, Quota, RateLimit, Rules, Unit,
    yaml::{self, Node, Value},
};

/// What is wrong with a config, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as given (or found in a given directory).
    pub file: PathBuf,
    /// 1-based line; 0 when the error is about the whole file.
    pub line: usize,
    /// The rule broken, in words.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
        }
    }
}

/// All errors of one load, each on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&text.join("; "))
    }
}

impl std::error::Error for ConfigErrors {}

/// One config file's name and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// Where it was read from.
    pub file: PathBuf,
    /// Its contents.
    pub text: String,
}

/// Reads the files named by `paths`: a file as is; a directory as its
/// `*.yaml` and `*.yml` files (not hidden, not recursive), in name order.
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<Source>, ConfigErrors> {
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    let whole = |file: &Path, reason: String| ConfigError { file: file.to_path_buf(), line: 0, reason };
    for path in paths {
        let files = if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut files: Vec<PathBuf> = entries
                        .filter_map(|entry| entry.ok().map(|e| e.path()))
                        .filter(|file| {
                            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                            !name.starts_with('.')
                                && (name.ends_with(".yaml") || name.ends_with(".yml"))
                                && file.is_file()
                        })
                        .collect();
                    files.sort();
                    files
                }
                Err(err) => {
                    errors.push(whole(path, format!("cannot list the directory: {err}")));
                    continue;
                }
            }
        } else {
            vec![path.clone()]
        };
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => sources.push(Source { file, text }),
                Err(err) => errors.push(whole(&file, format!("cannot read: {err}"))),
            }
        }
    }
    if errors.is_empty() { Ok(sources) } else { Err(ConfigErrors(errors)) }
}

/// Builds the rules of all `sources`, or every error found in them.
pub fn parse(sources: &[Source]) -> Result<Rules, ConfigErrors> {
    let mut rules = Rules::default();
    let mut errors = Vec::new();
    // Domain → the file and line that defined it.
    let mut defined: HashMap<String, (PathBuf, usize)> = HashMap::new();
    for source in sources {
        let mut file = File { path: &source.file, errors: &mut errors };
        let Some((domain, line, level)) = file.parse(&source.text) else { continue };
        if let Some((first, first_line)) = defined.get(&domain) {
            file.error(line, format!("duplicate domain '{domain}' (first in {}:{first_line})", first.display()));
            continue;
        }
        defined.insert(domain.clone(), (source.file.clone(), line));
        rules.domains.insert(domain, level);
    }
    if errors.is_empty() { Ok(rules) } else { Err(ConfigErrors(errors)) }
}

/// The keys each mapping may hold.
const ROOT_KEYS: &[&str] = &["domain", "descriptors"];
const DESCRIPTOR_KEYS: &[&str] =
    &["key", "value", "rate_limit", "descriptors", "shadow_mode", "detailed_metric", "value_to_metric"];
const RATE_LIMIT_KEYS: &[&str] = &["unit", "requests_per_unit", "unlimited", "name", "replaces"];
const REPLACES_KEYS: &[&str] = &["name"];
/// Keys of envoyproxy/ratelimit that cachecoord does not implement.
const UNSUPPORTED: &[&str] = &["quota_mode", "share_threshold", "metadata"];

/// One file being read; errors are collected, reading goes on where it can.
struct File<'a> {
    path: &'a Path,
    errors: &'a mut Vec<ConfigError>,
}

impl File<'_> {
    fn error(&mut self, line: usize, reason: impl Into<String>) {
        self.errors.push(ConfigError { file: self.path.to_path_buf(), line, reason: reason.into() });
    }

    /// The file's domain, its line and its descriptors.
    fn parse(&mut self, text: &str) -> Option<(String, usize, Level)> {
        let root = match yaml::parse(text) {
            Ok(Some(root)) => root,
            Ok(None) => {
                self.error(0, "empty file: expected a mapping with `domain` and `descriptors`");
                return None;
            }
            Err((line, reason)) => {
                self.error(line, format!("invalid YAML: {reason}"));
                return None;
            }
        };
        let fields = self.mapping(&root, "the file", ROOT_KEYS)?;
        let domain = match fields.get("domain") {
            Some(node) => self.string(node, "domain"),
            None => {
                self.error(root.line, "`domain` is required");
                None
            }
        };
        let domain_line = fields.get("domain").map_or(root.line, |n| n.line);
        let level = self.descriptors(fields.get("descriptors").copied());
        match domain {
            Some(domain) if domain.is_empty() => {
                self.error(domain_line, "`domain` must not be empty");
                None
            }
            Some(domain) => Some((domain, domain_line, level)),
            None => None,
        }
    }

    /// A mapping's entries by key, after checking every key is allowed and
    /// given once.
    fn mapping<'n>(&mut self, node: &'n Node, what: &str, allowed: &[&str]) -> Option<HashMap<&'n str, &'n Node>> {
        let Value::Map(entries) = &node.value else {
            self.error(node.line, format!("{what} must be a mapping, not {}", node.kind()));
            return None;
        };
        let mut fields: HashMap<&str, &Node> = HashMap::new();
        let mut lines: HashMap<&str, usize> = HashMap::new();
        for (key, value) in entries {
            let Value::Scalar { text: name, .. } = &key.value else {
                self.error(key.line, format!("a key of {what} must be a plain name, not {}", key.kind()));
                continue;
            };
            if UNSUPPORTED.contains(&name.as_str()) {
                self.error(key.line, format!("`{name}` is not supported by cachecoord"));
            } else if !allowed.contains(&name.as_str()) {
                self.error(key.line, format!("unknown key `{name}` in {what} (allowed: {})", allowed.join(", ")));
            } else if let Some(first) = lines.get(name.as_str()) {
                self.error(key.line, format!("`{name}` given twice (first at line {first})"));
            } else {
                fields.insert(name, value);
                lines.insert(name, key.line);
            }
        }
        Some(fields)
    }

    /// A level of descriptors (a list, or nothing).
    fn descriptors(&mut self, node: Option<&Node>) -> Level {
        let mut level = Level::default();
        let Some(node) = node.filter(|n| !n.is_null()) else { return level };
        let Value::Seq(items) = &node.value else {
            self.error(node.line, format!("`descriptors` must be a list, not {}", node.kind()));
            return level;
        };
        // (key, value) → the line that first defined it.
        let mut seen: HashMap<(String, String), usize> = HashMap::new();
        for item in items {
            let Some(fields) = self.mapping(item, "a descriptor", DESCRIPTOR_KEYS) else { continue };
            let key = match fields.get("key") {
                Some(node) => self.string(node, "key"),
                None => {
                    self.error(item.line, "a descriptor needs a `key`");
                    None
                }
            };
            let value = fields.get("value").filter(|n| !n.is_null()).and_then(|n| self.string(n, "value"));
            let limit = self.rate_limit(&fields);
            let children = self.descriptors(fields.get("descriptors").copied());
            let Some(key) = key else { continue };
            let key_line = fields.get("key").map_or(item.line, |n| n.line);
            if key.is_empty() {
                self.error(key_line, "`key` must not be empty");
                continue;
            }
            let value = value.unwrap_or_default();
            if let Some(first) = seen.get(&(key.clone(), value.clone())) {
                let shown = if value.is_empty() { key.clone() } else { format!("{key}={value}") };
                self.error(item.line, format!("duplicate descriptor `{shown}` at this level (first at line {first})"));
                continue;
            }
            seen.insert((key.clone(), value.clone()), item.line);
            let node = super::Node { limit, children };
            let matcher = level.keys.entry(key).or_default();
            if value.is_empty() {
                matcher.any = Some(Box::new(node));
            } else if value.contains('*') {
                matcher.wildcards.push((value.split('*').map(str::to_string).collect(), node));
            } else {
                matcher.exact.insert(value, node);
            }
        }
        level
    }

    /// A descriptor's `rate_limit` with its `shadow_mode` and
    /// `detailed_metric`; `None` when it has none (or it is invalid).
    fn rate_limit(&mut self, descriptor: &HashMap<&str, &Node>) -> Option<RateLimit> {
        let shadow_mode = descriptor.get("shadow_mode").and_then(|n| self.bool(n, "shadow_mode")).unwrap_or(false);
        let detailed_metric =
            descriptor.get("detailed_metric").and_then(|n| self.bool(n, "detailed_metric")).unwrap_or(false);
        if let Some(node) = descriptor.get("value_to_metric") {
            self.bool(node, "value_to_metric");
        }
        let node = descriptor.get("rate_limit").filter(|n| !n.is_null())?;
        let fields = self.mapping(node, "`rate_limit`", RATE_LIMIT_KEYS)?;
        let unlimited = fields.get("unlimited").and_then(|n| self.bool(n, "unlimited")).unwrap_or(false);
        let unit = fields.get("unit").filter(|n| !n.is_null()).map(|n| (n.line, self.string(n, "unit")));
        let requests = match fields.get("requests_per_unit").filter(|n| !n.is_null()) {
            Some(n) => self.u32(n, "requests_per_unit"),
            None => Some(0),
        };
        let name = fields.get("name").filter(|n| !n.is_null()).and_then(|n| self.string(n, "name"));
        let replaces = self.replaces(fields.get("replaces").copied(), name.as_deref());
        let quota = match (unlimited, unit) {
            (true, Some((line, _))) => {
                self.error(line, "`unit` must not be given with `unlimited: true`");
                return None;
            }
            (true, None) => Quota::Unlimited,
            (false, Some((line, Some(unit)))) => match Unit::from_name(&unit) {
                Some(unit) => Quota::PerUnit { requests: requests?, unit },
                None => {
                    self.error(line, format!("invalid unit `{unit}` (expected {})", Unit::NAMES.join(", ")));
                    return None;
                }
            },
            (false, Some((_, None))) => return None,
            (false, None) => {
                self.error(node.line, "`rate_limit` needs a `unit` (or `unlimited: true`)");
                return None;
            }
        };
        Some(RateLimit { quota, name, replaces: replaces?, shadow_mode, detailed_metric })
    }

    /// `replaces`: a list of `{name: ...}`, none empty, none naming `own`.
    fn replaces(&mut self, node: Option<&Node>, own: Option<&str>) -> Option<Vec<String>> {
        let Some(node) = node.filter(|n| !n.is_null()) else { return Some(Vec::new()) };
        let Value::Seq(items) = &node.value else {
            self.error(node.line, format!("`replaces` must be a list, not {}", node.kind()));
            return None;
        };
        let mut names = Vec::new();
        let mut ok = true;
        for item in items {
            let Some(fields) = self.mapping(item, "a `replaces` entry", REPLACES_KEYS) else {
                ok = false;
                continue;
            };
            match fields.get("name").and_then(|n| self.string(n, "name")) {
                Some(name) if name.is_empty() => {
                    self.error(item.line, "a `replaces` entry must not have an empty `name`");
                    ok = false;
                }
                Some(name) if Some(name.as_str()) == own => {
                    self.error(item.line, format!("`replaces` must not name its own limit `{name}`"));
                    ok = false;
                }
                Some(name) => names.push(name),
                None => {
                    if !fields.contains_key("name") {
                        self.error(item.line, "a `replaces` entry needs a `name`");
                    }
                    ok = false;
                }
            }
        }
        ok.then_some(names)
    }

    /// A scalar as text; numbers and booleans are text too (as yaml.v2 reads
    /// them into strings).
    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            Value::Scalar { text, .. } if !node.is_null() => Some(text.clone()),
            _ => {
                self.error(node.line, format!("`{what}` must be a string, not {}", node.kind()));
                None
            }
        }
    }

    /// A YAML 1.1 boolean, as yaml.v2 reads them.
    fn bool(&mut self, node: &Node, what: &str) -> Option<bool> {
        if let Value::Scalar { text, plain: true } = &node.value {
            match text.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "y" => return Some(true),
                "false" | "no" | "off" | "n" => return Some(false),
                _ => {}
            }
        }
        self.error(node.line, format!("`{what}` must be true or false"));
        None
    }

    /// An unquoted integer in 0..=4294967295.
    fn u32(&mut self, node: &Node, what: &str) -> Option<u32> {
        if let Value::Scalar { text, plain: true } = &node.value
            && let Ok(n) = text.replace('_', "").parse::<u32>()
        {
            return Some(n);
        }
        self.error(node.line, format!("`{what}` must be a whole number from 0 to 4294967295"));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> Result<Rules, ConfigErrors> {
        let sources: Vec<Source> =
            files.iter().map(|(name, text)| Source { file: PathBuf::from(name), text: text.to_string() }).collect();
        parse(&sources)
    }

    fn rules(text: &str) -> Rules {
        load(&[("a.yaml", text)]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The single error of loading `text` as `a.yaml`, as text.
    fn error(text: &str) -> String {
        let errors = load(&[("a.yaml", text)]).expect_err("config should be rejected");
        assert_eq!(errors.0.len(), 1, "{errors}");
        errors.to_string()
    }

    fn find<'r>(rules: &'r Rules, domain: &str, entries: &[(&str, &str)]) -> Option<&'r RateLimit> {
        rules.find(domain, entries)
    }

    fn per(rules: &Rules, domain: &str, entries: &[(&str, &str)]) -> Option<(u32, Unit)> {
        find(rules, domain, entries).and_then(|l| match l.quota {
            Quota::PerUnit { requests, unit } => Some((requests, unit)),
            Quota::Unlimited => None,
        })
    }

    const FULL: &str = r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit:
      unit: MINUTE
      requests_per_unit: 60
  - key: path
    value: /login
    shadow_mode: true
    detailed_metric: true
    rate_limit: {unit: second, requests_per_unit: 5, name: login}
  - key: path
    value: /api/*
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 1000}
      - key: user
        value: vip
        rate_limit: {unlimited: true}
  - key: path
    value: "*.png"
    rate_limit: {unit: day, requests_per_unit: 10}
  - key: path
    value: /a*b*c
    rate_limit: {unit: week, requests_per_unit: 7}
  - key: path
    rate_limit:
      unit: year
      requests_per_unit: 1
      name: any_path
      replaces:
        - name: login
  - key: tier
    value: 1
    rate_limit: {unit: month, requests_per_unit: 4294967295}
"#;

    #[test]
    fn every_field_is_read() {
        let rules = rules(FULL);
        assert_eq!(per(&rules, "edge", &[("remote_address", "10.0.0.1")]), Some((60, Unit::Minute)));
        let login = find(&rules, "edge", &[("path", "/login")]).unwrap();
        assert_eq!(login.quota, Quota::PerUnit { requests: 5, unit: Unit::Second });
        assert_eq!(login.name.as_deref(), Some("login"));
        assert!(login.shadow_mode && login.detailed_metric);
        let any = find(&rules, "edge", &[("path", "/other")]).unwrap();
        assert_eq!(any.quota, Quota::PerUnit { requests: 1, unit: Unit::Year });
        assert_eq!(any.replaces, vec!["login".to_string()]);
        assert!(!any.shadow_mode);
        assert_eq!(per(&rules, "edge", &[("tier", "1")]), Some((u32::MAX, Unit::Month)));
    }

    #[test]
    fn nesting_applies_a_limit_at_the_last_entry_only() {
        let rules = rules(FULL);
        assert_eq!(per(&rules, "edge", &[("path", "/api/x"), ("user", "7")]), Some((1000, Unit::Hour)));
        // The nested limit needs both entries; /api/* itself has none.
        assert_eq!(find(&rules, "edge", &[("path", "/api/x")]), None);
        // A limit on the first entry does not apply when the request has more.
        assert_eq!(find(&rules, "edge", &[("remote_address", "1.2.3.4"), ("user", "7")]), None);
        assert_eq!(
            find(&rules, "edge", &[("path", "/api/x"), ("user", "vip")]).map(|l| &l.quota),
            Some(&Quota::Unlimited)
        );
        assert_eq!(find(&rules, "edge", &[("path", "/api/x"), ("user", "7"), ("extra", "1")]), None);
    }

    #[test]
    fn most_specific_match_wins_and_wildcards_match_anywhere() {
        let rules = rules(FULL);
        // Exact value beats a wildcard and the key-only default.
        assert_eq!(per(&rules, "edge", &[("path", "/login")]), Some((5, Unit::Second)));
        // Trailing, leading and middle wildcards.
        assert_eq!(per(&rules, "edge", &[("path", "/img/logo.png")]), Some((10, Unit::Day)));
        assert_eq!(per(&rules, "edge", &[("path", "/a-b-c")]), Some((7, Unit::Week)));
        assert_eq!(per(&rules, "edge", &[("path", "/abc")]), Some((7, Unit::Week)));
        assert_eq!(per(&rules, "edge", &[("path", "/acb")]), Some((1, Unit::Year)));
        // The wildcard node matched but has no limit at this depth, and the
        // key-only default is not tried once a value matched (envoyproxy/ratelimit).
        assert_eq!(find(&rules, "edge", &[("path", "/api/")]), None);
        // Unknown keys and domains have no limit.
        assert_eq!(find(&rules, "edge", &[("nope", "x")]), None);
        assert_eq!(find(&rules, "other", &[("path", "/login")]), None);
    }

    #[test]
    fn several_files_make_several_domains() {
        let rules = load(&[
            ("a.yaml", "domain: a\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 1}}]\n"),
            ("b.yaml", "domain: b\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 2}}]\n"),
            ("c.yaml", "domain: c\n"),
        ])
        .unwrap();
        assert_eq!(per(&rules, "a", &[("k", "v")]), Some((1, Unit::Second)));
        assert_eq!(per(&rules, "b", &[("k", "v")]), Some((2, Unit::Second)));
        assert!(rules.has_domain("c"));
        let err = load(&[("a.yaml", "domain: a\n"), ("b.yaml", "\n\ndomain: a\n")]).unwrap_err().to_string();
        assert_eq!(err, "b.yaml:3: duplicate domain 'a' (first in a.yaml:1)");
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        assert_eq!(
            error("domain: d\ndescriptors:\n  - key: k\n    rate_limt: {unit: second}\n"),
            "a.yaml:4: unknown key `rate_limt` in a descriptor \
             (allowed: key, value, rate_limit, descriptors, shadow_mode, detailed_metric, value_to_metric)"
        );
        assert_eq!(
            error("domain: d\ndescriptors:\n  - key: k\n    value: v\n  - key: k\n    value: v\n"),
            "a.yaml:5: duplicate descriptor `k=v` at this level (first at line 3)"
        );
        assert_eq!(
            error("domain: d\ndescriptors:\n  - key: k\n  - key: k\n"),
            "a.yaml:4: duplicate descriptor `k` at this level (first at line 3)"
        );
        assert_eq!(
            error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n"),
            "a.yaml:4: invalid unit `fortnight` (expected second, minute, hour, day, week, month, year)"
        );
        assert_eq!(
            error(
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: second\n      requests_per_unit: -1\n"
            ),
            "a.yaml:6: `requests_per_unit` must be a whole number from 0 to 4294967295"
        );
        assert_eq!(
            error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unlimited: true, unit: second}\n"),
            "a.yaml:4: `unit` must not be given with `unlimited: true`"
        );
        assert_eq!(
            error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {requests_per_unit: 3}\n"),
            "a.yaml:4: `rate_limit` needs a `unit` (or `unlimited: true`)"
        );
        assert_eq!(
            error(
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: second\n      name: n\n      replaces: [{name: n}]\n"
            ),
            "a.yaml:7: `replaces` must not name its own limit `n`"
        );
        assert_eq!(
            error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, replaces: [{name: ''}]}\n"),
            "a.yaml:4: a `replaces` entry must not have an empty `name`"
        );
        assert_eq!(error("domain: d\ndomain: e\n"), "a.yaml:2: `domain` given twice (first at line 1)");
        assert_eq!(error("descriptors: []\n"), "a.yaml:1: `domain` is required");
        assert_eq!(error("domain: ''\n"), "a.yaml:1: `domain` must not be empty");
        assert_eq!(error("domain: d\ndescriptors:\n  - value: v\n"), "a.yaml:3: a descriptor needs a `key`");
        assert_eq!(
            error("domain: d\ndescriptors:\n  - key: k\n    shadow_mode: maybe\n"),
            "a.yaml:4: `shadow_mode` must be true or false"
        );
        assert_eq!(
            error("domain: d\ndescriptors:\n  - key: k\n    quota_mode: true\n"),
            "a.yaml:4: `quota_mode` is not supported by cachecoord"
        );
        assert_eq!(
            error("domain: d\ndescriptors: {key: k}\n"),
            "a.yaml:2: `descriptors` must be a list, not a mapping"
        );
        assert!(error("domain: d\ndescriptors: [\n").starts_with("a.yaml:"), "syntax errors have a line");
        assert_eq!(error(""), "a.yaml: empty file: expected a mapping with `domain` and `descriptors`");
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let errors = load(&[
            ("a.yaml", "domain: d\ndescriptors:\n  - key: k\n    bogus: 1\n  - key: ''\n"),
            ("b.yaml", "domain: e\nextra: 1\n"),
        ])
        .unwrap_err();
        let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("a.yaml:4: unknown key `bogus`"), "{lines:?}");
        assert_eq!(lines[1], "a.yaml:5: `key` must not be empty");
        assert!(lines[2].starts_with("b.yaml:2: unknown key `extra` in the file"), "{lines:?}");
    }

    #[test]
    fn yaml_types_are_read_as_yaml_v2_reads_them() {
        let rules = rules(
            "domain: 42\ndescriptors:\n  - key: code\n    value: 404\n    shadow_mode: yes\n    rate_limit: {unit: Second, requests_per_unit: 1_000}\n  - key: q\n    rate_limit: {unit: '\x73econd', requests_per_unit: 0}\n",
        );
        let limit = find(&rules, "42", &[("code", "404")]).unwrap();
        assert!(limit.shadow_mode);
        assert_eq!(limit.quota, Quota::PerUnit { requests: 1000, unit: Unit::Second });
        // requests_per_unit 0: every request is over the limit.
        assert_eq!(per(&rules, "42", &[("q", "x")]), Some((0, Unit::Second)));
        assert!(
            error("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: '5'}\n")
                .contains("requests_per_unit")
        );
    }
}
