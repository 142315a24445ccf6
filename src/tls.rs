//! TLS on the gRPC port: flags, certificate loading and reloading, and the
//! accept loop.
//!
//! The server's rustls `ServerConfig` (certificate chain, key, client-CA
//! verifier) sits in an [`ArcSwap`]. Each accepted connection takes the
//! config current at that moment for its handshake and keeps it for its whole
//! life; a reload (SIGHUP, or a change of the files' contents, checked every
//! `--tls-reload-poll`) swaps in a new config for the connections that come
//! after. A reload that fails (unreadable file, bad PEM, key not matching the
//! certificate, bad CA) keeps the config in use and logs why.
//!
//! tonic's own TLS (`ServerTlsConfig`) reads its certificate once, so the
//! server is given the handshaken streams through `serve_with_incoming`
//! instead. The streams are tokio-rustls `TlsStream`s, which tonic knows: a
//! handler sees the peer's address through `Request::remote_addr` and the
//! verified client chain through `Request::peer_certs`; [`client_subject`]
//! names the client certificate's subject.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::Duration,
};

use arc_swap::ArcSwap;
use clap::ValueEnum;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Whether a client must show a certificate signed by `--tls-client-ca`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClientAuth {
    /// Every connection needs a valid client certificate.
    Required,
    /// A client may connect without one; a certificate it shows must be valid.
    Optional,
}

/// The `--tls-*` flags (flattened into [`crate::config::Config`]).
#[derive(Clone, Debug, clap::Args)]
pub struct TlsConfig {
    /// PEM file with the server's certificate chain, leaf first. With
    /// --tls-key, the gRPC port speaks TLS only. Re-read on SIGHUP and when
    /// it changes.
    #[arg(long, env = "CACHECOORD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file with the private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "CACHECOORD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM file of the CA(s) whose client certificates are accepted (mTLS).
    #[arg(long, env = "CACHECOORD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// With --tls-client-ca: whether a client certificate is required or
    /// optional.
    #[arg(long, env = "CACHECOORD_TLS_CLIENT_AUTH", value_enum, default_value = "required")]
    pub tls_client_auth: ClientAuth,

    /// How often the TLS files are checked for changes; 0s: only on SIGHUP.
    #[arg(long, env = "CACHECOORD_TLS_RELOAD_POLL", default_value = "1s", value_parser = duration)]
    pub tls_reload_poll: Duration,

    /// Longest a client may take to finish the TLS handshake.
    #[arg(long, env = "CACHECOORD_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub tls_handshake_timeout: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 2s, 1h, 30d)"))
}

impl TlsConfig {
    /// True when the gRPC port speaks TLS.
    pub fn enabled(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// What is wrong with the flags (each a sentence naming the flag).
    pub fn problems(&self) -> Vec<String> {
        let mut bad = Vec::new();
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bad.push("--tls-cert and --tls-key go together".to_string());
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            bad.push("--tls-client-ca needs --tls-cert and --tls-key".to_string());
        }
        if self.tls_handshake_timeout.is_zero() {
            bad.push("--tls-handshake-timeout must be positive".to_string());
        }
        bad
    }
}

/// The TLS side of the gRPC port: the config in force, kept current.
pub struct TlsServer {
    current: Arc<ArcSwap<ServerConfig>>,
    handshake_timeout: Duration,
}

impl TlsServer {
    /// Loads the files now (an error stops start-up) and keeps them current
    /// in a task that ends with the server. `None` when TLS is off.
    pub fn start(config: &TlsConfig) -> Result<Option<Self>, String> {
        let Some(files) = Files::paths(config) else { return Ok(None) };
        let contents = files.read()?;
        let server_config = build(config.tls_client_auth, &contents)?;
        log_loaded("TLS on the gRPC port", &contents, config);
        let current = Arc::new(ArcSwap::from_pointee(server_config));
        // Registered before returning, so a SIGHUP sent once the server is up
        // never meets the default action (which ends the process).
        let hangup = crate::reload::hangup();
        tokio::spawn(keep_current(Arc::downgrade(&current), files, config.clone(), contents, hangup));
        Ok(Some(Self { current, handshake_timeout: config.tls_handshake_timeout }))
    }

    /// The handshaken connections of `listener`, for `serve_with_incoming`.
    /// Handshakes run concurrently, each within the handshake timeout; a
    /// failed one is logged and dropped. The listener closes when the
    /// stream is dropped.
    pub fn incoming(self, listener: TcpListener) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = tx.closed() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: back off briefly.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(self.current.load_full());
                let tx = tx.clone();
                let timeout = self.handshake_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(err)) => tracing::info!(%peer, %err, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, ?timeout, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// The subject of the verified client certificate of the connection a
/// request came on (RFC 4514, e.g. `CN=billing,O=Example`); `None` without
/// TLS or without a client certificate. Takes the extensions of a
/// `tonic::Request` or of an `http::Request` (in a tower layer).
pub fn client_subject(extensions: &http::Extensions) -> Option<String> {
    let info = extensions.get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    describe(certs.first()?).map(|cert| cert.subject)
}

/// The paths to watch.
#[derive(Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// The files' contents, compared to notice a change.
#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Files {
    fn paths(config: &TlsConfig) -> Option<Self> {
        Some(Self {
            cert: config.tls_cert.clone()?,
            key: config.tls_key.clone()?,
            client_ca: config.tls_client_ca.clone(),
        })
    }

    fn read(&self) -> Result<Contents, String> {
        let read = |flag: &str, path: &Path| std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()));
        Ok(Contents {
            cert: read("--tls-cert", &self.cert)?,
            key: read("--tls-key", &self.key)?,
            client_ca: self.client_ca.as_deref().map(|path| read("--tls-client-ca", path)).transpose()?,
        })
    }
}

/// A rustls server config from the files' contents, or why not.
fn build(client_auth: ClientAuth, contents: &Contents) -> Result<ServerConfig, String> {
    let certs = CertificateDer::pem_slice_iter(&contents.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--tls-cert: {e}"))?;
    if certs.is_empty() {
        return Err("--tls-cert: no CERTIFICATE in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| format!("--tls-key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &contents.client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("--tls-client-ca: {e}"))?;
                roots.add(cert).map_err(|e| format!("--tls-client-ca: {e}"))?;
            }
            if roots.is_empty() {
                return Err("--tls-client-ca: no CERTIFICATE in the file".into());
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| format!("--tls-client-ca: {e}"))?)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    // gRPC is HTTP/2; clients such as grpcio insist on ALPN saying so.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Logs the serving certificate's subject and expiry (a warning once
/// expired or within 14 days of it).
fn log_loaded(what: &str, contents: &Contents, config: &TlsConfig) {
    let leaf = CertificateDer::pem_slice_iter(&contents.cert).next().and_then(Result::ok);
    let Some(cert) = leaf.as_ref().and_then(|leaf| describe(leaf)) else {
        tracing::info!("{what}: certificate loaded (expiry not readable)");
        return;
    };
    let client_auth = match (&config.tls_client_ca, config.tls_client_auth) {
        (None, _) => "off",
        (Some(_), ClientAuth::Required) => "required",
        (Some(_), ClientAuth::Optional) => "optional",
    };
    let Some(not_after) = cert.not_after else {
        tracing::info!(subject = %cert.subject, client_auth, "{what}: certificate loaded (expiry not readable)");
        return;
    };
    let left = not_after.as_second().saturating_sub(jiff::Timestamp::now().as_second());
    let days_left = left.div_euclid(86_400);
    if left <= 0 {
        tracing::error!(subject = %cert.subject, %not_after, client_auth, "{what}: the certificate has EXPIRED");
    } else if days_left < 14 {
        tracing::warn!(subject = %cert.subject, %not_after, days_left, client_auth, "{what}: the certificate expires soon");
    } else {
        tracing::info!(subject = %cert.subject, %not_after, days_left, client_auth, "{what}: certificate loaded");
    }
}

async fn keep_current(
    current: Weak<ArcSwap<ServerConfig>>,
    files: Files,
    config: TlsConfig,
    mut last: Contents,
    mut hangup: crate::reload::Hangup,
) {
    // The last failure logged, so a broken file is logged once, not every poll.
    let mut last_failure: Option<String> = None;
    let poll = config.tls_reload_poll;
    loop {
        let forced = tokio::select! {
            () = crate::reload::next_hangup(&mut hangup) => true,
            () = tokio::time::sleep(poll), if !poll.is_zero() => false,
        };
        // The server is gone.
        let Some(current) = current.upgrade() else { return };
        let result = files.read().and_then(|contents| {
            if !forced && contents == last {
                return Ok(None);
            }
            build(config.tls_client_auth, &contents).map(|built| Some((built, contents)))
        });
        match result {
            Ok(None) => {}
            Ok(Some((built, contents))) => {
                current.store(Arc::new(built));
                log_loaded("TLS reloaded", &contents, &config);
                last = contents;
                last_failure = None;
            }
            Err(err) => {
                if forced || last_failure.as_ref() != Some(&err) {
                    tracing::error!(%err, "TLS reload failed; keeping the certificate in use");
                }
                last_failure = Some(err);
            }
        }
    }
}

/// What the logs and handlers need from a certificate.
#[derive(Debug, PartialEq, Eq)]
pub struct CertSummary {
    /// The subject, RFC 4514 (last RDN first), e.g. `CN=billing,O=Example`.
    pub subject: String,
    /// notAfter; `None` if it does not parse.
    pub not_after: Option<jiff::Timestamp>,
}

/// Reads subject and notAfter from a DER X.509 certificate; `None` when it
/// is not one. (Just enough DER for these two fields: the full parsers are
/// large, and rustls has already checked the certificate.)
pub fn describe(cert: &[u8]) -> Option<CertSummary> {
    let mut input = cert;
    let mut certificate = der::expect(&mut input, 0x30)?;
    let mut tbs = der::expect(&mut certificate, 0x30)?;
    let (tag, _) = der::next(&mut tbs)?;
    if tag == 0xa0 {
        der::next(&mut tbs)?; // version was explicit; this is the serial number
    }
    der::expect(&mut tbs, 0x30)?; // signature algorithm
    der::expect(&mut tbs, 0x30)?; // issuer
    let mut validity = der::expect(&mut tbs, 0x30)?;
    der::next(&mut validity)?; // notBefore
    let (tag, not_after) = der::next(&mut validity)?;
    let subject = der::expect(&mut tbs, 0x30)?;
    Some(CertSummary { subject: der::name(subject)?, not_after: der::time(tag, not_after) })
}

/// The little DER reading [`describe`] needs.
mod der {
    use std::fmt::Write;

    /// The next element: its tag and contents.
    pub fn next<'a>(input: &mut &'a [u8]) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let octets = usize::from(first & 0x7f);
            if octets == 0 || octets > 4 || rest.len() < octets {
                return None;
            }
            let len = rest[..octets].iter().fold(0usize, |len, &b| (len << 8) | usize::from(b));
            rest = &rest[octets..];
            len
        };
        if rest.len() < len {
            return None;
        }
        let (body, after) = rest.split_at(len);
        *input = after;
        Some((tag, body))
    }

    /// The next element's contents, if it has tag `want`.
    pub fn expect<'a>(input: &mut &'a [u8], want: u8) -> Option<&'a [u8]> {
        let (tag, body) = next(input)?;
        (tag == want).then_some(body)
    }

    /// UTCTime (0x17) or GeneralizedTime (0x18), UTC ("Z") as RFC 5280 asks.
    pub fn time(tag: u8, body: &[u8]) -> Option<jiff::Timestamp> {
        let text = std::str::from_utf8(body).ok()?.strip_suffix('Z')?;
        let full = match tag {
            0x17 => {
                let yy: i16 = text.get(..2)?.parse().ok()?;
                format!("{}{}", if yy >= 50 { 19 } else { 20 }, text)
            }
            0x18 => text.to_string(),
            _ => return None,
        };
        if full.len() != 14 || !full.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let field = |range: std::ops::Range<usize>| full.get(range)?.parse::<i16>().ok();
        let (year, month, day) = (field(0..4)?, i8::try_from(field(4..6)?).ok()?, i8::try_from(field(6..8)?).ok()?);
        let (hour, minute, second) =
            (i8::try_from(field(8..10)?).ok()?, i8::try_from(field(10..12)?).ok()?, i8::try_from(field(12..14)?).ok()?);
        let datetime = jiff::civil::DateTime::new(year, month, day, hour, minute, second, 0).ok()?;
        jiff::tz::TimeZone::UTC.to_timestamp(datetime).ok()
    }

    /// A Name (SEQUENCE OF SET OF AttributeTypeAndValue) as RFC 4514 text.
    pub fn name(mut rdns: &[u8]) -> Option<String> {
        let mut parts = Vec::new();
        while !rdns.is_empty() {
            let mut set = expect(&mut rdns, 0x31)?;
            let mut attributes = Vec::new();
            while !set.is_empty() {
                let mut pair = expect(&mut set, 0x30)?;
                let oid = expect(&mut pair, 0x06)?;
                let (tag, value) = next(&mut pair)?;
                attributes.push(format!("{}={}", attribute(oid), value_text(tag, value)));
            }
            parts.push(attributes.join("+"));
        }
        parts.reverse();
        Some(parts.join(","))
    }

    fn attribute(oid: &[u8]) -> String {
        match oid {
            [0x55, 0x04, 0x03] => "CN".into(),
            [0x55, 0x04, 0x06] => "C".into(),
            [0x55, 0x04, 0x07] => "L".into(),
            [0x55, 0x04, 0x08] => "ST".into(),
            [0x55, 0x04, 0x09] => "STREET".into(),
            [0x55, 0x04, 0x0a] => "O".into(),
            [0x55, 0x04, 0x0b] => "OU".into(),
            [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".into(),
            [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID".into(),
            _ => dotted(oid),
        }
    }

    fn dotted(oid: &[u8]) -> String {
        let mut arcs: Vec<u64> = Vec::new();
        let mut value = 0u64;
        for &byte in oid {
            value = (value << 7) | u64::from(byte & 0x7f);
            if byte & 0x80 == 0 {
                if arcs.is_empty() {
                    let first = (value / 40).min(2);
                    arcs.extend([first, value - first * 40]);
                } else {
                    arcs.push(value);
                }
                value = 0;
            }
        }
        arcs.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
    }

    /// Text strings as themselves (escaped per RFC 4514), anything else as
    /// `#` and the hex of its encoding.
    fn value_text(tag: u8, value: &[u8]) -> String {
        let text = match tag {
            0x0c | 0x13 | 0x16 | 0x14 => std::str::from_utf8(value).ok(),
            _ => None,
        };
        let Some(text) = text else {
            let mut hex = format!("#{tag:02x}{:02x}", value.len());
            for byte in value {
                let _ = write!(hex, "{byte:02x}");
            }
            return hex;
        };
        let mut out = String::with_capacity(text.len());
        for (i, c) in text.chars().enumerate() {
            let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
                || (i == 0 && matches!(c, '#' | ' '))
                || (i + 1 == text.chars().count() && c == ' ');
            if special {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject;

    use super::{ClientAuth, Contents, build, der, describe};

    fn self_signed(name: &str) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let cert = params.self_signed(&key).expect("certificate");
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }

    #[test]
    fn a_matching_pair_loads_and_anything_else_says_which_file() {
        let (cert, key) = self_signed("a");
        let (other_cert, other_key) = self_signed("b");
        let load = |cert: &[u8], key: &[u8], client_ca: Option<&[u8]>| {
            let contents =
                Contents { cert: cert.to_vec(), key: key.to_vec(), client_ca: client_ca.map(<[u8]>::to_vec) };
            build(ClientAuth::Required, &contents)
        };
        let config = load(&cert, &key, Some(&other_cert)).expect("loads");
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        let err = load(&cert, &other_key, None).expect_err("key of another certificate");
        assert!(err.starts_with("--tls-cert/--tls-key"), "{err}");
        assert!(load(b"garbage", &key, None).expect_err("no PEM").starts_with("--tls-cert"));
        assert!(load(&cert, b"garbage", None).expect_err("no key").starts_with("--tls-key"));
        assert!(load(&cert, &key, Some(b"garbage")).expect_err("no CA").starts_with("--tls-client-ca"));
    }

    #[test]
    fn flags_are_checked_with_the_rest() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            let args = std::iter::once("cachecoord").chain(args.iter().copied());
            crate::config::Config::try_parse_from(args).expect("parses").validate()
        };
        assert_eq!(parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"]), Ok(()));
        let err = parse(&["--tls-cert", "c.pem", "--max-batch", "0"]).expect_err("no key");
        assert!(err.contains("--tls-cert and --tls-key go together") && err.contains("--max-batch"), "{err}");
        let err = parse(&["--tls-client-ca", "ca.pem"]).expect_err("no server certificate");
        assert!(err.contains("--tls-client-ca needs --tls-cert"), "{err}");
    }

    #[test]
    fn subject_and_expiry_are_read() {
        let (cert, _) = self_signed("svc, one");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&cert).expect("PEM");
        let summary = describe(&der).expect("X.509");
        assert_eq!(summary.subject, "CN=svc\\, one");
        assert_eq!(summary.not_after.expect("notAfter").to_string(), "2049-12-31T00:00:00Z");
    }

    #[test]
    fn times_parse_in_both_encodings() {
        let utc = der::time(0x17, b"491231235959Z").expect("UTCTime");
        assert_eq!(utc.to_string(), "2049-12-31T23:59:59Z");
        let old = der::time(0x17, b"500101000000Z").expect("UTCTime");
        assert_eq!(old.to_string(), "1950-01-01T00:00:00Z");
        let general = der::time(0x18, b"40960101000000Z").expect("GeneralizedTime");
        assert_eq!(general.to_string(), "4096-01-01T00:00:00Z");
        assert_eq!(der::time(0x18, b"2024010100000"), None);
    }

    #[test]
    fn names_read_last_rdn_first_and_escape() {
        // SEQUENCE { SET { SEQ { O, "A,B" } }, SET { SEQ { CN, "svc" } } }
        let name = [
            0x31, 0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x03, b'A', b',', b'B', 0x31, 0x0c, 0x30, 0x0a,
            0x06, 0x03, 0x55, 0x04, 0x03, 0x13, 0x03, b's', b'v', b'c',
        ];
        assert_eq!(der::name(&name).as_deref(), Some("CN=svc,O=A\\,B"));
    }
}
