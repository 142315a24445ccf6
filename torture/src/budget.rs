use crate::cluster::Fallible;
pub async fn run() -> Fallible<(String, bool)> {
    Err("not yet".into())
}
