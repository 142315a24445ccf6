//! Certificates made for a test with rcgen: CAs, server and client
//! certificates, written as PEM files into a temp dir.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};

/// A certificate authority of the test's own.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

/// What a leaf is for.
#[derive(Clone, Copy)]
pub enum Use {
    Server,
    Client,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA certificate");
        Self { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A certificate for `localhost` and 127.0.0.1 with subject CN=`name`.
    pub fn leaf(&self, name: &str, usage: Use) -> Leaf {
        self.leaf_with(name, usage, false)
    }

    /// Like `leaf`, but expired in 2021.
    pub fn expired_leaf(&self, name: &str, usage: Use) -> Leaf {
        self.leaf_with(name, usage, true)
    }

    fn leaf_with(&self, name: &str, usage: Use, expired: bool) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        // Most significant first, as in most certificates: RFC 4514 prints
        // it the other way round (CN=name,O=cachecoord tests). (rcgen starts
        // with a CN of its own.)
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "cachecoord tests");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![match usage {
            Use::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Use::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("leaf certificate");
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }
}

/// A temp dir of PEM files.
pub struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `contents` to `name` (atomically: a reader sees the old file
    /// or the new one, as with a Kubernetes secret update).
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        let temp = self.path(&format!(".{name}.new"));
        std::fs::write(&temp, contents).expect("write PEM");
        std::fs::rename(&temp, &path).expect("rename PEM");
        path
    }

    /// Writes `leaf` as `{name}.pem` and `{name}.key`.
    pub fn write_leaf(&self, name: &str, leaf: &Leaf) {
        self.write(&format!("{name}.pem"), &leaf.cert);
        self.write(&format!("{name}.key"), &leaf.key);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
