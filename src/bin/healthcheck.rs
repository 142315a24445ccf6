//! `cachecoord-healthcheck [ADDR]`: exits 0 when the server at ADDR (default
//! http://127.0.0.1:50051) reports SERVING over grpc.health.v1, 1 otherwise.
//! For container health checks, where no other gRPC client is at hand.

use std::{process::ExitCode, time::Duration};

use tonic::transport::Endpoint;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:50051".to_string());
    let check = async {
        let channel = Endpoint::from_shared(addr.clone()).map_err(|e| e.to_string())?.connect().await.map_err(|e| e.to_string())?;
        let mut client = HealthClient::new(channel);
        let response = client.check(HealthCheckRequest { service: String::new() }).await.map_err(|e| e.to_string())?;
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
