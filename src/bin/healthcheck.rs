//! `cachecoord-healthcheck [ADDR]`: exits 0 when the server at ADDR reports
//! SERVING over grpc.health.v1, 1 otherwise. ADDR defaults to
//! http://127.0.0.1 on the port of `CACHECOORD_LISTEN` (else 50051), so the
//! check follows the server's own setting inside a container. When the
//! server requires a key for health (`--auth-health-needs-key`), set
//! `CACHECOORD_HEALTHCHECK_API_KEY`.

use std::{process::ExitCode, time::Duration};

use tonic::transport::Endpoint;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let addr = std::env::args().nth(1).unwrap_or_else(|| {
        let port = std::env::var("CACHECOORD_LISTEN")
            .ok()
            .and_then(|listen| listen.parse::<std::net::SocketAddr>().ok())
            .map_or(50051, |listen| listen.port());
        format!("http://127.0.0.1:{port}")
    });
    let check = async {
        let channel = Endpoint::from_shared(addr.clone())
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
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
