//! The command API over real HTTP on loopback, with real processes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use super::command::{
    ACCESS_TOKEN_HEADER, CommandConfig, Commands, InvalidCommand, LineSplitter, RunCommandRequest,
    expand_cwd,
};
use super::command_api::{CommandApi, handle};
use super::http::serve;

/// A command API on 127.0.0.1 with an OS-assigned port.
struct Server {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn server_with(token: Option<&str>, configure: impl FnOnce(&mut CommandConfig)) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = CommandConfig::new(dir.path().join("commands"));
    configure(&mut config);
    let api = Arc::new(CommandApi::new(Commands::new(config), token));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(
        listener,
        move |request| handle(api.clone(), request),
        std::future::pending(),
    ));
    Server { addr, _dir: dir }
}

async fn server() -> Server {
    server_with(None, |_| {}).await
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "sandbox")
        .header("content-type", "application/json")
        .header("accept", "text/event-stream");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    sender.send_request(request).await.expect("response")
}

/// Splits a stream's bytes into its frames, checking each ends with a blank line.
fn frames(raw: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(raw).expect("UTF-8 stream");
    assert!(
        text.ends_with("\n\n"),
        "the stream ends with a frame: {text:?}"
    );
    text.strip_suffix("\n\n")
        .unwrap_or_default()
        .split("\n\n")
        .map(|f| serde_json::from_str(f).unwrap_or_else(|e| panic!("frame {f:?}: {e}")))
        .collect()
}

/// Runs a command to the end; returns its events (pings left out).
async fn run(addr: SocketAddr, body: Value) -> Vec<Value> {
    let response = send(addr, "POST", "/command", &body.to_string(), &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "the SDK refuses any other content type"
    );
    let raw = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let events = frames(&raw);
    for event in &events {
        assert!(
            event["timestamp"]
                .as_u64()
                .is_some_and(|t| t > 1_700_000_000_000),
            "every event has a millisecond timestamp (the SDK drops those without): {event}"
        );
    }
    events.into_iter().filter(|e| e["type"] != "ping").collect()
}

fn texts(events: &[Value], kind: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| e["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn last(events: &[Value]) -> &Value {
    events.last().expect("at least one event")
}

fn exit_value(events: &[Value]) -> String {
    let end = last(events);
    assert_eq!(end["type"], "error", "{events:?}");
    assert_eq!(end["error"]["ename"], "CommandExecError");
    end["error"]["evalue"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); it has exited for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn events_are_framed_in_order_with_lines_as_execd_cuts_them() {
    let server = server().await;
    let events = run(
        server.addr,
        json!({"command": "printf 'a\\nb\\r\\n\\nlast'; echo oops >&2"}),
    )
    .await;
    assert_eq!(events[0]["type"], "init");
    assert!(!events[0]["text"].as_str().unwrap_or_default().is_empty());
    assert_eq!(texts(&events, "stdout"), ["a", "b", "\n", "last"]);
    assert_eq!(texts(&events, "stderr"), ["oops"]);
    assert_eq!(last(&events)["type"], "execution_complete");
    assert!(last(&events)["execution_time"].as_u64().is_some());
}

#[tokio::test]
async fn the_spec_example_sees_its_line_without_a_newline() {
    let server = server().await;
    let events = run(
        server.addr,
        json!({"command": "echo hello from batch sandbox"}),
    )
    .await;
    assert_eq!(texts(&events, "stdout"), ["hello from batch sandbox"]);
    assert_eq!(
        events
            .iter()
            .map(|e| e["type"].as_str())
            .collect::<Vec<_>>(),
        [Some("init"), Some("stdout"), Some("execution_complete")]
    );
}

#[tokio::test]
async fn exit_codes_signals_and_missing_programs_are_errors_with_the_code() {
    let server = server().await;
    assert_eq!(
        exit_value(&run(server.addr, json!({"command": "exit 3"})).await),
        "3"
    );
    assert_eq!(
        exit_value(&run(server.addr, json!({"command": "kill -9 $$"})).await),
        "137"
    );
    assert_eq!(
        exit_value(&run(server.addr, json!({"argv": ["/nonexistent/program"]})).await),
        "127"
    );
    assert_eq!(
        exit_value(&run(server.addr, json!({"command": "no-such-command-here"})).await),
        "127",
        "the shell's own code"
    );
    let ok = run(
        server.addr,
        json!({"argv": ["sh", "-c", "echo $0 \"$1\"", "x", "a b; c"]}),
    )
    .await;
    assert_eq!(
        texts(&ok, "stdout"),
        ["x a b; c"],
        "argv words are passed verbatim"
    );
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let server = server().await;
    let started = Instant::now();
    let events = run(
        server.addr,
        json!({"command": "sleep 30 & echo $!; wait", "timeout": 300}),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(exit_value(&events), "137");
    let traceback = last(&events)["error"]["traceback"][0]
        .as_str()
        .unwrap_or_default();
    assert!(traceback.contains("timed out after 300 ms"), "{traceback}");
    let child: i32 = texts(&events, "stdout")[0]
        .parse()
        .expect("the child's pid");
    wait_until(
        "the background child to be killed",
        Duration::from_secs(5),
        || !alive(child),
    )
    .await;
}

#[tokio::test]
async fn output_streams_as_produced_and_a_client_that_leaves_kills_the_command() {
    let server = server().await;
    let response = send(
        server.addr,
        "POST",
        "/command",
        &json!({"command": "echo $$; exec sleep 60"}).to_string(),
        &[],
    )
    .await;
    let mut body = response.into_body();
    let mut seen = Vec::new();
    let pid: i32 = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the first line arrives while the command still runs")
            .expect("a frame")
            .expect("no error");
        seen.extend_from_slice(&frame.into_data().unwrap_or_default());
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some(stdout) = text
            .split("\n\n")
            .filter_map(|f| serde_json::from_str::<Value>(f).ok())
            .find(|e| e["type"] == "stdout")
        {
            break stdout["text"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .expect("pid");
        }
    };
    assert!(alive(pid), "the command is still running");
    drop(body);
    wait_until(
        "the command to be killed after the client left",
        Duration::from_secs(10),
        || !alive(pid),
    )
    .await;
}

#[tokio::test]
async fn ten_megabytes_of_output_arrive_complete() {
    let server = server().await;
    let size: usize = 10 * 1024 * 1024;
    let events = run(
        server.addr,
        json!({"command": format!("head -c {size} /dev/zero | tr '\\0' x | fold -w 1000")}),
    )
    .await;
    assert_eq!(last(&events)["type"], "execution_complete");
    let lines = texts(&events, "stdout");
    assert_eq!(lines.len(), size.div_ceil(1000));
    assert_eq!(lines.iter().map(String::len).sum::<usize>(), size);
    assert!(lines.iter().all(|l| l.bytes().all(|b| b == b'x')));
}

#[tokio::test]
async fn a_long_line_comes_in_pieces_of_the_configured_size() {
    let server = server_with(None, |c| c.max_line_bytes = 4096).await;
    let events = run(
        server.addr,
        json!({"command": "head -c 10000 /dev/zero | tr '\\0' y"}),
    )
    .await;
    let pieces = texts(&events, "stdout");
    assert_eq!(
        pieces.iter().map(String::len).collect::<Vec<_>>(),
        [4096, 4096, 1808]
    );
}

#[tokio::test]
async fn cwd_and_envs_apply_and_cwd_expands_variables() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_string_lossy().into_owned();
    let events = run(
        server.addr,
        json!({"command": "pwd; echo \"$GREETING\"", "cwd": "${TARGET}", "envs": {"TARGET": path, "GREETING": "hi there"}}),
    )
    .await;
    assert_eq!(texts(&events, "stdout"), [path.as_str(), "hi there"]);
}

#[tokio::test]
async fn the_executors_secrets_are_not_in_a_commands_environment() {
    let server = server_with(None, |c| c.scrub_env = vec!["HOME".into()]).await;
    let events = run(server.addr, json!({"command": "echo \"${HOME-unset}\""})).await;
    assert_eq!(texts(&events, "stdout"), ["unset"]);
}

#[tokio::test]
async fn bad_requests_get_a_json_error_naming_the_problem() {
    let server = server().await;
    for (body, needle) in [
        ("not json", "not a command request"),
        (r#"{"command": "a", "argv": ["b"]}"#, "exactly one of"),
        (r#"{}"#, "exactly one of"),
        (r#"{"argv": []}"#, "non-empty executable"),
        (r#"{"command": "true", "timeout": -5}"#, "timeout"),
        (
            r#"{"command": "true", "cwd": "/no/such/dir"}"#,
            "/no/such/dir",
        ),
        (
            r#"{"command": "true", "cwd": "$UNDEFINED_SBX_VAR"}"#,
            "not defined",
        ),
        (r#"{"command": "true", "gid": 5}"#, "uid is required"),
    ] {
        let response = send(server.addr, "POST", "/command", body, &[]).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let raw = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let error: Value = serde_json::from_slice(&raw).expect("a JSON error body");
        assert_eq!(error["code"], "INVALID_REQUEST_BODY", "{body}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let response = send(server.addr, "GET", "/nothing", "", &[]).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn background_commands_answer_at_once_and_report_status_and_output() {
    let server = server().await;
    let events = run(
        server.addr,
        json!({"command": "echo started; sleep 0.3; echo done; exit 4", "background": true}),
    )
    .await;
    assert_eq!(
        events
            .iter()
            .map(|e| e["type"].as_str())
            .collect::<Vec<_>>(),
        [Some("init"), Some("execution_complete")]
    );
    let id = events[0]["text"].as_str().expect("id").to_string();
    let status = loop {
        let response = send(
            server.addr,
            "GET",
            &format!("/command/status/{id}"),
            "",
            &[],
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        let raw = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let status: Value = serde_json::from_slice(&raw).expect("status JSON");
        if status["running"] == false {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status["exit_code"], 4);
    let response = send(
        server.addr,
        "GET",
        &format!("/command/{id}/logs?cursor=0"),
        "",
        &[],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let cursor = response.headers()["EXECD-COMMANDS-TAIL-CURSOR"]
        .to_str()
        .unwrap_or_default()
        .to_string();
    let raw = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&raw[..], b"started\ndone\n");
    assert_eq!(cursor, "13");
}

#[tokio::test]
async fn only_the_latest_finished_commands_are_remembered() {
    let server = server_with(None, |c| c.max_finished = 2).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let events = run(server.addr, json!({"command": "true"})).await;
        ids.push(events[0]["text"].as_str().expect("id").to_string());
    }
    let addr = server.addr;
    let status = |id: &str| {
        let path = format!("/command/status/{id}");
        async move { send(addr, "GET", &path, "", &[]).await.status() }
    };
    assert_eq!(status(&ids[0]).await, StatusCode::NOT_FOUND);
    assert_eq!(status(&ids[1]).await, StatusCode::OK);
    assert_eq!(status(&ids[2]).await, StatusCode::OK);
}

#[tokio::test]
async fn a_configured_token_is_required_on_every_request() {
    let guarded = server_with(Some("s3cret"), |_| {}).await;
    let response = send(guarded.addr, "GET", "/ping", "", &[]).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = send(
        guarded.addr,
        "GET",
        "/ping",
        "",
        &[(ACCESS_TOKEN_HEADER, "wrong")],
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = send(
        guarded.addr,
        "POST",
        "/command",
        r#"{"command": "true"}"#,
        &[],
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = send(
        guarded.addr,
        "GET",
        "/ping",
        "",
        &[(ACCESS_TOKEN_HEADER, "s3cret")],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);

    let open = server().await;
    let response = send(open.addr, "GET", "/ping", "", &[]).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "no token configured: none needed"
    );
}

#[test]
fn lines_split_like_execd() {
    let mut s = LineSplitter::new(1024);
    let mut out = s.push(b"one\ntw");
    out.extend(s.push(b"o\r\nthree\rfour\n\n\r\n"));
    assert_eq!(out, ["one", "two", "three", "four", "\n", "\n"]);
    assert_eq!(s.finish(), None);
    s.push(b"tail");
    assert_eq!(s.finish().as_deref(), Some("tail"));
}

#[test]
fn long_lines_are_cut_on_character_boundaries() {
    let mut s = LineSplitter::new(8);
    // "ééééé" is 10 bytes; the cut after 8 would not split a character, the one after 7 would.
    let out = s.push("aéééé\n".as_bytes());
    assert_eq!(out, ["aééé", "é"]);
    let out = s.push(&[0xff, 0xfe, b'x', b'\n']);
    assert_eq!(
        out,
        ["\u{fffd}\u{fffd}x"],
        "invalid UTF-8 is replaced, not dropped"
    );
}

#[test]
fn cwd_expansion() {
    let lookup = |name: &str| match name {
        "HOME" => Some("/home/u".to_string()),
        "D" => Some("data".to_string()),
        _ => None,
    };
    assert_eq!(
        expand_cwd("~", &lookup).unwrap(),
        std::path::PathBuf::from("/home/u")
    );
    assert_eq!(
        expand_cwd("~/x/$D/${D}y", &lookup).unwrap(),
        std::path::PathBuf::from("/home/u/x/data/datay")
    );
    assert_eq!(
        expand_cwd("/a$/b", &lookup).unwrap(),
        std::path::PathBuf::from("/a$/b")
    );
    assert!(expand_cwd("$NOPE", &lookup).unwrap_err().contains("$NOPE"));
    assert!(expand_cwd("${D", &lookup).is_err());
}

#[test]
fn requests_name_exactly_one_command() {
    let env = |_: &str| None;
    let spec = RunCommandRequest {
        command: Some("echo hi".into()),
        timeout: Some(1500),
        ..RunCommandRequest::default()
    }
    .validate(env)
    .expect("valid");
    assert_eq!(spec.args.last().map(String::as_str), Some("echo hi"));
    assert_eq!(spec.timeout, Some(Duration::from_millis(1500)));
    assert!(["bash", "sh"].contains(&spec.program.as_str()));
    let none = RunCommandRequest {
        command: Some(String::new()),
        ..RunCommandRequest::default()
    };
    assert_eq!(none.validate(env), Err(InvalidCommand::NoCommand));
    let zero_timeout = RunCommandRequest {
        argv: Some(vec!["true".into()]),
        timeout: Some(0),
        ..RunCommandRequest::default()
    };
    assert_eq!(zero_timeout.validate(env).expect("valid").timeout, None);
}
