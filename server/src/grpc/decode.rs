//! Validation of incoming requests: wire messages become domain values here,
//! or the request is refused with `INVALID_ARGUMENT` naming the field. Every
//! rule about what a well-formed id, name, label or duration is lives in this
//! module.

use std::{collections::BTreeMap, time::Duration};

use jobd_proto::{JobId, pb, value};

use crate::{
    Error,
    engine::SubmitSpec,
    function::{MAX_FUNCTION_NAME_LEN, PoolKind, is_valid_function_name},
};

/// At most this many labels per job.
pub(crate) const MAX_LABELS: usize = 64;
/// Label keys: 1 to 63 bytes of `[A-Za-z0-9_.-/]`.
pub(crate) const MAX_LABEL_KEY_LEN: usize = 63;
/// Label values: at most 255 bytes, no control characters.
pub(crate) const MAX_LABEL_VALUE_LEN: usize = 255;
/// Request ids: 1 to 128 printable ASCII characters.
pub(crate) const MAX_REQUEST_ID_LEN: usize = 128;

/// The most submissions one SubmitBatch may carry.
pub(crate) const MAX_BATCH: usize = 10_000;

pub(crate) fn batch_len(len: usize) -> Result<(), Error> {
    if (1..=MAX_BATCH).contains(&len) {
        Ok(())
    } else {
        Err(Error::invalid(
            "requests",
            format!("a batch holds 1 to {MAX_BATCH} submissions (got {len})"),
        ))
    }
}

pub(crate) fn job_id(raw: &str) -> Result<JobId, Error> {
    raw.parse()
        .map_err(|e: jobd_proto::ParseJobIdError| Error::invalid("job_id", e.to_string()))
}

/// An optional wire duration: absent stays `None`; negative or out of range
/// is refused.
pub(crate) fn timeout(
    field: &'static str,
    raw: Option<prost_types::Duration>,
) -> Result<Option<Duration>, Error> {
    raw.map(|d| {
        Duration::try_from(d).map_err(|_| {
            Error::invalid(
                field,
                format!("{}s {}ns is negative or out of range", d.seconds, d.nanos),
            )
        })
    })
    .transpose()
}

impl TryFrom<pb::SubmitRequest> for SubmitSpec {
    type Error = Error;

    fn try_from(req: pb::SubmitRequest) -> Result<Self, Error> {
        if !is_valid_function_name(&req.function) {
            return Err(Error::invalid(
                "function",
                if req.function.is_empty() {
                    "is required (see ListFunctions)".to_owned()
                } else {
                    format!(
                        "must be 1-{MAX_FUNCTION_NAME_LEN} characters of [A-Za-z0-9_.:-] \
                         (got {} bytes)",
                        req.function.len()
                    )
                },
            ));
        }
        let pool = match req.pool.as_str() {
            "" => None,
            name => Some(PoolKind::from_name(name).ok_or_else(|| {
                Error::invalid("pool", "must be \"async\", \"blocking\" or empty")
            })?),
        };
        let request_id = match req.request_id.as_str() {
            "" => None,
            id if id.len() <= MAX_REQUEST_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic()) => {
                Some(req.request_id)
            }
            _ => {
                return Err(Error::invalid(
                    "request_id",
                    format!("must be 1-{MAX_REQUEST_ID_LEN} printable ASCII characters"),
                ));
            }
        };
        Ok(Self {
            function: req.function,
            args: value::option_to_json(req.args),
            pool,
            request_id,
            labels: labels(req.labels)?,
        })
    }
}

fn labels(
    raw: std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, Error> {
    if raw.len() > MAX_LABELS {
        return Err(Error::invalid(
            "labels",
            format!("at most {MAX_LABELS} labels per job (got {})", raw.len()),
        ));
    }
    for (key, value) in &raw {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
        if !key_ok {
            return Err(Error::invalid(
                "labels",
                format!("key must be 1-{MAX_LABEL_KEY_LEN} characters of [A-Za-z0-9_.-/]"),
            ));
        }
        if value.len() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
            return Err(Error::invalid(
                "labels",
                format!(
                    "value of {key:?} must be at most {MAX_LABEL_VALUE_LEN} bytes with no control characters"
                ),
            ));
        }
    }
    Ok(raw.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(f: impl FnOnce(&mut pb::SubmitRequest)) -> Result<SubmitSpec, Error> {
        let mut req = pb::SubmitRequest {
            function: "hello".into(),
            ..Default::default()
        };
        f(&mut req);
        SubmitSpec::try_from(req)
    }

    fn field_of(result: Result<SubmitSpec, Error>) -> &'static str {
        match result {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_minimal_submit() {
        let spec = submit(|_| {}).unwrap();
        assert_eq!(spec.function, "hello");
        assert_eq!(spec.args, serde_json::Value::Null);
        assert_eq!(spec.pool, None);
    }

    #[test]
    fn refuses_bad_fields_naming_them() {
        assert_eq!(field_of(submit(|r| r.function.clear())), "function");
        assert_eq!(field_of(submit(|r| r.function = "a b".into())), "function");
        assert_eq!(field_of(submit(|r| r.pool = "gpu".into())), "pool");
        assert_eq!(
            field_of(submit(|r| r.request_id = "x".repeat(129))),
            "request_id"
        );
        assert_eq!(
            field_of(submit(|r| r.request_id = "tab\there".into())),
            "request_id"
        );
        assert_eq!(
            field_of(submit(|r| {
                r.labels.insert(String::new(), "v".into());
            })),
            "labels"
        );
        assert_eq!(
            field_of(submit(|r| {
                r.labels.insert("k".into(), "line\nbreak".into());
            })),
            "labels"
        );
    }

    #[test]
    fn durations_reject_negative() {
        let neg = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert!(timeout("timeout", Some(neg)).is_err());
        let half = prost_types::Duration {
            seconds: 0,
            nanos: 500_000_000,
        };
        assert_eq!(
            timeout("timeout", Some(half)).unwrap(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(timeout("timeout", None).unwrap(), None);
    }

    #[test]
    fn ids_are_checked() {
        assert!(job_id("0190b5a4-7b1e-7000-8000-000000000000").is_ok());
        assert!(matches!(
            job_id(""),
            Err(Error::InvalidArgument {
                field: "job_id",
                ..
            })
        ));
    }
}
