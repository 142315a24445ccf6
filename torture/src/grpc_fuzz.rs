use crate::cluster::Fallible;
pub async fn run(_c: u64, _s: u64) -> Fallible<(String, bool)> {
    Err("not yet".into())
}
