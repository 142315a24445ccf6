//! Session data: Struct → JSON (what is stored) → Struct (what is read back)
//! gives the same data; a merge's member texts splice into the JSON object
//! they stand for; and any stored text reads back as data or as a reported
//! fault, never a panic. The input is a protobuf-encoded Struct, as the
//! wire carries `data`.

#![no_main]

use cachecoord::api::session::{json_to_struct, merge_member, struct_to_json};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use prost_types::{ListValue, Struct, Value, value::Kind};

/// What a reader gets back: every null is `NullValue(0)`.
fn normal(value: &Value) -> Value {
    let kind = match &value.kind {
        None | Some(Kind::NullValue(_)) => Kind::NullValue(0),
        Some(Kind::StructValue(s)) => Kind::StructValue(normal_struct(s)),
        Some(Kind::ListValue(l)) => Kind::ListValue(ListValue { values: l.values.iter().map(normal).collect() }),
        Some(other) => other.clone(),
    };
    Value { kind: Some(kind) }
}

fn normal_struct(s: &Struct) -> Struct {
    Struct { fields: s.fields.iter().map(|(k, v)| (k.clone(), normal(v))).collect() }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        // Whatever Redis holds, reading it never panics.
        let _ = json_to_struct(text);
    }
    let Ok(data) = Struct::decode(data) else { return };
    let Ok(object) = struct_to_json(&data, "data") else { return };
    let text = serde_json::Value::Object(object.clone()).to_string();
    let back = json_to_struct(&text).expect("our own JSON reads back");
    assert_eq!(back, normal_struct(&data), "round trip of {text}");

    let members: Vec<String> =
        data.fields.iter().map(|(name, value)| merge_member(name, value).expect("converted above")).collect();
    let spliced = format!("{{{}}}", members.join(","));
    let parsed: serde_json::Value = serde_json::from_str(&spliced).expect("spliced members are JSON");
    assert_eq!(parsed, serde_json::Value::Object(object), "splice of {spliced}");
});
