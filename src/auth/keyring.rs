//! The API keys file (`--auth-keys-file`, TOML) and checking a presented key
//! against it.
//!
//! ```toml
//! [[keys]]
//! id = "checkout-web"                 # names the key in logs; 1..64 of A-Z a-z 0-9 _ -
//! tenant = "shop"                     # whose key space its calls use
//! secret_sha256 = "9f86d0…"           # SHA-256 of the whole key, hex
//! allow = ["cachecoord.v1.CacheService", "cachecoord.v1.LockService/Acquire"]  # or ["*"]
//!
//! [tenants.shop]                      # optional: tighter request limits
//! max_value_bytes = 65536
//! max_ttl = "1d"
//! ```
//!
//! A key is `cc.<id>.<secret>`: the id lets the check find its entry
//! without scanning, the 256-bit secret is what makes it unguessable, and
//! only a hash of the whole key is stored (a leaked file grants nothing).

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::{Caller, Limits};

/// Every key begins with this, so secret scanners and people can tell one.
const KEY_PREFIX: &str = "cc.";

/// Bytes of randomness in a key's secret.
const SECRET_BYTES: usize = 32;

/// The services a key may name in `allow` (besides `*`).
pub const SERVICES: &[&str] = &[
    "cachecoord.v1.CacheService",
    "cachecoord.v1.SessionService",
    "cachecoord.v1.RateLimitService",
    "cachecoord.v1.LockService",
    "cachecoord.v1.StatsService",
    "envoy.service.ratelimit.v3.RateLimitService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    keys: Vec<KeyEntry>,
    #[serde(default)]
    tenants: HashMap<String, TenantEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    tenant: String,
    secret_sha256: String,
    allow: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    max_key_bytes: Option<usize>,
    max_value_bytes: Option<usize>,
    max_batch: Option<usize>,
    max_ttl: Option<String>,
}

/// The keys in force.
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: HashMap<String, Key>,
}

#[derive(Debug)]
struct Key {
    hash: [u8; 32],
    /// `*`, services (`pkg.Service`) and methods (`pkg.Service/Method`).
    allow: HashSet<String>,
    caller: Caller,
}

/// Why a call was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No key, or not a key in force (which of the two is not said).
    Unauthenticated,
    /// A key in force that may not call this method.
    Denied,
}

impl KeyRing {
    /// Parses a keys file; `limits` are the process's, which a tenant's may
    /// only tighten. The error names the entry and the rule.
    pub fn parse(text: &str, limits: &Limits) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|err| err.to_string().trim_end().replace('\n', " "))?;
        let mut tenants = HashMap::new();
        for (name, entry) in &file.tenants {
            name_rule(name).map_err(|rule| format!("tenants.{name}: the name {rule}"))?;
            let tightened = tighten(limits, entry).map_err(|rule| format!("tenants.{name}.{rule}"))?;
            tenants.insert(name.as_str(), tightened);
        }
        let mut keys = HashMap::new();
        for (i, entry) in file.keys.into_iter().enumerate() {
            let at = |field: &str, rule: &str| format!("keys[{i}] ({:?}).{field}: {rule}", entry.id);
            name_rule(&entry.id).map_err(|rule| at("id", rule))?;
            name_rule(&entry.tenant).map_err(|rule| at("tenant", rule))?;
            let hash = parse_hash(&entry.secret_sha256).ok_or_else(|| at("secret_sha256", "must be 64 hex digits"))?;
            if entry.allow.is_empty() {
                return Err(at("allow", "must name at least one service or method, or \"*\""));
            }
            for grant in &entry.allow {
                let service = grant.split_once('/').map_or(grant.as_str(), |(service, _)| service);
                if grant != "*" && !SERVICES.contains(&service) {
                    return Err(at("allow", &format!("{grant:?} names no service of this server")));
                }
            }
            let caller = Caller {
                key_id: entry.id.clone(),
                tenant: entry.tenant.clone(),
                limits: tenants.get(entry.tenant.as_str()).copied().unwrap_or(*limits),
            };
            let key = Key { hash, allow: entry.allow.iter().cloned().collect(), caller };
            if keys.insert(entry.id.clone(), key).is_some() {
                return Err(at("id", "is used by an earlier key"));
            }
        }
        Ok(Self { keys })
    }

    /// How many keys are in force.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is in force (every call is refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The caller that `presented` (a whole key) stands for, if it may call
    /// `path` (`/pkg.Service/Method`).
    pub fn admit(&self, presented: &str, path: &str) -> Result<&Caller, Refusal> {
        let id = presented.strip_prefix(KEY_PREFIX).and_then(|rest| rest.split_once('.')).map(|(id, _)| id);
        let key = id.and_then(|id| self.keys.get(id));
        // Hash and compare even for an unknown id, in constant time, so
        // neither the answer nor its timing tells which ids exist.
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let expected = key.map_or([0; 32], |key| key.hash);
        let (Some(key), true) = (key, bool::from(hash.ct_eq(&expected))) else {
            return Err(Refusal::Unauthenticated);
        };
        let method = path.trim_start_matches('/');
        let service = method.split_once('/').map_or(method, |(service, _)| service);
        if key.allow.contains("*") || key.allow.contains(service) || key.allow.contains(method) {
            Ok(&key.caller)
        } else {
            Err(Refusal::Denied)
        }
    }
}

/// A fresh key for `id` and the SHA-256 (hex) to put in the keys file.
pub fn new_key(id: &str) -> Result<(String, String), String> {
    name_rule(id).map_err(|rule| format!("the id {rule}"))?;
    let secret = URL_SAFE_NO_PAD.encode(rand::random::<[u8; SECRET_BYTES]>());
    let key = format!("{KEY_PREFIX}{id}.{secret}");
    let hash = hex(&Sha256::digest(key.as_bytes()));
    Ok((key, hash))
}

/// A fresh key and its entry for the keys file, checked as the file would
/// be.
pub fn entry(id: &str, tenant: &str, allow: &[String]) -> Result<(String, String), String> {
    let (key, hash) = new_key(id)?;
    let allow: Vec<String> = allow.iter().map(|grant| format!("{grant:?}")).collect();
    let entry = format!(
        "\n[[keys]]\nid = {id:?}\ntenant = {tenant:?}\nsecret_sha256 = \"{hash}\"\nallow = [{}]\n",
        allow.join(", ")
    );
    let limits = Limits {
        max_key_bytes: 1,
        max_value_bytes: 1,
        max_batch: 1,
        max_ttl: Duration::from_secs(1),
        max_rate_limits: 1,
        max_deltas: 1,
        max_tags: 1,
    };
    KeyRing::parse(&entry, &limits)?;
    Ok((key, entry))
}

/// Key ids and tenant names: 1..64 of `A-Z a-z 0-9 _ -` (a tenant name goes
/// into Redis key names, an id into log lines).
fn name_rule(name: &str) -> Result<(), &'static str> {
    let ok =
        (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err("must be 1..64 of A-Z a-z 0-9 _ -") }
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The process limits with a tenant's tighter ones; a tenant limit above the
/// process's is an error (the process limits are what Redis was sized for).
fn tighten(process: &Limits, tenant: &TenantEntry) -> Result<Limits, String> {
    fn pick<T: PartialOrd + std::fmt::Debug>(field: &str, process: T, tenant: Option<T>) -> Result<T, String> {
        match tenant {
            Some(value) if value > process => {
                Err(format!("{field}: must be at most the process's limit ({process:?}), got {value:?}"))
            }
            Some(value) => Ok(value),
            None => Ok(process),
        }
    }
    let max_ttl = match &tenant.max_ttl {
        None => None,
        Some(text) => Some(
            humantime::parse_duration(text)
                .ok()
                .filter(|ttl| *ttl >= Duration::from_millis(1))
                .ok_or_else(|| format!("max_ttl: {text:?} is not a duration of at least 1ms (e.g. \"1d\")"))?,
        ),
    };
    Ok(Limits {
        max_key_bytes: pick("max_key_bytes", process.max_key_bytes, tenant.max_key_bytes)?,
        max_value_bytes: pick("max_value_bytes", process.max_value_bytes, tenant.max_value_bytes)?,
        max_batch: pick("max_batch", process.max_batch, tenant.max_batch)?,
        max_ttl: pick("max_ttl", process.max_ttl, max_ttl)?,
        ..*process
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_key_bytes: 512,
            max_value_bytes: 1 << 20,
            max_batch: 1000,
            max_ttl: Duration::from_secs(30 * 86_400),
            max_rate_limits: 200,
            max_deltas: 100,
            max_tags: 100,
        }
    }

    fn ring(entries: &str) -> Result<KeyRing, String> {
        KeyRing::parse(entries, &limits())
    }

    fn entry(id: &str, tenant: &str, hash: &str, allow: &str) -> String {
        format!("[[keys]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nsecret_sha256 = \"{hash}\"\nallow = {allow}\n")
    }

    #[test]
    fn a_new_key_is_admitted_for_what_it_allows_and_nothing_else() {
        let (key, hash) = new_key("web").expect("key");
        assert!(key.starts_with("cc.web.") && key.len() == "cc.web.".len() + 43, "{key}");
        let ring = ring(&entry(
            "web",
            "shop",
            &hash,
            r#"["cachecoord.v1.CacheService", "cachecoord.v1.LockService/Acquire"]"#,
        ))
        .expect("parses");
        let caller = ring.admit(&key, "/cachecoord.v1.CacheService/Get").expect("admitted");
        assert_eq!((caller.key_id.as_str(), caller.tenant.as_str()), ("web", "shop"));
        assert_eq!(caller.limits, limits());
        assert!(ring.admit(&key, "/cachecoord.v1.LockService/Acquire").is_ok());
        assert_eq!(ring.admit(&key, "/cachecoord.v1.LockService/Release"), Err(Refusal::Denied));
        assert_eq!(ring.admit(&key, "/cachecoord.v1.SessionService/GetSession"), Err(Refusal::Denied));
    }

    #[test]
    fn wrong_unknown_and_malformed_keys_are_all_just_unauthenticated() {
        let (key, hash) = new_key("web").expect("key");
        let ring = ring(&entry("web", "shop", &hash, r#"["*"]"#)).expect("parses");
        let (other, _) = new_key("web").expect("key");
        let (unknown, _) = new_key("nobody").expect("key");
        for presented in [other.as_str(), unknown.as_str(), "", "cc.", "cc.web", "web", &key[..key.len() - 1]] {
            assert_eq!(
                ring.admit(presented, "/cachecoord.v1.CacheService/Get"),
                Err(Refusal::Unauthenticated),
                "{presented:?}"
            );
        }
        assert!(ring.admit(&key, "/anything.at.All/Method").is_ok(), "* allows every method");
    }

    #[test]
    fn tenant_limits_tighten_and_may_not_loosen() {
        let (_, hash) = new_key("web").expect("key");
        let text = entry("web", "shop", &hash, r#"["*"]"#)
            + "[tenants.shop]\nmax_value_bytes = 100\nmax_batch = 1000\nmax_ttl = \"1h\"\n";
        let ring = ring(&text).expect("parses");
        let tightened = ring.keys["web"].caller.limits;
        assert_eq!(tightened.max_value_bytes, 100);
        assert_eq!(tightened.max_batch, 1000, "at the process limit is allowed");
        assert_eq!(tightened.max_ttl, Duration::from_secs(3600));
        assert_eq!(tightened.max_key_bytes, 512);

        let looser = entry("web", "shop", &hash, r#"["*"]"#) + "[tenants.shop]\nmax_batch = 1001\n";
        let err = KeyRing::parse(&looser, &limits()).expect_err("rejected");
        assert!(err.contains("tenants.shop.max_batch: must be at most the process's limit (1000)"), "{err}");
        let bad_ttl = entry("web", "shop", &hash, r#"["*"]"#) + "[tenants.shop]\nmax_ttl = \"soon\"\n";
        assert!(KeyRing::parse(&bad_ttl, &limits()).expect_err("rejected").contains("tenants.shop.max_ttl"));
    }

    #[test]
    fn bad_entries_are_named() {
        let (_, hash) = new_key("web").expect("key");
        let cases = [
            (entry("web", "shop:x", &hash, r#"["*"]"#), r#"keys[0] ("web").tenant: must be 1..64"#),
            (entry("", "shop", &hash, r#"["*"]"#), r#"keys[0] ("").id: must be 1..64"#),
            (entry("web", "shop", "abc", r#"["*"]"#), "secret_sha256: must be 64 hex digits"),
            (entry("web", "shop", &hash, "[]"), "allow: must name at least one"),
            (entry("web", "shop", &hash, r#"["CacheService"]"#), r#""CacheService" names no service"#),
            (
                entry("web", "a", &hash, r#"["*"]"#) + &entry("web", "b", &hash, r#"["*"]"#),
                r#"keys[1] ("web").id: is used"#,
            ),
            ("[[keys]]\nid = \"web\"\n".to_string(), "missing field"),
            ("[[keys]\n".to_string(), "line 1"),
            (entry("web", "shop", &hash, r#"["*"]"#) + "color = 1\n", "unknown field"),
        ];
        for (text, wanted) in cases {
            let err = ring(&text).expect_err(&text);
            assert!(err.contains(wanted), "{err:?} should contain {wanted:?}");
        }
        let longest = "t".repeat(64);
        assert!(ring(&entry("web", &longest, &hash, r#"["*"]"#)).is_ok(), "64 characters is the limit");
        assert!(ring(&entry("web", &format!("{longest}t"), &hash, r#"["*"]"#)).is_err(), "65 is past it");
        assert!(ring("").expect("an empty file parses").is_empty());
    }
}
