//! The admin router over a temporary store, served on a unix socket in a
//! temporary directory and called as the CLI calls it: dispatch by path
//! and method, unknown calls, the body limit, and the statuses and stable
//! codes that domain, store and lifecycle errors answer with. No root, no
//! Incus (the lifecycle's client points at a socket that does not exist).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use store::Store;
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::{bind_socket, serve, Access, AdminContext, ApiError};
use crate::lifecycle::LifecycleError;
use crate::routes::{self, Defaults, Routes, RoutingTable};
use crate::sandbox::SandboxError;

struct Admin {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    key: String,
    _stop: watch::Sender<bool>,
}

fn client_key(comment: &str) -> String {
    let (_, public) = crate::keys::generate_ed25519(comment).unwrap();
    public
}

async fn start() -> Admin {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("state")).unwrap());
    let feed = store.subscribe();
    let defaults = Arc::new(Defaults {
        tls: httpgate::TlsMode::Internal,
    });
    let routes = Routes::new(RoutingTable::build(
        store.list().unwrap(),
        store.seq(),
        defaults,
    ));
    tokio::spawn(routes::keep_in_step(store.clone(), routes.clone(), feed));
    let (host_key, _) = crate::keys::generate_ed25519("host").unwrap();
    let ssh = sshgate::Gateway::new(
        sshgate::GatewayConfig {
            host_keys: vec![russh::keys::PrivateKey::from_openssh(&host_key).unwrap()],
            ..Default::default()
        },
        Arc::new(routes::SshRoutes(routes.clone())),
    )
    .unwrap();
    let http = httpgate::HttpGateway::new(
        httpgate::HttpConfig {
            internal_suffixes: vec!["test".into()],
            ..Default::default()
        },
        Arc::new(routes::HttpRoutes(routes.clone())),
        Arc::new(crate::certstore::StoreCerts(store.clone())),
    )
    .unwrap();
    let tls_policy = crate::tlsfiles::Policy {
        default_internal: true,
        internal_suffixes: vec!["test".into()],
    };
    let lifecycle = crate::lifecycle::Lifecycle::new(
        store.clone(),
        routes.clone(),
        &crate::config::IncusConfig {
            socket: Some(dir.path().join("no-incus.socket")),
            default_image: "debian".into(),
            reconcile_secs: 3600,
        },
        crate::config::ProvisionConfig::default(),
        tls_policy.clone(),
    );
    let socket = dir.path().join("run").join("admin.sock");
    let ctx = Arc::new(AdminContext {
        store,
        routes,
        started: Instant::now(),
        admin_socket: socket.clone(),
        ssh_listen: vec![],
        https_listen: vec![],
        http_listen: vec![],
        http,
        ssh,
        ssh_host_keys: vec![],
        lifecycle,
        tls_policy,
    });
    let listener = bind_socket(&socket, None).unwrap();
    let access = Access {
        daemon_uid: nix::unistd::geteuid().as_raw(),
        group: None,
    };
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve(listener, ctx, access, stopped));
    Admin {
        _dir: dir,
        socket,
        key: client_key("alice@laptop"),
        _stop: stop,
    }
}

/// One call; the status and the body (JSON, or a string for other bodies).
async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
) -> (StatusCode, Value) {
    let stream = UnixStream::connect(socket).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "sandboxd")
        .body(Full::new(body.into()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

async fn call_json(socket: &Path, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
    call(socket, method, path, serde_json::to_vec(&body).unwrap()).await
}

/// Asserts a failed call's status and stable code; returns its message.
fn refused(answer: &(StatusCode, Value), status: StatusCode, code: &str) -> String {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"]["code"], code, "{}", answer.1);
    answer.1["error"]["message"].as_str().unwrap().to_string()
}

fn add_body(name: &str, key: &str) -> Value {
    json!({
        "name": name,
        "domain": format!("{name}.test"),
        "upstream": "127.0.0.1",
        "ssh_keys": [key],
    })
}

#[tokio::test]
async fn calls_are_dispatched_by_path_and_method() {
    let a = start().await;
    let (status, body) = call(&a.socket, Method::GET, "/v1/status", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["sandboxes"], 0);
    assert_eq!(body["admin_socket"], a.socket.display().to_string());
    let (status, body) = call(&a.socket, Method::GET, "/v1/sandboxes", "").await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    let (status, body) = call(&a.socket, Method::GET, "/v1/ca-cert", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));

    // Unknown paths, and known paths with another method, are no call.
    let msg = refused(
        &call(&a.socket, Method::GET, "/v1/nothing", "").await,
        StatusCode::NOT_FOUND,
        "no_such_call",
    );
    assert_eq!(msg, "no admin call GET /v1/nothing");
    let msg = refused(
        &call(&a.socket, Method::PUT, "/v1/status", "").await,
        StatusCode::NOT_FOUND,
        "no_such_call",
    );
    assert_eq!(msg, "no admin call PUT /v1/status");
    let msg = refused(
        &call(&a.socket, Method::GET, "/v2/status", "").await,
        StatusCode::NOT_FOUND,
        "no_such_call",
    );
    assert!(msg.ends_with("(this daemon speaks /v1/)"), "{msg}");
    let msg = refused(
        &call(&a.socket, Method::GET, "/v1/incus/sandboxes/x/start", "").await,
        StatusCode::NOT_FOUND,
        "no_such_call",
    );
    assert_eq!(msg, "no admin call GET /v1/incus/sandboxes/x/start");

    // The same path answers each method with its own call.
    let (status, view) = call_json(
        &a.socket,
        Method::POST,
        "/v1/sandboxes",
        add_body("web", &a.key),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    assert_eq!(view["name"], "web");
    let (status, view) = call(&a.socket, Method::GET, "/v1/sandboxes/web", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["domain"], "web.test");
    assert!(
        view.get("upstream_key").is_none(),
        "a view holds no secret: {view}"
    );
    let (status, keys) = call(&a.socket, Method::GET, "/v1/sandboxes/web/keys", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(keys[0]["comment"], "alice@laptop");
    let (status, _) = call(&a.socket, Method::DELETE, "/v1/sandboxes/web", "").await;
    assert_eq!(status, StatusCode::OK);
    refused(
        &call(&a.socket, Method::GET, "/v1/sandboxes/web", "").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test]
async fn bodies_are_limited_and_must_be_the_call_s_json() {
    let a = start().await;
    let big = vec![b' '; super::MAX_BODY + 1];
    let msg = refused(
        &call(&a.socket, Method::POST, "/v1/sandboxes", big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    );
    assert!(msg.contains(&super::MAX_BODY.to_string()), "{msg}");
    refused(
        &call(&a.socket, Method::POST, "/v1/sandboxes", "{not json").await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    let mut unknown_field = add_body("web", &a.key);
    unknown_field["colour"] = json!("red");
    refused(
        &call_json(&a.socket, Method::POST, "/v1/sandboxes", unknown_field).await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    // The TLS mode is typed: a name it does not know is refused with the
    // modes it does.
    let mut mode = add_body("web", &a.key);
    mode["tls_mode"] = json!("selfsigned");
    let msg = refused(
        &call_json(&a.socket, Method::POST, "/v1/sandboxes", mode).await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    assert!(msg.contains("use acme, internal or manual"), "{msg}");
    // Nothing was recorded by any of them.
    let (_, list) = call(&a.socket, Method::GET, "/v1/sandboxes", "").await;
    assert_eq!(list, json!([]));
    // A known mode travels as its name.
    let mut mode = add_body("web", &a.key);
    mode["tls_mode"] = json!("acme");
    let (status, view) = call_json(&a.socket, Method::POST, "/v1/sandboxes", mode).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    assert_eq!(view["tls_mode"], "acme");
}

#[tokio::test]
async fn refusals_answer_with_their_status_and_code() {
    let a = start().await;
    let (status, _) = call_json(
        &a.socket,
        Method::POST,
        "/v1/sandboxes",
        add_body("web", &a.key),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);

    // Store: a taken name or host.
    refused(
        &call_json(
            &a.socket,
            Method::POST,
            "/v1/sandboxes",
            add_body("web", &a.key),
        )
        .await,
        StatusCode::CONFLICT,
        "name_taken",
    );
    let mut same_host = add_body("other", &a.key);
    same_host["domain"] = json!("web.test");
    refused(
        &call_json(&a.socket, Method::POST, "/v1/sandboxes", same_host).await,
        StatusCode::CONFLICT,
        "host_taken",
    );
    refused(
        &call_json(
            &a.socket,
            Method::POST,
            "/v1/sandboxes",
            add_body("Bad_Name", &a.key),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    );

    // Domain rules.
    let mut port = add_body("app", &a.key);
    port["app_port"] = json!(9999);
    let msg = refused(
        &call_json(&a.socket, Method::POST, "/v1/sandboxes", port).await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    );
    assert!(
        msg.starts_with("invalid app port: 9999 is the agent port"),
        "{msg}"
    );
    let msg = refused(
        &call_json(
            &a.socket,
            Method::PUT,
            "/v1/sandboxes/web/app-port",
            json!({"port": 9999}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    );
    assert!(
        msg.starts_with("invalid app port: 9999 is the agent port"),
        "{msg}"
    );
    let (_, view) = call(&a.socket, Method::GET, "/v1/sandboxes/web", "").await;
    assert_eq!(view["app_port"], 8000, "a refused port changes nothing");
    let (status, view) = call_json(
        &a.socket,
        Method::PUT,
        "/v1/sandboxes/web/app-port",
        json!({"port": 3000}),
    )
    .await;
    assert_eq!((status, &view["app_port"]), (StatusCode::OK, &json!(3000)));
    refused(
        &call_json(
            &a.socket,
            Method::PUT,
            "/v1/sandboxes/none/app-port",
            json!({"port": 3000}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let mut no_keys = add_body("app", &a.key);
    no_keys["ssh_keys"] = json!([]);
    let msg = refused(
        &call_json(&a.socket, Method::POST, "/v1/sandboxes", no_keys).await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    );
    assert!(msg.contains("at least one client SSH key"), "{msg}");
    let msg = refused(
        &call_json(
            &a.socket,
            Method::PUT,
            "/v1/sandboxes/web/auth",
            json!({"user": "a:b", "password": "pw"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    );
    assert!(msg.starts_with("auth user must be"), "{msg}");
    let msg = refused(
        &call_json(
            &a.socket,
            Method::DELETE,
            "/v1/sandboxes/web/keys",
            json!({"keys": ["SHA256:nothing"]}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "key_not_found",
    );
    assert_eq!(msg, "sandbox web has no key matching SHA256:nothing");
    let msg = refused(
        &call_json(
            &a.socket,
            Method::DELETE,
            "/v1/sandboxes/web/keys",
            json!({"keys": [a.key]}),
        )
        .await,
        StatusCode::CONFLICT,
        "last_key",
    );
    assert!(msg.contains("no client key"), "{msg}");
    // With a second key, the first can go.
    let second = client_key("bob@desk");
    let (status, keys) = call_json(
        &a.socket,
        Method::POST,
        "/v1/sandboxes/web/keys",
        json!({"keys": [second]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let (status, keys) = call_json(
        &a.socket,
        Method::DELETE,
        "/v1/sandboxes/web/keys",
        json!({"keys": [a.key]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(keys[0]["comment"], "bob@desk");

    // A restore into a store that holds data, without replace: the store's
    // NotEmpty, as the final event of the stream.
    let (status, backup) = call(&a.socket, Method::GET, "/v1/backup", "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, events) = call_json(&a.socket, Method::POST, "/v1/restore", backup).await;
    assert_eq!(status, StatusCode::OK);
    // One event is one JSON document; several are NDJSON text.
    let last = match events {
        Value::String(text) => serde_json::from_str(text.lines().last().unwrap()).unwrap(),
        one => one,
    };
    assert_eq!(last["event"], "error", "{last}");
    assert_eq!(last["error"]["code"], "not_empty", "{last}");
    // A document that is not a backup is refused before anything streams.
    refused(
        &call_json(
            &a.socket,
            Method::POST,
            "/v1/restore",
            json!({"format": "other", "schema_version": 1, "sandboxes": [], "records": {}}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_backup",
    );

    // Lifecycle calls without Incus: the lifecycle's error, mapped here.
    let msg = refused(
        &call(&a.socket, Method::POST, "/v1/incus/sandboxes/web/start", "").await,
        StatusCode::BAD_REQUEST,
        "not_incus",
    );
    assert!(msg.contains("not an Incus sandbox"), "{msg}");
}

/// One mapping: a store error answers the same whether it reaches the
/// admin layer directly or through the lifecycle, and a failed pipeline
/// step answers as its cause.
#[test]
fn one_mapping_for_store_domain_and_lifecycle_errors() {
    let cases: Vec<(store::Error, StatusCode, &str)> = vec![
        (store::Error::NotEmpty(2), StatusCode::CONFLICT, "not_empty"),
        (
            store::Error::BadBackup("x".into()),
            StatusCode::BAD_REQUEST,
            "bad_backup",
        ),
        (
            store::Error::NameTaken("a".into()),
            StatusCode::CONFLICT,
            "name_taken",
        ),
        (
            store::Error::NotFound("a".into()),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            store::Error::AddressTaken {
                address: "10.0.0.5".into(),
                owner: "b".into(),
            },
            StatusCode::CONFLICT,
            "address_taken",
        ),
        (
            store::Error::NoFreeAddress("sbx0".into()),
            StatusCode::SERVICE_UNAVAILABLE,
            "no_free_address",
        ),
        (
            store::Error::Storage("disk".into()),
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage",
        ),
    ];
    for (e, status, code) in cases {
        let text = e.to_string();
        let lifecycle_store = match &e {
            store::Error::NotEmpty(n) => store::Error::NotEmpty(*n),
            store::Error::BadBackup(m) => store::Error::BadBackup(m.clone()),
            store::Error::NameTaken(m) => store::Error::NameTaken(m.clone()),
            store::Error::NotFound(m) => store::Error::NotFound(m.clone()),
            store::Error::AddressTaken { address, owner } => store::Error::AddressTaken {
                address: address.clone(),
                owner: owner.clone(),
            },
            store::Error::NoFreeAddress(m) => store::Error::NoFreeAddress(m.clone()),
            _ => store::Error::Storage("disk".into()),
        };
        let direct = ApiError::from(e);
        assert_eq!((direct.status, direct.code), (status, code), "{text}");
        assert_eq!(direct.message, text);
        let through = ApiError::from(LifecycleError::Store(lifecycle_store));
        assert_eq!((through.status, through.code), (status, code), "{text}");
    }
    let step = ApiError::from(LifecycleError::Step {
        what: "create",
        name: "a".into(),
        step: "record",
        source: Box::new(LifecycleError::Sandbox(SandboxError::AppPortIsAgentPort(
            9999,
        ))),
    });
    assert_eq!(
        (step.status, step.code),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );
    assert!(
        step.message
            .contains("failed at step record: invalid app port: 9999"),
        "{}",
        step.message
    );
    let internal = ApiError::from(SandboxError::Hash("no memory".into()));
    assert_eq!(
        (internal.status, internal.code),
        (StatusCode::INTERNAL_SERVER_ERROR, "internal")
    );
}

#[test]
fn access_admits_root_the_daemon_s_user_and_its_group_only() {
    let access = Access {
        daemon_uid: 4242,
        group: None,
    };
    assert!(access.allows(0, 0));
    assert!(access.allows(4242, 4242));
    assert!(!access.allows(4343, 4343));
    let grouped = Access {
        daemon_uid: 4242,
        group: Some(nix::unistd::Gid::from_raw(777)),
    };
    assert!(grouped.allows(4343, 777));
    assert!(!grouped.allows(4343, 778));
}

// Refusals checked inside the store's transaction (`set_port`,
// `keys_remove`): the domain's error is the answer and nothing is written.

/// The route generation the daemon reports: the store's sequence number of
/// the last change applied.
async fn generation(socket: &Path) -> u64 {
    let (status, body) = call(socket, Method::GET, "/v1/status", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["route_generation"].as_u64().unwrap()
}

/// Asserts that `answer` is the refusal `e` maps to: status, code, message.
fn refused_as(answer: &(StatusCode, Value), e: SandboxError) {
    let expected = ApiError::from(e);
    let message = refused(answer, expected.status, expected.code);
    assert_eq!(message, expected.message);
}

#[tokio::test]
async fn refused_port_and_key_edits_answer_the_domain_error_and_write_nothing() {
    let a = start().await;
    let (status, _) = call_json(
        &a.socket,
        Method::POST,
        "/v1/sandboxes",
        add_body("web", &a.key),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let before = generation(&a.socket).await;
    let (_, record_before) = call(&a.socket, Method::GET, "/v1/sandboxes/web", "").await;

    refused_as(
        &call_json(
            &a.socket,
            Method::PUT,
            "/v1/sandboxes/web/app-port",
            json!({"port": 9999}),
        )
        .await,
        SandboxError::AppPortIsAgentPort(9999),
    );
    let delete_keys = |keys: Value| {
        call_json(
            &a.socket,
            Method::DELETE,
            "/v1/sandboxes/web/keys",
            json!({ "keys": keys }),
        )
    };
    refused_as(
        &delete_keys(json!([a.key])).await,
        SandboxError::LastKey { name: "web".into() },
    );
    let unknown = client_key("carol@elsewhere");
    refused_as(
        &delete_keys(json!([unknown])).await,
        SandboxError::KeyNotFound {
            name: "web".into(),
            wanted: unknown.clone(),
        },
    );
    // A known key then an unknown one: the known one stays too.
    refused_as(
        &delete_keys(json!([a.key, unknown])).await,
        SandboxError::KeyNotFound {
            name: "web".into(),
            wanted: unknown.clone(),
        },
    );
    refused_as(&delete_keys(json!([])).await, SandboxError::NoKeyGiven);

    let (_, record_after) = call(&a.socket, Method::GET, "/v1/sandboxes/web", "").await;
    assert_eq!(
        record_after, record_before,
        "a refused edit changes nothing"
    );
    // The next accepted change is the next sequence number: no refusal
    // wrote anything.
    let (status, view) = call_json(
        &a.socket,
        Method::PUT,
        "/v1/sandboxes/web/app-port",
        json!({"port": 3000}),
    )
    .await;
    assert_eq!((status, &view["app_port"]), (StatusCode::OK, &json!(3000)));
    assert_eq!(generation(&a.socket).await, before + 1);
}
