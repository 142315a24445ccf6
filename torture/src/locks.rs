//! TODO
use crate::cluster::Fallible;
pub async fn run(_d: std::time::Duration) -> Fallible<(String, bool)> {
    Err("not yet".into())
}
