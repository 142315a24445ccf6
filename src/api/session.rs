//! `cachecoord.v1.SessionService`.
//!
//! Session data arrives as a `google.protobuf.Struct` and is stored as the
//! plain JSON text of an object (serde_json), so any Redis client can read it;
//! this file converts between the two.

use std::time::Duration;

use prost_types::{ListValue, Struct, Timestamp, Value as ProtoValue, value::Kind};
use serde_json::{Map, Number, Value as Json};
use tonic::{Request, Response, Status};

use super::Limits;
use crate::{
    error::Error,
    proto::{self, session_service_server::SessionService},
    store::session::{DataUpdate, Revocation, SessionRecord, SessionStore, Updated},
};

/// Session RPC handlers.
pub struct SessionApi {
    store: SessionStore,
    limits: Limits,
    /// Idle timeout of a session created without one.
    default_ttl: Duration,
    /// Largest session data, in bytes of JSON (`--session-max-data-bytes`).
    max_data_bytes: usize,
}

impl SessionApi {
    /// Handlers over `store`.
    pub fn new(store: SessionStore, limits: Limits, default_ttl: Duration, max_data_bytes: usize) -> Self {
        Self { store, limits, default_ttl, max_data_bytes }
    }

    /// The JSON text of `data` (absent: `{}`), within the value limit.
    fn data_json(&self, data: Option<&Struct>) -> Result<String, Error> {
        let object = match data {
            Some(data) => struct_to_json(data, "data")?,
            None => Map::new(),
        };
        let text = Json::Object(object).to_string();
        self.data_size(text.len())?;
        Ok(text)
    }

    fn data_size(&self, len: usize) -> Result<(), Error> {
        if len > self.max_data_bytes { Err(self.too_large(len)) } else { Ok(()) }
    }

    fn too_large(&self, len: usize) -> Error {
        Error::invalid("data", format!("must be at most {} bytes as JSON, is {len}", self.max_data_bytes))
    }

    /// A token: 1 byte up to the value limit (only its hash is stored).
    fn token(&self, limits: &Limits, field: impl Fn() -> String, token: &str) -> Result<(), Error> {
        if token.is_empty() {
            return Err(Error::invalid(field(), "must not be empty"));
        }
        limits.value(field, token.as_bytes())
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn create_session(
        &self,
        request: Request<proto::CreateSessionRequest>,
    ) -> Result<Response<proto::CreateSessionResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "user_id".into(), &request.user_id)?;
        let data = self.data_json(request.data.as_ref())?;
        let ttl = limits.ttl(|| "ttl".into(), request.ttl, self.default_ttl)?;
        let created = self.store.create(&space, &request.user_id, &data, ttl).await?;
        Ok(Response::new(proto::CreateSessionResponse {
            session: Some(to_proto(created.session)?),
            evicted_session_ids: created.evicted,
        }))
    }

    async fn get_session(
        &self,
        request: Request<proto::GetSessionRequest>,
    ) -> Result<Response<proto::GetSessionResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "session_id".into(), &request.session_id)?;
        let session = self.store.get(&space, &request.session_id, request.touch, None).await?;
        let session = session.map(to_proto).transpose()?;
        Ok(Response::new(proto::GetSessionResponse { found: session.is_some(), session }))
    }

    async fn touch_session(
        &self,
        request: Request<proto::TouchSessionRequest>,
    ) -> Result<Response<proto::TouchSessionResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "session_id".into(), &request.session_id)?;
        let ttl = request.ttl.map(|ttl| limits.span(|| "ttl".into(), ttl, false)).transpose()?;
        let session = self.store.get(&space, &request.session_id, true, ttl).await?;
        let session = session.map(to_proto).transpose()?;
        Ok(Response::new(proto::TouchSessionResponse { found: session.is_some(), session }))
    }

    async fn update_session(
        &self,
        request: Request<proto::UpdateSessionRequest>,
    ) -> Result<Response<proto::UpdateSessionResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "session_id".into(), &request.session_id)?;
        let update = if request.merge {
            let fields = request.data.map(|data| data.fields).unwrap_or_default();
            let members = fields
                .iter()
                .map(|(name, value)| Ok((name.clone(), merge_member(name, value)?)))
                .collect::<Result<Vec<_>, Error>>()?;
            // The merged result holds every member sent (as `{m1,m2}`), so a
            // request over the limit is refused here; the script checks the result.
            let commas = members.len().saturating_sub(1);
            self.data_size(2 + commas + members.iter().map(|(_, text)| text.len()).sum::<usize>())?;
            DataUpdate::Merge(members)
        } else {
            DataUpdate::Replace(self.data_json(request.data.as_ref())?)
        };
        let session = match self.store.update(&space, &request.session_id, &update).await? {
            Updated::Done(session) => Some(to_proto(session)?),
            Updated::NotFound => None,
            Updated::TooLarge(len) => return Err(self.too_large(len).into()),
        };
        Ok(Response::new(proto::UpdateSessionResponse { found: session.is_some(), session }))
    }

    async fn delete_session(
        &self,
        request: Request<proto::DeleteSessionRequest>,
    ) -> Result<Response<proto::DeleteSessionResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "session_id".into(), &request.session_id)?;
        let deleted = self.store.delete(&space, &request.session_id).await?;
        Ok(Response::new(proto::DeleteSessionResponse { deleted }))
    }

    async fn list_user_sessions(
        &self,
        request: Request<proto::ListUserSessionsRequest>,
    ) -> Result<Response<proto::ListUserSessionsResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "user_id".into(), &request.user_id)?;
        let sessions = self.store.list(&space, &request.user_id).await?;
        let sessions = sessions.into_iter().map(to_proto).collect::<Result<_, _>>()?;
        Ok(Response::new(proto::ListUserSessionsResponse { sessions }))
    }

    async fn delete_user_sessions(
        &self,
        request: Request<proto::DeleteUserSessionsRequest>,
    ) -> Result<Response<proto::DeleteUserSessionsResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.key(|| "user_id".into(), &request.user_id)?;
        if let Some(keep) = &request.keep_session_id {
            limits.key(|| "keep_session_id".into(), keep)?;
        }
        let deleted = self.store.delete_user(&space, &request.user_id, request.keep_session_id.as_deref()).await?;
        Ok(Response::new(proto::DeleteUserSessionsResponse { deleted }))
    }

    async fn revoke_token(
        &self,
        request: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::RevokeTokenResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        self.token(&limits, || "token".into(), &request.token)?;
        let expires_at = request.expires_at.ok_or_else(|| Error::invalid("expires_at", "is required"))?;
        if !(0..1_000_000_000).contains(&expires_at.nanos) {
            return Err(Error::invalid("expires_at", "nanos must be 0..999999999").into());
        }
        // Rounded up: the revocation lasts at least as long as the token.
        let expires_at_ms = expires_at
            .seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(expires_at.nanos.unsigned_abs().div_ceil(1_000_000)));
        let revoked = match self.store.revoke(&space, &request.token, expires_at_ms).await? {
            Revocation::Stored => true,
            Revocation::AlreadyExpired => false,
            Revocation::TooFar => {
                let max = humantime::format_duration(self.store.max_revocation());
                return Err(Error::invalid("expires_at", format!("must be at most {max} from now")).into());
            }
        };
        Ok(Response::new(proto::RevokeTokenResponse { revoked }))
    }

    async fn check_tokens(
        &self,
        request: Request<proto::CheckTokensRequest>,
    ) -> Result<Response<proto::CheckTokensResponse>, Status> {
        let super::Scope { space, limits } = super::scope(self.store.keys(), &self.limits, &request);
        let request = request.into_inner();
        limits.batch("tokens", request.tokens.len())?;
        for (i, token) in request.tokens.iter().enumerate() {
            self.token(&limits, || format!("tokens[{i}]"), token)?;
        }
        let revoked = self.store.check(&space, &request.tokens).await?;
        Ok(Response::new(proto::CheckTokensResponse { revoked }))
    }
}

/// A stored session as the proto message.
fn to_proto(record: SessionRecord) -> Result<proto::Session, Error> {
    Ok(proto::Session {
        data: Some(json_to_struct(&record.data)?),
        session_id: record.id,
        user_id: record.user_id,
        created_at: Some(timestamp(record.created_at_ms)),
        expires_at: Some(timestamp(record.expires_at_ms)),
    })
}

fn timestamp(ms: i64) -> Timestamp {
    // rem_euclid(1000) * 1e6 is below 1e9, so it fits an i32.
    Timestamp { seconds: ms.div_euclid(1000), nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0) }
}

/// Largest integer a double holds exactly, plus one.
const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;

/// `data` as a JSON object; `path` names the field in errors (`data.a[2]`).
/// Public for the fuzz targets (`fuzz/`).
pub fn struct_to_json(data: &Struct, path: &str) -> Result<Map<String, Json>, Error> {
    data.fields
        .iter()
        .map(|(name, value)| Ok((name.clone(), value_to_json(value, &format!("{path}.{name}"))?)))
        .collect()
}

/// A merge member as the merge script splices it: `"name":value`, both as
/// JSON text. Public for the fuzz targets.
pub fn merge_member(name: &str, value: &ProtoValue) -> Result<String, Error> {
    let value = value_to_json(value, &format!("data.{name}"))?;
    Ok(format!("{}:{value}", Json::from(name)))
}

fn value_to_json(value: &ProtoValue, path: &str) -> Result<Json, Error> {
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::NumberValue(n)) => {
            // Whole numbers are written as integers (`5`, not `5.0`), as a
            // Python or JavaScript reader expects; exact below 2^53.
            if n.fract() == 0.0 && n.abs() < EXACT_INTEGER_LIMIT && !(*n == 0.0 && n.is_sign_negative()) {
                Json::from(*n as i64)
            } else {
                Json::Number(
                    Number::from_f64(*n)
                        .ok_or_else(|| Error::invalid(path, "must be a finite number (JSON has no NaN or Infinity)"))?,
                )
            }
        }
        Some(Kind::StructValue(s)) => Json::Object(struct_to_json(s, path)?),
        Some(Kind::ListValue(list)) => Json::Array(
            list.values
                .iter()
                .enumerate()
                .map(|(i, value)| value_to_json(value, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Stored JSON text as a Struct; anything but an object is a fault.
/// Public for the fuzz targets (`fuzz/`).
pub fn json_to_struct(text: &str) -> Result<Struct, Error> {
    match serde_json::from_str(text) {
        Ok(Json::Object(object)) => Ok(object_to_struct(object)),
        Ok(_) => Err(Error::Internal("stored session data is not a JSON object".into())),
        Err(e) => Err(Error::Internal(format!("stored session data is not JSON: {e}"))),
    }
}

fn object_to_struct(object: Map<String, Json>) -> Struct {
    Struct { fields: object.into_iter().map(|(name, value)| (name, json_to_value(value))).collect() }
}

fn json_to_value(value: Json) -> ProtoValue {
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(b),
        // Every JSON number has a nearest double (serde_json without
        // arbitrary_precision always answers Some).
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Kind::StringValue(s),
        Json::Array(values) => Kind::ListValue(ListValue { values: values.into_iter().map(json_to_value).collect() }),
        Json::Object(object) => Kind::StructValue(object_to_struct(object)),
    };
    ProtoValue { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(kind: Kind) -> ProtoValue {
        ProtoValue { kind: Some(kind) }
    }

    fn object(fields: Vec<(&str, ProtoValue)>) -> Struct {
        Struct { fields: fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect() }
    }

    #[test]
    fn struct_round_trips_through_json() {
        let data = object(vec![
            ("null", v(Kind::NullValue(0))),
            ("yes", v(Kind::BoolValue(true))),
            ("int", v(Kind::NumberValue(42.0))),
            ("neg", v(Kind::NumberValue(-7.0))),
            ("frac", v(Kind::NumberValue(0.1 + 0.2))),
            ("big", v(Kind::NumberValue(1e300))),
            ("negzero", v(Kind::NumberValue(-0.0))),
            ("text", v(Kind::StringValue("héllo \"wörld\" 🎉\n".into()))),
            ("empty_list", v(Kind::ListValue(ListValue::default()))),
            ("empty_obj", v(Kind::StructValue(Struct::default()))),
            (
                "nested",
                v(Kind::StructValue(object(vec![(
                    "list",
                    v(Kind::ListValue(ListValue {
                        values: vec![v(Kind::NumberValue(1.0)), v(Kind::StructValue(Struct::default()))],
                    })),
                )]))),
            ),
        ]);
        let text = Json::Object(struct_to_json(&data, "data").unwrap()).to_string();
        assert!(text.contains(r#""int":42,"#), "{text}");
        assert!(text.contains(r#""frac":0.30000000000000004"#), "{text}");
        let back = json_to_struct(&text).unwrap();
        assert_eq!(back, data);
        let negzero = &back.fields["negzero"];
        assert!(matches!(negzero.kind, Some(Kind::NumberValue(n)) if n.is_sign_negative()));
    }

    #[test]
    fn numbers_read_back_bit_for_bit() {
        // Found by the session_json fuzz target: without serde_json's
        // float_roundtrip this came back one ulp off.
        for n in [1.8712270165599439e-56, 0.1 + 0.2, 5e-324, f64::MAX, 2f64.powi(53) + 2.0] {
            let data = object(vec![("n", v(Kind::NumberValue(n)))]);
            let text = Json::Object(struct_to_json(&data, "data").unwrap()).to_string();
            assert_eq!(json_to_struct(&text).unwrap(), data, "{text}");
        }
    }

    #[test]
    fn non_finite_numbers_are_refused_by_path() {
        let data = object(vec![(
            "a",
            v(Kind::ListValue(ListValue { values: vec![v(Kind::NumberValue(1.0)), v(Kind::NumberValue(f64::NAN))] })),
        )]);
        let err = struct_to_json(&data, "data").unwrap_err().to_string();
        assert!(err.starts_with("data.a[1]: must be a finite number"), "{err}");
    }

    #[test]
    fn unset_value_kind_is_null() {
        let data = object(vec![("x", ProtoValue { kind: None })]);
        assert_eq!(Json::Object(struct_to_json(&data, "data").unwrap()).to_string(), r#"{"x":null}"#);
    }

    #[test]
    fn stored_non_objects_are_faults() {
        assert!(matches!(json_to_struct("[1]"), Err(Error::Internal(_))));
        assert!(matches!(json_to_struct("{"), Err(Error::Internal(_))));
    }

    #[test]
    fn timestamps_from_millis() {
        assert_eq!(timestamp(1_500), Timestamp { seconds: 1, nanos: 500_000_000 });
        assert_eq!(timestamp(-1), Timestamp { seconds: -1, nanos: 999_000_000 });
    }
}
