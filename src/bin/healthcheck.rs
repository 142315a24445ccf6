//! `cachecoord-healthcheck [ADDR]`: exits 0 when the server at ADDR reports
//! SERVING over grpc.health.v1, 1 otherwise. ADDR defaults to 127.0.0.1 on
//! the port of `CACHECOORD_LISTEN` (else 50051), so the check follows the
//! server's own setting inside a container.
//!
//! TLS: an `https://` ADDR, or the default one when the server's own
//! `CACHECOORD_TLS_CERT` (or `--tls-ca`) is set. The server is verified
//! against `--tls-ca` when given; otherwise, with `CACHECOORD_TLS_CERT` set
//! (the server's certificate, in the same container), the server must
//! present exactly that certificate; otherwise against the web's public
//! roots. `--tls-cert`/`--tls-key` give a client certificate for a server
//! that requires one.
//! When the server requires a key for health (`--auth-health-needs-key`),
//! set `CACHECOORD_HEALTHCHECK_API_KEY`.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::Parser;
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// Health check for cachecoord (exit 0: SERVING).
#[derive(Parser)]
#[command(name = "cachecoord-healthcheck", version)]
struct Args {
    /// Server address, e.g. http://127.0.0.1:50051 or https://cache.internal:50051
    /// (default: 127.0.0.1 on the port of CACHECOORD_LISTEN, https when
    /// CACHECOORD_TLS_CERT or --tls-ca is set).
    addr: Option<String>,

    /// PEM file of the CA that signed the server's certificate.
    #[arg(long, env = "CACHECOORD_HEALTHCHECK_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// Name the server's certificate must be valid for (default: the
    /// address's host).
    #[arg(long, env = "CACHECOORD_HEALTHCHECK_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,

    /// PEM file of a client certificate, for a server with --tls-client-ca.
    #[arg(long, env = "CACHECOORD_HEALTHCHECK_TLS_CERT")]
    tls_cert: Option<PathBuf>,

    /// PEM file of the key of --tls-cert.
    #[arg(long, env = "CACHECOORD_HEALTHCHECK_TLS_KEY")]
    tls_key: Option<PathBuf>,

    /// The server's own certificate (its --tls-cert, read from the same
    /// variable): without --tls-ca, the server must present exactly it.
    #[arg(long, env = "CACHECOORD_TLS_CERT")]
    pin_cert: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let addr = args.addr.clone().unwrap_or_else(|| {
        let port = std::env::var("CACHECOORD_LISTEN")
            .ok()
            .and_then(|listen| listen.parse::<std::net::SocketAddr>().ok())
            .map_or(50051, |listen| listen.port());
        let scheme = if args.tls_ca.is_some() || args.pin_cert.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{port}")
    });
    let check = async {
        let channel = connect(&addr, &args).await?;
        let mut client = HealthClient::new(channel);
        let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
        if let Ok(key) = std::env::var("CACHECOORD_HEALTHCHECK_API_KEY") {
            let value = format!("Bearer {key}")
                .parse()
                .map_err(|_| "CACHECOORD_HEALTHCHECK_API_KEY is not a valid header value")?;
            request.metadata_mut().insert("authorization", value);
        }
        let response = client.check(request).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(response.into_inner().status())
    };
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok(ServingStatus::Serving)) => ExitCode::SUCCESS,
        Ok(Ok(status)) => {
            eprintln!("{addr}: {}", status.as_str_name());
            ExitCode::FAILURE
        }
        Ok(Err(err)) => {
            eprintln!("{addr}: {err}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("{addr}: no answer within 3s");
            ExitCode::FAILURE
        }
    }
}

/// A channel to `addr`, over TLS for https:// (the handshake is ours, so the
/// server's certificate can be pinned).
async fn connect(addr: &str, args: &Args) -> Result<Channel, String> {
    let Some(rest) = addr.strip_prefix("https://") else {
        return Endpoint::from_shared(addr.to_string()).map_err(|e| e.to_string())?.connect().await.map_err(error_text);
    };
    let endpoint = Endpoint::from_shared(format!("http://{rest}")).map_err(|e| e.to_string())?;
    let host = endpoint.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
    let name = args.tls_server_name.clone().unwrap_or_else(|| host.clone());
    let name = ServerName::try_from(name).map_err(|e| format!("--tls-server-name: {e}"))?;
    let config = Arc::new(client_config(args)?);
    let connector = tower::service_fn(move |uri: http::Uri| {
        let (config, name) = (config.clone(), name.clone());
        async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let tcp = tokio::net::TcpStream::connect((host, uri.port_u16().unwrap_or(443))).await?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    endpoint.connect_with_connector(connector).await.map_err(error_text)
}

/// An error with its causes (tonic's own Display stops at "transport error").
fn error_text(err: tonic::transport::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn client_config(args: &Args) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if let Some(ca) = &args.tls_ca {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("--tls-ca: {e}"))? {
            roots.add(cert.map_err(|e| format!("--tls-ca: {e}"))?).map_err(|e| format!("--tls-ca: {e}"))?;
        }
        builder.with_root_certificates(roots)
    } else if let Some(pin) = &args.pin_cert {
        let cert = CertificateDer::from_pem_file(pin).map_err(|e| format!("CACHECOORD_TLS_CERT: {e}"))?;
        builder.dangerous().with_custom_certificate_verifier(Arc::new(Pinned { cert, algorithms }))
    } else {
        builder.with_root_certificates(RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })
    };
    let mut config = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--tls-cert: {e}"))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--tls-key: {e}"))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| format!("--tls-cert/--tls-key: {e}"))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts exactly one certificate: the server's own, read from its file.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("the server's certificate is not the one in CACHECOORD_TLS_CERT".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
