//! Any bytes that decode as a `google.protobuf.Value` convert to JSON and
//! back without panicking, and one trip settles the value: converting the
//! result again (through the wire encoding too) changes nothing.
#![no_main]

use jobd_proto::value::{from_json, to_json};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = prost_types::Value::decode(data) {
        let json = to_json(value);
        let wire = from_json(json.clone()).encode_to_vec();
        let again = prost_types::Value::decode(wire.as_slice()).expect("our own encoding decodes");
        assert_eq!(to_json(again), json);
    }
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) {
        let once = to_json(from_json(json));
        assert_eq!(to_json(from_json(once.clone())), once);
    }
});
