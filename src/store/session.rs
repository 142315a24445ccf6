//! Session and token-revocation operations: one script call (or one MGET)
//! per call, so one round trip each.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use deadpool_redis::redis::{self, Script, Value};

use crate::metrics::{SessionEvent, TokenEvent};
use sha2::{Digest, Sha256};

use super::{Redis, millis};
use crate::{
    error::{Error, Result},
    keys::Keys,
};

macro_rules! session_script {
    ($file:literal) => {
        super::script($file, concat!(include_str!("lua/session_lib.lua"), include_str!(concat!("lua/", $file))))
    };
}

/// Random bytes in a session id: 128 bits, the OWASP recommendation.
const SESSION_ID_BYTES: usize = 16;

/// A fresh session id for `user_id`: the user's tag (8 hex digits, the hash
/// tag its keys share with the user's index) followed by
/// [`SESSION_ID_BYTES`] from the thread-local CSPRNG (ChaCha, seeded and
/// periodically reseeded from the OS) as URL-safe base64 without padding.
/// The tag adds no secrecy and takes none away: the 128 random bits are the
/// secret.
pub fn new_session_id(user_id: &str) -> String {
    let random = URL_SAFE_NO_PAD.encode(rand::random::<[u8; SESSION_ID_BYTES]>());
    format!("{}{random}", crate::keys::user_tag(user_id))
}

/// The hex SHA-256 of a token: what the denylist stores instead of it.
fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A stored session, as Redis holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// The session id.
    pub id: String,
    /// The user it belongs to.
    pub user_id: String,
    /// Its data: the text of a JSON object.
    pub data: String,
    /// Creation time, Unix ms (Redis clock).
    pub created_at_ms: i64,
    /// Expiry, Unix ms (Redis clock); -1 if someone removed the expiry by hand.
    pub expires_at_ms: i64,
}

/// A new session and the sessions the per-user cap evicted to make room.
#[derive(Clone, Debug)]
pub struct Created {
    /// The new session.
    pub session: SessionRecord,
    /// Ids of the user's sessions evicted, oldest first.
    pub evicted: Vec<String>,
}

/// How UpdateSession changes the data.
#[derive(Clone, Debug)]
pub enum DataUpdate {
    /// The new data: the text of a JSON object.
    Replace(String),
    /// Top-level members to set: (field name, member text `"name":value`).
    Merge(Vec<(String, String)>),
}

/// What an update did.
#[derive(Clone, Debug)]
pub enum Updated {
    /// The session, after the update.
    Done(SessionRecord),
    /// No live session with that id; nothing written.
    NotFound,
    /// The resulting data would be this many bytes, over the limit; nothing written.
    TooLarge(usize),
}

/// What a revocation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// Stored, or extended to the later instant.
    Stored,
    /// The instant is already past: nothing stored.
    AlreadyExpired,
    /// The instant is further ahead than the TTL limit: nothing stored.
    TooFar,
}

/// The Session service's data in Redis.
pub struct SessionStore {
    redis: Redis,
    keys: Keys,
    /// Most live sessions per user; 0 = unlimited.
    max_per_user: u32,
    /// Largest session data, in bytes of JSON (checked again after a merge).
    max_data_bytes: usize,
    /// Longest revocation, from now (`--max-revocation-ttl`).
    max_revocation: Duration,
    scripts: Scripts,
}

/// Loaded once; EVALSHA'd per call.
struct Scripts {
    create: Script,
    get: Script,
    update: Script,
    delete: Script,
    list: Script,
    delete_user: Script,
    revoke: Script,
}

impl SessionStore {
    /// A store under `keys`.
    pub fn new(redis: Redis, keys: Keys, max_per_user: u32, max_data_bytes: usize, max_revocation: Duration) -> Self {
        let scripts = Scripts {
            create: session_script!("session_create.lua"),
            get: session_script!("session_get.lua"),
            update: session_script!("session_update.lua"),
            delete: session_script!("session_delete.lua"),
            list: session_script!("session_list.lua"),
            delete_user: session_script!("session_delete_user.lua"),
            revoke: super::script("revoke_token.lua", include_str!("lua/revoke_token.lua")),
        };
        Self { redis, keys, max_per_user, max_data_bytes, max_revocation, scripts }
    }

    /// The key space without a tenant; `Keys::tenant` derives a tenant's.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Creates a session for `user_id` with `data` (a JSON object's text)
    /// and idle timeout `ttl`, evicting beyond the per-user cap.
    pub async fn create(&self, space: &Keys, user_id: &str, data: &str, ttl: Duration) -> Result<Created> {
        // A taken id is as likely as guessing a 128-bit secret; drawing again
        // is still cheaper than reasoning about it.
        for _ in 0..3 {
            let id = new_session_id(user_id);
            let mut call = self.scripts.create.prepare_invoke();
            call.key(space.session(&id)).key(space.user_sessions(user_id));
            call.arg(&id).arg(user_id).arg(data).arg(millis(ttl)).arg(self.max_per_user);
            let reply: Vec<Value> = self.redis.invoke(&call).await?;
            match reply.as_slice() {
                [Value::Int(0)] => continue,
                [Value::Int(1), Value::Int(created), Value::Int(expires), evicted] => {
                    let evicted: Vec<String> = parse(evicted)?;
                    let session = SessionRecord {
                        id,
                        user_id: user_id.to_string(),
                        data: data.to_string(),
                        created_at_ms: *created,
                        expires_at_ms: *expires,
                    };
                    let metrics = self.redis.metrics();
                    metrics.sessions(SessionEvent::Created, 1);
                    metrics.sessions(SessionEvent::Evicted, evicted.len() as u64);
                    return Ok(Created { session, evicted });
                }
                _ => return Err(unexpected("create", &reply)),
            }
        }
        Err(Error::Internal("three session ids in a row were taken".into()))
    }

    /// Reads a session; with `touch`, slides its idle timeout first, by `ttl`
    /// (which the session then keeps) or else by its own idle timeout.
    pub async fn get(
        &self,
        space: &Keys,
        id: &str,
        touch: bool,
        ttl: Option<Duration>,
    ) -> Result<Option<SessionRecord>> {
        let mut call = self.scripts.get.prepare_invoke();
        call.key(space.session(id));
        call.arg(if touch { "1" } else { "0" }).arg(ttl.map(|ttl| millis(ttl).to_string()).unwrap_or_default());
        let reply: Value = self.redis.invoke(&call).await?;
        match &reply {
            Value::Array(row) if row.is_empty() => Ok(None),
            row => record(row).map(Some),
        }
    }

    /// Replaces or merges a session's data, keeping its expiry.
    pub async fn update(&self, space: &Keys, id: &str, update: &DataUpdate) -> Result<Updated> {
        let mut call = self.scripts.update.prepare_invoke();
        call.key(space.session(id));
        match update {
            DataUpdate::Replace(data) => {
                call.arg("replace").arg(self.max_data_bytes).arg(data);
            }
            DataUpdate::Merge(members) => {
                call.arg("merge").arg(self.max_data_bytes);
                for (name, text) in members {
                    call.arg(name).arg(text);
                }
            }
        }
        let reply: Vec<Value> = self.redis.invoke(&call).await?;
        match reply.as_slice() {
            [Value::Int(0)] => Ok(Updated::NotFound),
            [Value::Int(1), row] => record(row).map(Updated::Done),
            [Value::Int(2), Value::Int(size)] => Ok(Updated::TooLarge(usize::try_from(*size).unwrap_or(usize::MAX))),
            [Value::Int(3)] => Err(Error::Internal(format!("session {id}: stored data is not a JSON object"))),
            _ => Err(unexpected("update", &reply)),
        }
    }

    /// Deletes a session; false when there was no live one.
    pub async fn delete(&self, space: &Keys, id: &str) -> Result<bool> {
        let mut call = self.scripts.delete.prepare_invoke();
        call.key(space.session(id));
        let deleted: i64 = self.redis.invoke(&call).await?;
        Ok(deleted == 1)
    }

    /// A user's live sessions, newest first.
    pub async fn list(&self, space: &Keys, user_id: &str) -> Result<Vec<SessionRecord>> {
        let mut call = self.scripts.list.prepare_invoke();
        call.key(space.user_sessions(user_id));
        let rows: Vec<Value> = self.redis.invoke(&call).await?;
        rows.iter().map(record).collect()
    }

    /// Deletes all of a user's sessions but `keep` (if it is one of them);
    /// returns how many live ones were deleted.
    pub async fn delete_user(&self, space: &Keys, user_id: &str, keep: Option<&str>) -> Result<u64> {
        let mut call = self.scripts.delete_user.prepare_invoke();
        call.key(space.user_sessions(user_id));
        // A session of this user carries the user's tag; any other id cannot
        // be one of them (and names a key in another hash slot).
        if let Some(keep) = keep.filter(|keep| keep.starts_with(&crate::keys::user_tag(user_id))) {
            call.key(space.session(keep));
        }
        self.redis.invoke(&call).await
    }

    /// The longest a revocation may last, from now.
    pub fn max_revocation(&self) -> Duration {
        self.max_revocation
    }

    /// Revokes `token` until `expires_at_ms` (Unix ms).
    pub async fn revoke(&self, space: &Keys, token: &str, expires_at_ms: i64) -> Result<Revocation> {
        let mut call = self.scripts.revoke.prepare_invoke();
        call.key(space.revoked_token(&token_hash(token)));
        call.arg(expires_at_ms).arg(millis(self.max_revocation));
        let outcome: i64 = self.redis.invoke(&call).await?;
        match outcome {
            1 => {
                self.redis.metrics().tokens(TokenEvent::Revoked, 1);
                Ok(Revocation::Stored)
            }
            0 => Ok(Revocation::AlreadyExpired),
            -1 => Ok(Revocation::TooFar),
            other => Err(Error::Internal(format!("revoke returned {other}"))),
        }
    }

    /// For each token, in order, whether it is revoked; one MGET.
    pub async fn check(&self, space: &Keys, tokens: &[String]) -> Result<Vec<bool>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for token in tokens {
            cmd.arg(space.revoked_token(&token_hash(token)));
        }
        let values: Vec<Option<Vec<u8>>> = self.redis.query(&cmd).await?;
        if values.len() != tokens.len() {
            return Err(Error::Internal(format!("MGET returned {} values for {} keys", values.len(), tokens.len())));
        }
        let revoked: Vec<bool> = values.into_iter().map(|value| value.is_some()).collect();
        self.redis.metrics().tokens(TokenEvent::RevokedHit, revoked.iter().filter(|&&r| r).count() as u64);
        Ok(revoked)
    }
}

/// A session row `{id, user, data, created ms, expires ms}` from a script.
fn record(row: &Value) -> Result<SessionRecord> {
    let (id, user_id, data, created_at_ms, expires_at_ms): (String, String, String, i64, i64) = parse(row)?;
    Ok(SessionRecord { id, user_id, data, created_at_ms, expires_at_ms })
}

fn parse<T: redis::FromRedisValue>(value: &Value) -> Result<T> {
    redis::from_redis_value_ref(value).map_err(|e| Error::Internal(format!("unexpected reply: {e}")))
}

fn unexpected(script: &str, reply: &[Value]) -> Error {
    Error::Internal(format!("{script} returned {reply:?}"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn session_ids_are_url_safe_128_bit_and_do_not_collide_in_100k() {
        let mut seen = HashSet::with_capacity(100_000);
        for _ in 0..100_000 {
            let id = new_session_id("user-1");
            // The user's tag, then 16 bytes → 22 base64 characters, no padding.
            let (tag, random) = id.split_at(crate::keys::USER_TAG_LEN);
            assert_eq!(tag, crate::keys::user_tag("user-1"));
            assert_eq!(random.len(), 22, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{id}");
            assert_eq!(URL_SAFE_NO_PAD.decode(random).expect("decodes").len(), 16);
            assert!(seen.insert(id), "collision");
        }
    }

    #[test]
    fn token_hash_is_hex_sha256() {
        // SHA-256("abc"), from FIPS 180-2.
        assert_eq!(token_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
