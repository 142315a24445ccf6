//! Envoy's rate limit service (`envoy.service.ratelimit.v3`) on cachecoord's
//! own rate-limit counters.
//!
//! # Layout
//! - [`config`]: envoyproxy/ratelimit's YAML files → [`Rules`], with errors
//!   naming file, line and reason; [`yaml`] is the line-aware YAML tree it reads.
//! - [`reload`]: keeps the rules current (SIGHUP, file changes), keeping the
//!   old rules when new files are bad.
//! - Here: the rules, matching a descriptor to its limit, [`plan`] (a request
//!   → the limits to check, one per counter) and [`answer`] (the store's
//!   decisions → one status per descriptor).
//!
//! Every limited descriptor of a request becomes one fixed-window limit of
//! [`crate::store::rate_limit`], all checked and consumed in one script call:
//! all-or-nothing, exact under concurrency, on the same counters that
//! `cachecoord.v1.RateLimitService.Check` uses for the key [`counter_key`].

pub mod config;
pub mod reload;
pub mod yaml;

use std::{borrow::Cow, collections::HashMap, time::Duration};

use crate::store::rate_limit::Decision;

/// The time units of envoyproxy/ratelimit, with its lengths (a month is 30
/// days, a year 365). Windows are aligned to the Unix epoch, as there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// 1 s.
    Second,
    /// 60 s.
    Minute,
    /// 3,600 s.
    Hour,
    /// 86,400 s.
    Day,
    /// 7 days.
    Week,
    /// 30 days.
    Month,
    /// 365 days.
    Year,
}

impl Unit {
    /// Every unit, in the order of [`Unit::NAMES`].
    const ALL: [Unit; 7] = [Unit::Second, Unit::Minute, Unit::Hour, Unit::Day, Unit::Week, Unit::Month, Unit::Year];
    /// The units' names in the config (any case).
    pub const NAMES: [&'static str; 7] = ["second", "minute", "hour", "day", "week", "month", "year"];

    /// The unit named `name`, in any case.
    pub fn from_name(name: &str) -> Option<Unit> {
        let i = Self::NAMES.iter().position(|n| n.eq_ignore_ascii_case(name))?;
        Some(Self::ALL[i])
    }

    /// Its length in seconds.
    pub fn seconds(self) -> u64 {
        const DAY: u64 = 86_400;
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => DAY,
            Unit::Week => 7 * DAY,
            Unit::Month => 30 * DAY,
            Unit::Year => 365 * DAY,
        }
    }
}

/// How much a limit allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Quota {
    /// Always OK, never counted.
    Unlimited,
    /// `requests` per `unit` (0: every request is over the limit).
    PerUnit {
        /// Requests (hits) per window.
        requests: u32,
        /// The window.
        unit: Unit,
    },
}

/// A descriptor's `rate_limit`, with the descriptor's flags that shape it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// How much it allows.
    pub quota: Quota,
    /// Its name, which other limits' `replaces` may refer to.
    pub name: Option<String>,
    /// Names of limits this one switches off when both apply to a request.
    pub replaces: Vec<String>,
    /// Counted and reported, but never denies (`shadow_mode`).
    pub shadow_mode: bool,
    /// envoyproxy/ratelimit's per-value metric names; accepted, no effect
    /// until cachecoord has per-descriptor metrics.
    pub detailed_metric: bool,
}

/// Every domain's descriptor tree.
#[derive(Debug, Default)]
pub struct Rules {
    /// Domain → its top level.
    domains: HashMap<String, Level>,
}

/// One level of a descriptor tree: entry key → how its values match.
#[derive(Debug, Default)]
struct Level {
    keys: HashMap<String, Matcher>,
}

/// The descriptors of one key at one level.
#[derive(Debug, Default)]
struct Matcher {
    /// `value: v`.
    exact: HashMap<String, Node>,
    /// Values with `*`, split at each `*`, in config order (first match wins).
    wildcards: Vec<(Vec<String>, Node)>,
    /// No `value`: any value.
    any: Option<Box<Node>>,
}

/// One descriptor of the config.
#[derive(Debug, Default)]
struct Node {
    /// The limit that applies when a request's last entry lands here.
    limit: Option<RateLimit>,
    /// The next level.
    children: Level,
}

impl Matcher {
    /// Most specific first: the exact value, then the wildcards in order,
    /// then the key alone.
    fn lookup(&self, value: &str) -> Option<&Node> {
        self.exact
            .get(value)
            .or_else(|| self.wildcards.iter().find(|(parts, _)| wildcard_match(parts, value)).map(|(_, node)| node))
            .or(self.any.as_deref())
    }
}

/// Whether `value` matches a pattern split at its `*`s (each `*` matches any
/// run of characters, the empty one included).
fn wildcard_match(parts: &[String], value: &str) -> bool {
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else { return false };
    if parts.len() == 1 {
        return first == value;
    }
    let Some(mut rest) = value.strip_prefix(first.as_str()) else { return false };
    let Some(middle) = rest.strip_suffix(last.as_str()) else { return false };
    rest = middle;
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part.as_str()) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

impl Rules {
    /// Whether the config defines `domain`.
    pub fn has_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
    }

    /// How many domains and limits the rules hold, for logs.
    pub fn size(&self) -> (usize, usize) {
        fn limits(level: &Level) -> usize {
            level
                .keys
                .values()
                .flat_map(|m| m.exact.values().chain(m.wildcards.iter().map(|(_, n)| n)).chain(m.any.as_deref()))
                .map(|node| usize::from(node.limit.is_some()) + limits(&node.children))
                .sum()
        }
        (self.domains.len(), self.domains.values().map(limits).sum())
    }

    /// The limit for a descriptor's entries, as envoyproxy/ratelimit finds
    /// it: walk the tree one entry per level, taking the most specific match
    /// at each; the limit of the node reached by the last entry applies. A
    /// walk that finds no match, or reaches a node without children before
    /// the last entry, finds no limit.
    pub fn find(&self, domain: &str, entries: &[(&str, &str)]) -> Option<&RateLimit> {
        let mut level = self.domains.get(domain)?;
        for (i, (key, value)) in entries.iter().enumerate() {
            let node = level.keys.get(*key)?.lookup(value)?;
            if i + 1 == entries.len() {
                return node.limit.as_ref();
            }
            if node.children.keys.is_empty() {
                return None;
            }
            level = &node.children;
        }
        None
    }
}

/// The rate-limit key (of `cachecoord.v1.RateLimitService`) whose fixed
/// window counts a descriptor: `rls:<domain>:<key>=<value>:...`, with `%`,
/// `:` and `=` in each part written `%25`, `%3A`, `%3D` so that different
/// descriptors never share a key.
pub fn counter_key(domain: &str, entries: &[(&str, &str)]) -> String {
    fn push(out: &mut String, part: &str) {
        for c in part.chars() {
            match c {
                '%' => out.push_str("%25"),
                ':' => out.push_str("%3A"),
                '=' => out.push_str("%3D"),
                c => out.push(c),
            }
        }
    }
    let mut key = String::from("rls:");
    push(&mut key, domain);
    for (k, v) in entries {
        key.push(':');
        push(&mut key, k);
        key.push('=');
        push(&mut key, v);
    }
    key
}

/// One descriptor of a request, already validated.
#[derive(Clone, Debug)]
pub struct Descriptor<'a> {
    /// Its entries, in order.
    pub entries: Vec<(&'a str, &'a str)>,
    /// Hits it takes; 0 checks without taking any.
    pub hits: u64,
    /// The request's own limit for it (Envoy's `limit` override).
    pub limit_override: Option<(u32, Unit)>,
}

/// What applies to one descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No limit: unmatched, or replaced by another descriptor's limit.
    NoLimit,
    /// `unlimited: true`.
    Unlimited,
    /// A limit, checked as `parts[part]`.
    Limited {
        /// Requests per unit.
        requests: u32,
        /// The window.
        unit: Unit,
        /// The limit's name, if it has one.
        name: Option<String>,
        /// Reported, never denying.
        shadow: bool,
        /// The counter that decides it.
        part: usize,
    },
}

/// One counter a request checks (descriptors with the same entries share one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    /// Its RateLimitService key ([`counter_key`]).
    pub key: String,
    /// Requests per window.
    pub limit: u64,
    /// The window, in ms.
    pub period_ms: u64,
    /// Hits taken (1 when only checked).
    pub cost: u64,
    /// Only checked: every descriptor on it had no hits.
    pub peek: bool,
    /// Its denial does not deny the request: every descriptor on it is in
    /// shadow mode.
    pub advisory: bool,
}

/// A request, resolved against the rules.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// One per descriptor, in request order.
    pub verdicts: Vec<Verdict>,
    /// The counters to check, all in one store call.
    pub counters: Vec<Counter>,
}

/// Resolves each descriptor to its limit (the most specific match; the
/// request's override instead, when it gives one for a configured domain),
/// drops limits named in another applying limit's `replaces`, and gathers the
/// counters to check.
pub fn plan(rules: &Rules, domain: &str, descriptors: &[Descriptor<'_>]) -> Plan {
    // Like envoyproxy/ratelimit, an unknown domain limits nothing, overrides included.
    if !rules.has_domain(domain) {
        return Plan { verdicts: vec![Verdict::NoLimit; descriptors.len()], counters: Vec::new() };
    }
    // Borrowed from the rules, so a request copies no limit (names,
    // replaces); an override is the request's own.
    let found: Vec<Option<Cow<'_, RateLimit>>> = descriptors
        .iter()
        .map(|d| match d.limit_override {
            Some((requests, unit)) => Some(Cow::Owned(RateLimit {
                quota: Quota::PerUnit { requests, unit },
                name: None,
                replaces: Vec::new(),
                shadow_mode: false,
                detailed_metric: false,
            })),
            None => rules.find(domain, &d.entries).map(Cow::Borrowed),
        })
        .collect();
    let replaced: Vec<&str> = found.iter().flatten().flat_map(|l| l.replaces.iter().map(String::as_str)).collect();

    let mut plan = Plan::default();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for (descriptor, limit) in descriptors.iter().zip(found.iter().map(Option::as_deref)) {
        let verdict = match limit {
            None => Verdict::NoLimit,
            Some(limit) if limit.name.as_deref().is_some_and(|name| replaced.contains(&name)) => Verdict::NoLimit,
            Some(RateLimit { quota: Quota::Unlimited, .. }) => Verdict::Unlimited,
            Some(limit @ RateLimit { quota: Quota::PerUnit { requests, unit }, .. }) => {
                let key = counter_key(domain, &descriptor.entries);
                let part = *by_key.entry(key.clone()).or_insert_with(|| {
                    plan.counters.push(Counter {
                        key,
                        limit: u64::from(*requests),
                        period_ms: unit.seconds() * 1000,
                        cost: 0,
                        peek: true,
                        advisory: true,
                    });
                    plan.counters.len() - 1
                });
                // Descriptors on one counter add up, as repeated INCRBYs would.
                let counter = &mut plan.counters[part];
                counter.cost = counter.cost.saturating_add(descriptor.hits);
                counter.peek &= descriptor.hits == 0;
                counter.advisory &= limit.shadow_mode;
                Verdict::Limited {
                    requests: *requests,
                    unit: *unit,
                    name: limit.name.clone(),
                    shadow: limit.shadow_mode,
                    part,
                }
            }
        };
        plan.verdicts.push(verdict);
    }
    for counter in &mut plan.counters {
        if counter.peek {
            // Checking only: would one more hit fit?
            counter.cost = 1;
        }
    }
    plan
}

/// One descriptor's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Over the limit (never for a shadow-mode limit).
    pub over: bool,
    /// The limit that applied: requests, unit, name.
    pub limit: Option<(u32, Unit, Option<String>)>,
    /// Hits left in the window after this request (u32::MAX when unlimited).
    pub remaining: u32,
    /// Until the counter is back to zero: the end of its window when it
    /// counts anything, else zero. `None` without a limit.
    pub reset: Option<Duration>,
}

/// The statuses of a planned request, given the store's decision for each
/// counter; logs shadow-mode limits that would have denied.
pub fn answer(domain: &str, plan: &Plan, decisions: &[Decision]) -> Vec<Status> {
    plan.verdicts
        .iter()
        .map(|verdict| match verdict {
            Verdict::NoLimit => Status { over: false, limit: None, remaining: 0, reset: None },
            Verdict::Unlimited => Status { over: false, limit: None, remaining: u32::MAX, reset: None },
            Verdict::Limited { requests, unit, name, shadow, part } => {
                let decision = decisions.get(*part);
                let allowed = decision.is_some_and(|d| d.allowed);
                if !allowed && *shadow {
                    tracing::info!(domain, key = %plan.counters[*part].key, "shadow_mode: over the limit, answered OK");
                }
                Status {
                    over: !allowed && !shadow,
                    limit: Some((*requests, *unit, name.clone())),
                    remaining: decision.map_or(0, |d| u32::try_from(d.remaining).unwrap_or(u32::MAX)),
                    reset: Some(decision.map_or(Duration::ZERO, |d| d.reset_after)),
                }
            }
        })
        .collect()
}

/// The status the `RateLimit-*` headers describe, as envoyproxy/ratelimit
/// picks it: the first over the limit, else the limited one with the fewest
/// hits left.
pub fn header_status(statuses: &[Status]) -> Option<&Status> {
    statuses
        .iter()
        .find(|s| s.over)
        .or_else(|| statuses.iter().filter(|s| s.limit.is_some()).min_by_key(|s| s.remaining))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rls::config::{Source, parse};

    fn rules(text: &str) -> Rules {
        parse(&[Source { file: "r.yaml".into(), text: text.into() }]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn descriptor<'a>(entries: &[(&'a str, &'a str)], hits: u64) -> Descriptor<'a> {
        Descriptor { entries: entries.to_vec(), hits, limit_override: None }
    }

    const RULES: &str = r#"
domain: d
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 10, name: per_a}
  - key: b
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: c
    rate_limit: {unlimited: true, replaces: [{name: per_a}]}
"#;

    #[test]
    fn counter_keys_are_readable_and_unambiguous() {
        assert_eq!(counter_key("edge", &[("path", "/login"), ("user", "42")]), "rls:edge:path=/login:user=42");
        assert_eq!(counter_key("e:1", &[("k=", "a:b%")]), "rls:e%3A1:k%3D=a%3Ab%25");
        assert_ne!(counter_key("d", &[("a", "1:b=2")]), counter_key("d", &[("a", "1"), ("b", "2")]));
    }

    #[test]
    fn a_plan_has_one_counter_per_key() {
        let rules = rules(RULES);
        let plan = plan(
            &rules,
            "d",
            &[descriptor(&[("a", "1")], 3), descriptor(&[("a", "1")], 2), descriptor(&[("a", "2")], 0)],
        );
        assert_eq!(plan.counters.len(), 2);
        assert_eq!(plan.counters[0].key, "rls:d:a=1");
        assert_eq!((plan.counters[0].cost, plan.counters[0].peek), (5, false));
        assert_eq!((plan.counters[0].limit, plan.counters[0].period_ms), (10, 60_000));
        // Check only: decided as one hit, never consumed.
        assert_eq!((plan.counters[1].cost, plan.counters[1].peek), (1, true));
    }

    #[test]
    fn replaces_unlimited_shadow_and_overrides() {
        let rules = rules(RULES);
        let plan = plan(
            &rules,
            "d",
            &[descriptor(&[("a", "1")], 1), descriptor(&[("c", "x")], 1), descriptor(&[("b", "x")], 1)],
        );
        assert_eq!(plan.verdicts[0], Verdict::NoLimit, "per_a is replaced by c's limit");
        assert_eq!(plan.verdicts[1], Verdict::Unlimited);
        assert!(matches!(plan.verdicts[2], Verdict::Limited { shadow: true, part: 0, .. }));
        assert!(plan.counters[0].advisory);

        let mut over = descriptor(&[("zzz", "1")], 1);
        over.limit_override = Some((7, Unit::Hour));
        let plan = self::plan(&rules, "d", &[over.clone()]);
        assert_eq!(plan.counters[0].limit, 7);
        assert_eq!(plan.counters[0].period_ms, 3_600_000);
        // An unknown domain limits nothing, not even with an override.
        assert_eq!(self::plan(&rules, "other", &[over]).verdicts, vec![Verdict::NoLimit]);
    }

    #[test]
    fn answers_follow_decisions() {
        let rules = rules(RULES);
        let plan = plan(
            &rules,
            "d",
            &[descriptor(&[("a", "1")], 1), descriptor(&[("b", "1")], 1), descriptor(&[("q", "1")], 1)],
        );
        let deny =
            Decision { allowed: false, remaining: 0, reset_after: Duration::from_secs(5), retry_after: Duration::ZERO };
        let statuses = answer("d", &plan, &[deny.clone(), deny]);
        assert!(statuses[0].over);
        assert!(!statuses[1].over, "shadow mode answers OK");
        assert_eq!(statuses[1].remaining, 0);
        assert_eq!(statuses[2], Status { over: false, limit: None, remaining: 0, reset: None });
        assert_eq!(header_status(&statuses), Some(&statuses[0]));
    }

    #[test]
    fn wildcards_match_like_envoyproxy_ratelimit() {
        let split = |p: &str| p.split('*').map(str::to_string).collect::<Vec<_>>();
        assert!(wildcard_match(&split("/api/*"), "/api/"));
        assert!(wildcard_match(&split("/api/*"), "/api/v1/x"));
        assert!(!wildcard_match(&split("/api/*"), "/ap"));
        assert!(wildcard_match(&split("*.png"), "a.png"));
        assert!(wildcard_match(&split("a*b*c"), "abc"));
        assert!(wildcard_match(&split("a*b*c"), "a-b-b-c"));
        assert!(!wildcard_match(&split("a*b*c"), "acb"));
        assert!(!wildcard_match(&split("ab*ba"), "aba"), "prefix and suffix may not overlap");
        assert!(wildcard_match(&split("*"), ""));
    }
}
