//! Conversion between `google.protobuf.Value` (what the wire carries, so that
//! grpcurl's JSON is natural) and `serde_json::Value` (what job functions and
//! client code work with).
//!
//! protobuf numbers are `f64`, so integers beyond 2^53 lose precision on the
//! wire, exactly as in JSON itself; integral doubles come back as JSON
//! integers so `3` stays `3`, not `3.0`.

use prost_types::{ListValue, Struct, Value, value::Kind};

/// Converts a JSON value to its protobuf form.
///
/// ```
/// use jobd_proto::value::{from_json, to_json};
/// let json = serde_json::json!({"name": "Ann", "n": [1, 2.5, null, true]});
/// assert_eq!(to_json(from_json(json.clone())), json);
/// ```
#[must_use]
pub fn from_json(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(from_json).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(Struct {
            fields: map.into_iter().map(|(k, v)| (k, from_json(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// Converts a protobuf value to JSON. A value with no kind set (which some
/// clients send for "nothing") becomes JSON `null`, as does a non-finite
/// number, which JSON cannot represent.
#[must_use]
pub fn to_json(value: Value) -> serde_json::Value {
    match value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::NumberValue(n)) => number_to_json(n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.into_iter().map(to_json).collect())
        }
        Some(Kind::StructValue(s)) => {
            serde_json::Value::Object(s.fields.into_iter().map(|(k, v)| (k, to_json(v))).collect())
        }
    }
}

/// Converts an optional protobuf value (an absent message field) to JSON;
/// absent means `null`.
#[must_use]
pub fn option_to_json(value: Option<Value>) -> serde_json::Value {
    value.map_or(serde_json::Value::Null, to_json)
}

fn number_to_json(n: f64) -> serde_json::Value {
    // 2^53: above it not every integer is representable, so keep the float.
    const MAX_EXACT: f64 = 9_007_199_254_740_992.0;
    if n.fract() == 0.0 && n.abs() <= MAX_EXACT {
        // Exact: the value is integral and within i64's exactly-representable range.
        #[allow(clippy::cast_possible_truncation)]
        return serde_json::Value::from(n as i64);
    }
    serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integers_stay_integers() {
        assert_eq!(to_json(from_json(json!(3))), json!(3));
        assert_eq!(to_json(from_json(json!(-7))), json!(-7));
        assert_eq!(to_json(from_json(json!(2.5))), json!(2.5));
    }

    #[test]
    fn nested_values_round_trip() {
        let v = json!({"a": [1, {"b": null}], "c": "d", "e": false});
        assert_eq!(to_json(from_json(v.clone())), v);
    }

    #[test]
    fn missing_and_non_finite_become_null() {
        assert_eq!(option_to_json(None), json!(null));
        assert_eq!(to_json(Value { kind: None }), json!(null));
        let nan = Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        assert_eq!(to_json(nan), json!(null));
    }
}

/// Property tests: any JSON a client can send survives the trip through
/// `google.protobuf.Value` and its wire encoding. Cases: `PROPTEST_CASES`
/// (default 256).
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;

    /// JSON whose numbers the wire carries exactly: integers within 2^53
    /// and finite non-integral doubles.
    fn exact_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            (-(1i64 << 53)..=(1i64 << 53)).prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite, non-integral", |f| f.is_finite()
                    && f.fract() != 0.0)
                .prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                prop::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// Any number a JSON parser produces, including u64 and huge integers.
    fn any_number() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            any::<u64>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
        ]
    }

    proptest! {
        #[test]
        fn exact_json_round_trips_through_the_wire(json in exact_json()) {
            let wire = from_json(json.clone()).encode_to_vec();
            let decoded = Value::decode(wire.as_slice()).expect("decodes");
            prop_assert_eq!(to_json(decoded), json);
        }

        #[test]
        fn any_number_converts_stably(json in any_number()) {
            // Precision may go (as in JSON itself), but one trip settles it.
            let once = to_json(from_json(json));
            prop_assert_eq!(to_json(from_json(once.clone())), once);
        }
    }
}
