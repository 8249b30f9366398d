//! grpcurl works out of the box: reflection (v1alpha, which grpcurl 1.8 asks
//! for), JSON requests, well-known types, and standard health checks.
//!
//! `.ci/run` installs grpcurl; a developer without it gets a printed skip,
//! but under `CI=true` a missing grpcurl fails the run.

use std::process::{Command, Output};

use jobd_test_support::{JobdProcess, jobd_binary, tools::require_grpcurl};
use serde_json::Value;

/// Runs grpcurl in plaintext mode; callers put the address after the flags.
fn grpcurl(args: &[&str]) -> Output {
    Command::new("grpcurl")
        .arg("-plaintext")
        .args(["-max-time", "20"])
        .args(args)
        .output()
        .expect("run grpcurl")
}

fn call(server: &JobdProcess, method: &str, body: &str) -> Value {
    let addr = server.addr.to_string();
    let out = grpcurl(&["-d", body, &addr, method]);
    assert!(
        out.status.success(),
        "grpcurl {method} {body} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "grpcurl printed non-JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn list_and_describe_through_reflection() {
    require_grpcurl();
    let server = JobdProcess::start(jobd_binary!(), &[]);
    let addr = server.addr.to_string();
    let out = grpcurl(&[&addr, "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let services = String::from_utf8(out.stdout).unwrap();
    for service in [
        "jobd.v1.JobService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} not in:\n{services}"
        );
    }

    let out = grpcurl(&[&addr, "describe", "jobd.v1.JobService"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let described = String::from_utf8(out.stdout).unwrap();
    for rpc in [
        "Submit",
        "Done",
        "Result",
        "Cancel",
        "GetJob",
        "ListFunctions",
        "Watch",
        "Map",
    ] {
        assert!(
            described.contains(&format!("rpc {rpc} (")),
            "{rpc} not in:\n{described}"
        );
    }
    // The well-known types resolve too (their descriptors are served).
    let out = grpcurl(&[&addr, "describe", "jobd.v1.SubmitRequest"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains(".google.protobuf.Value args")
    );
}

#[test]
fn list_functions_shows_argument_schemas_as_json() {
    require_grpcurl();
    let server = JobdProcess::start(jobd_binary!(), &[]);
    let listed = call(&server, "jobd.v1.JobService/ListFunctions", "{}");
    let hello = listed["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "hello")
        .unwrap()
        .clone();
    // The schema reads as JSON, not as an escaped string.
    assert_eq!(
        hello["argsSchema"]["properties"]["name"]["type"],
        serde_json::json!(["string", "null"]),
        "{hello}"
    );
    assert!(
        hello["returns"].as_str().unwrap().contains("greeting"),
        "{hello}"
    );
}

#[test]
fn submit_done_result_get_job_in_json() {
    require_grpcurl();
    let server = JobdProcess::start(jobd_binary!(), &[]);
    let submitted = call(
        &server,
        "jobd.v1.JobService/Submit",
        r#"{"function":"hello"}"#,
    );
    let id = submitted["jobId"].as_str().expect("jobId").to_owned();
    assert_eq!(id.len(), 36, "{submitted}");

    let body = format!(r#"{{"job_id":"{id}","timeout":"5s"}}"#);
    let result = call(&server, "jobd.v1.JobService/Result", &body);
    assert_eq!(result["state"], "JOB_STATE_SUCCEEDED", "{result}");
    assert_eq!(result["value"], "Hello, world!", "{result}");

    let done = call(
        &server,
        "jobd.v1.JobService/Done",
        &format!(r#"{{"jobId":"{id}"}}"#),
    );
    assert_eq!(done["done"], true, "{done}");

    let job = call(
        &server,
        "jobd.v1.JobService/GetJob",
        &format!(r#"{{"job_id":"{id}"}}"#),
    );
    assert_eq!(job["job"]["function"], "hello", "{job}");
    assert_eq!(job["job"]["attempt"], 1, "{job}");
    assert!(
        job["job"]["submitTime"].as_str().unwrap().ends_with('Z'),
        "{job}"
    );

    let ann = call(
        &server,
        "jobd.v1.JobService/Submit",
        r#"{"function":"hello","args":{"name":"Ann"},"labels":{"team":"infra"}}"#,
    );
    let body = format!(r#"{{"job_id":"{}"}}"#, ann["jobId"].as_str().unwrap());
    assert_eq!(
        call(&server, "jobd.v1.JobService/Result", &body)["value"],
        "Hello, Ann!"
    );
}

#[test]
fn failed_jobs_are_answers_and_bad_requests_are_status_codes() {
    require_grpcurl();
    let server = JobdProcess::start(jobd_binary!(), &[]);
    let addr = server.addr.to_string();
    let failing = call(
        &server,
        "jobd.v1.JobService/Submit",
        r#"{"function":"sleep","args":5,"timeout":"0.05s"}"#,
    );
    let body = format!(r#"{{"job_id":"{}"}}"#, failing["jobId"].as_str().unwrap());
    let result = call(&server, "jobd.v1.JobService/Result", &body);
    assert_eq!(result["state"], "JOB_STATE_FAILED", "{result}");
    assert_eq!(result["error"]["kind"], "ERROR_KIND_TIMED_OUT", "{result}");

    // Arguments that break the function's schema: refused, naming the field.
    let out = grpcurl(&[
        "-d",
        r#"{"function":"hello","args":{"name":42}}"#,
        &addr,
        "jobd.v1.JobService/Submit",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("InvalidArgument"), "{err}");
    assert!(err.contains("args.name"), "{err}");

    let out = grpcurl(&[
        "-d",
        r#"{"function":"nope"}"#,
        &addr,
        "jobd.v1.JobService/Submit",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NotFound"), "{err}");

    let out = grpcurl(&[
        "-d",
        r#"{"job_id":"garbage"}"#,
        &addr,
        "jobd.v1.JobService/Done",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"));

    let sleeper = call(
        &server,
        "jobd.v1.JobService/Submit",
        r#"{"function":"sleep","args":30}"#,
    );
    let id = sleeper["jobId"].as_str().unwrap();
    let body = format!(r#"{{"job_id":"{id}","timeout":"0.2s"}}"#);
    let out = grpcurl(&["-d", &body, &addr, "jobd.v1.JobService/Result"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("DeadlineExceeded"));
    let cancelled = call(
        &server,
        "jobd.v1.JobService/Cancel",
        &format!(r#"{{"job_id":"{id}"}}"#),
    );
    assert_eq!(
        cancelled["outcome"], "CANCEL_OUTCOME_ABORTED",
        "{cancelled}"
    );
    assert_eq!(cancelled["cancelled"], true, "{cancelled}");
}

#[test]
fn standard_health_check() {
    require_grpcurl();
    let server = JobdProcess::start(jobd_binary!(), &[]);
    let overall = call(&server, "grpc.health.v1.Health/Check", "{}");
    assert_eq!(overall["status"], "SERVING");
    let service = call(
        &server,
        "grpc.health.v1.Health/Check",
        r#"{"service":"jobd.v1.JobService"}"#,
    );
    assert_eq!(service["status"], "SERVING");
}

#[test]
fn watch_streams_a_job_with_progress_to_its_final_event() {
    require_grpcurl();
    let server = JobdProcess::start(jobd_binary!(), &[]);
    let addr = server.addr.to_string();
    let submitted = call(
        &server,
        "jobd.v1.JobService/Submit",
        r#"{"function":"count","args":{"steps":3,"seconds":0.6}}"#,
    );
    let id = submitted["jobId"].as_str().unwrap().to_owned();
    // A watch of ids is a server stream that ends after the final event,
    // so grpcurl prints each event and exits.
    let body = format!(r#"{{"job_ids":["{id}"]}}"#);
    let out = grpcurl(&["-d", &body, &addr, "jobd.v1.JobService/Watch"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("a sequence of JSON events");
    assert_eq!(events[0]["kind"], "WATCH_EVENT_KIND_SNAPSHOT", "{events:?}");
    // uint64 travels as a JSON string, per the protobuf JSON mapping, and
    // is left out when 0 (the first watch's snapshot: nothing is numbered
    // before it).
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| {
            e.get("seq")
                .and_then(Value::as_str)
                .map_or(0, |s| s.parse().unwrap())
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "WATCH_EVENT_KIND_PROGRESS" && e["progress"]["message"] != ""),
        "{events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(last["state"], "JOB_STATE_SUCCEEDED", "{last}");
    assert_eq!(last["value"], 3, "{last}");
    assert_eq!(last["jobId"], id.as_str());
    assert_eq!(last["progress"]["fraction"], 1.0, "{last}");

    // GetJob shows the last progress report.
    let job = call(
        &server,
        "jobd.v1.JobService/GetJob",
        &format!(r#"{{"job_id":"{id}"}}"#),
    );
    assert_eq!(job["job"]["progress"]["message"], "3 of 3", "{job}");

    // Resuming with another process's epoch is refused clearly.
    let out = grpcurl(&[
        "-d",
        r#"{"stream_epoch":"elsewhere","after_seq":"1"}"#,
        &addr,
        "jobd.v1.JobService/Watch",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FailedPrecondition"), "{err}");
}

#[test]
fn map_streams_one_answer_per_argument() {
    require_grpcurl();
    let server = JobdProcess::start(jobd_binary!(), &["--store", "memory"]);
    let addr = server.addr.to_string();
    // Two request messages: the start with two arguments, then one more.
    let body = r#"{"start": {"function": "echo", "ordered": true}, "args": [1, "a"]}
                  {"args": [{"x": 2}]}"#;
    let out = grpcurl(&["-d", body, &addr, "jobd.v1.JobService/Map"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("a stream of JSON objects");
    let values: Vec<&Value> = answers.iter().map(|a| &a["value"]).collect();
    assert_eq!(
        values,
        [
            &serde_json::json!(1),
            &serde_json::json!("a"),
            &serde_json::json!({"x": 2})
        ]
    );
    for (n, answer) in answers.iter().enumerate() {
        // proto3 JSON leaves the default (0) out and writes uint64 as a string.
        let index = answer.get("index").and_then(Value::as_str).unwrap_or("0");
        assert_eq!(index, n.to_string());
        assert_eq!(answer["state"], "JOB_STATE_SUCCEEDED");
    }
}
