//! `--redis-url`: which Redis topology, where, and with which credentials.
//!
//! The scheme names the topology, in the convention of python `limits` and
//! envoyproxy/ratelimit:
//!
//! - `redis://[[user]:password@]host:port[/db]` (`rediss://` for TLS): one
//!   Redis; parsed by redis-rs itself, so everything it accepts works.
//! - `redis+cluster://[[user]:password@]host:port[,host:port...]`
//!   (`rediss+cluster://`): a Redis Cluster, reached through any of the seed
//!   nodes; no database number (a cluster has only db 0).
//! - `redis+sentinel://[[user]:password@]host:port[,host:port...]/master[/db]`
//!   (`rediss+sentinel://`): the master named `master`, as the sentinels say
//!   it is; the password is the master's, and `?sentinel_password=` gives the
//!   sentinels' own if they have one. With TLS, sentinels and master alike.
//!
//! The TLS files (`--redis-tls-ca`, `--redis-tls-cert`, `--redis-tls-key`)
//! apply to every TLS connection of the topology.

use percent_encoding::percent_decode_str;

/// A parsed `--redis-url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One Redis: the URL as redis-rs reads it.
    Standalone(String),
    /// A Redis Cluster.
    Cluster {
        /// Seed nodes; the rest of the cluster is discovered from them.
        nodes: Vec<Node>,
        /// Credentials for every node.
        auth: Auth,
        /// TLS to every node.
        tls: bool,
    },
    /// A master found through Redis Sentinel.
    Sentinel {
        /// The sentinels to ask.
        sentinels: Vec<Node>,
        /// The monitored master's name.
        master: String,
        /// Credentials for the master (and its replicas).
        auth: Auth,
        /// The sentinels' own password, if they require one.
        sentinel_password: Option<String>,
        /// Database number on the master.
        db: i64,
        /// TLS to sentinels and master.
        tls: bool,
    },
}

/// One `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

/// Redis AUTH credentials from the URL's userinfo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Auth {
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Topology {
    /// Parses `url`; the error names what is wrong (never the password).
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url.split_once("://").ok_or("must start with a scheme such as redis://")?;
        let (kind, tls) = match scheme {
            "redis" | "rediss" => {
                return match redis::parse_redis_url(url).map(|_| redis::Client::open(url)) {
                    Some(Ok(_)) => Ok(Self::Standalone(url.to_string())),
                    _ => Err("is not a valid redis:// or rediss:// URL".into()),
                };
            }
            "redis+cluster" => ("cluster", false),
            "rediss+cluster" => ("cluster", true),
            "redis+sentinel" => ("sentinel", false),
            "rediss+sentinel" => ("sentinel", true),
            other => {
                return Err(format!(
                    "scheme {other}:// is not one of redis, rediss, redis+cluster, rediss+cluster, \
                     redis+sentinel, rediss+sentinel"
                ));
            }
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (Some(userinfo), rest),
            None => (None, rest),
        };
        let auth = parse_auth(userinfo)?;
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let nodes = hosts.split(',').map(parse_node).collect::<Result<Vec<_>, _>>()?;
        let mut sentinel_password = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sentinel_password", value)) if kind == "sentinel" => sentinel_password = Some(decode(value)?),
                _ => return Err(format!("unknown query parameter {:?}", pair.split('=').next().unwrap_or(""))),
            }
        }
        if kind == "cluster" {
            if !path.is_empty() {
                return Err("a cluster URL takes no path (Redis Cluster has only database 0)".into());
            }
            return Ok(Self::Cluster { nodes, auth, tls });
        }
        let mut parts = path.split('/');
        let master = decode(parts.next().unwrap_or(""))?;
        if master.is_empty() {
            return Err("a sentinel URL names the master: redis+sentinel://host:port/<master>[/db]".into());
        }
        let db = match parts.next() {
            None | Some("") => 0,
            Some(db) => db.parse::<i64>().map_err(|_| format!("database {db:?} is not a number"))?,
        };
        if parts.next().is_some() {
            return Err("a sentinel URL's path is /<master>[/db]".into());
        }
        Ok(Self::Sentinel { sentinels: nodes, master, auth, sentinel_password, db, tls })
    }
}

fn parse_auth(userinfo: Option<&str>) -> Result<Auth, String> {
    let Some(userinfo) = userinfo else { return Ok(Auth::default()) };
    let (username, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (userinfo, None),
    };
    let username = Some(decode(username)?).filter(|u| !u.is_empty());
    let password = password.map(decode).transpose()?.filter(|p| !p.is_empty());
    Ok(Auth { username, password })
}

fn parse_node(node: &str) -> Result<Node, String> {
    let (host, port) = match node.rsplit_once(':') {
        Some((host, port)) => {
            (host, port.parse::<u16>().map_err(|_| format!("port {port:?} of {node:?} is not a port number"))?)
        }
        None => (node, 6379),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("host missing in {node:?}"));
    }
    Ok(Node { host: host.to_string(), port })
}

fn decode(text: &str) -> Result<String, String> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| "percent-encoding in the URL is not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: u16) -> Node {
        Node { host: host.into(), port }
    }

    #[test]
    fn standalone_urls_are_left_to_redis_rs() {
        assert_eq!(
            Topology::parse("redis://:pw@127.0.0.1:6380/2"),
            Ok(Topology::Standalone("redis://:pw@127.0.0.1:6380/2".into()))
        );
        assert!(Topology::parse("rediss://host:6380").is_ok());
        assert!(Topology::parse("redis://host:notaport").is_err());
    }

    #[test]
    fn cluster_urls_list_seed_nodes() {
        let parsed = Topology::parse("rediss+cluster://app:s%40cret@a:7000,b:7001,[::1]:7002").unwrap();
        assert_eq!(
            parsed,
            Topology::Cluster {
                nodes: vec![node("a", 7000), node("b", 7001), node("::1", 7002)],
                auth: Auth { username: Some("app".into()), password: Some("s@cret".into()) },
                tls: true,
            }
        );
        assert!(Topology::parse("redis+cluster://a:7000/1").unwrap_err().contains("no path"));
    }

    #[test]
    fn sentinel_urls_name_the_master_and_may_give_a_db() {
        let parsed = Topology::parse("redis+sentinel://:pw@s1:26379,s2/mymaster/3?sentinel_password=x").unwrap();
        assert_eq!(
            parsed,
            Topology::Sentinel {
                sentinels: vec![node("s1", 26379), node("s2", 6379)],
                master: "mymaster".into(),
                auth: Auth { username: None, password: Some("pw".into()) },
                sentinel_password: Some("x".into()),
                db: 3,
                tls: false,
            }
        );
        assert!(Topology::parse("redis+sentinel://s1:26379").unwrap_err().contains("names the master"));
        assert!(Topology::parse("redis+sentinel://s1:26379/m/x").unwrap_err().contains("not a number"));
    }

    #[test]
    fn unknown_schemes_and_parameters_are_named() {
        assert!(Topology::parse("http://x").unwrap_err().contains("http://"));
        assert!(Topology::parse("redis+cluster://a:1?foo=1").unwrap_err().contains("foo"));
        assert!(Topology::parse("no scheme").is_err());
    }
}
