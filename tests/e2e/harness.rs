//! Test harness for end-to-end tests against a real local control plane
//! (`deploy/local/cluster.sh`: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kwok).
//!
//! * [`env`] makes sure a cluster is reachable (reusing a running one, or
//!   starting one that is torn down when this test process exits), installs
//!   `crds/` once per process and gives each test its own namespace.
//! * [`TestEnv`] deletes its namespace when dropped.
//! * [`spec_manifest`], [`with_future_expire`] and [`in_namespace`] give tests
//!   the spec's example manifests (`examples/spec/*.yaml`).
//!
//! Cluster selection, in order:
//! 1. `SBX_KUBECONFIG`, if set (must be live, else the test fails);
//! 2. `KUBECONFIG`, if it is a single file whose server is on 127.0.0.0/8 and
//!    the cluster is live (never a remote cluster: tests stay on loopback);
//! 3. `$SBX_DEV_DIR/kubeconfig` (default `<repo>/.dev/kubeconfig`) if live;
//! 4. otherwise `deploy/local/cluster.sh up --watch-parent <pid>` starts one,
//!    once per process, that stops when this process exits.
#![allow(dead_code)]

use std::fmt::Debug;
use std::fs::{self, File};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::OnceCell;

/// Everything a test needs: a client, its own namespace and the kubeconfig.
pub struct TestEnv {
    pub client: kube::Client,
    pub ns: String,
    pub kubeconfig: PathBuf,
}

/// Per-process cluster facts, resolved once.
struct Cluster {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

/// Set up once per process; a failure is remembered so that every test reports
/// it at once instead of each retrying a slow start.
static CLUSTER: OnceCell<Result<Cluster, String>> = OnceCell::const_new();

fn cluster() -> &'static Cluster {
    match CLUSTER.get() {
        Some(Ok(c)) => c,
        Some(Err(e)) => panic!("{e}"),
        None => panic!("harness: env() has not set up the cluster yet"),
    }
}

/// Returns a ready test environment with a fresh namespace
/// `<sanitized test name>-<random suffix>`.
pub async fn env(test_name: &str) -> TestEnv {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = match CLUSTER.get_or_init(init_cluster).await {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };

    let client = client_for(&cluster.kubeconfig).await.unwrap_or_else(|e| {
        panic!(
            "harness: cannot build a client for {}: {e}",
            cluster.kubeconfig.display()
        )
    });

    let ns = namespace_name(test_name);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let object: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": ns,
            "labels": {"sbx-e2e": "true", "sbx-e2e/test": label_value(test_name)}
        }
    }))
    .expect("namespace object");
    namespaces
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("harness: creating namespace {ns}: {e}"));

    TestEnv {
        client,
        ns,
        kubeconfig: cluster.kubeconfig.clone(),
    }
}

impl TestEnv {
    /// A scratch directory for this test's tasks to write into. Tasks run as an unprivileged
    /// user, so it is open to everyone.
    pub fn scratch(&self) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sbx-e2e-{}", self.ns));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod the scratch dir");
        dir
    }

    /// Runs kubectl against the test cluster in the test's namespace
    /// (`kubectl -n <ns> <args>`); returns the output whatever the exit status.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("harness: running kubectl")
    }

    /// Like [`TestEnv::kubectl`], with `stdin` fed to the process (e.g. `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .kubectl_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("harness: spawning kubectl");
        let mut pipe = child.stdin.take().expect("kubectl stdin");
        let input = stdin.to_owned();
        // Write from another thread so a large input cannot deadlock against output.
        let writer = std::thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        });
        let out = child
            .wait_with_output()
            .expect("harness: waiting for kubectl");
        let _ = writer.join();
        out
    }

    /// Runs kubectl and panics with its output unless it succeeds; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        check_ok(&format!("kubectl {}", args.join(" ")), &out)
    }

    /// `kubectl apply --server-side -f -` of `yaml` into the test namespace; panics on failure.
    pub fn apply(&self, yaml: &str) -> String {
        let yaml = in_namespace(yaml, &self.ns);
        let out = self.kubectl_stdin(
            &[
                "apply",
                "--server-side",
                "--field-manager=sbx-e2e",
                "-f",
                "-",
            ],
            &yaml,
        );
        check_ok(&format!("kubectl apply of\n{yaml}"), &out)
    }

    /// Polls `f` every 200 ms until it yields a value (`true`, `Some(v)` or
    /// `Ok(v)`) and returns that value; panics after `timeout` with `what` and
    /// the last observation.
    pub async fn wait_for<F, Fut, P>(&self, what: &str, timeout: Duration, mut f: F) -> P::Value
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = P>,
        P: Probe,
    {
        let start = Instant::now();
        loop {
            let last = match f().await.check() {
                Ok(v) => return v,
                Err(last) => last,
            };
            if start.elapsed() >= timeout {
                panic!(
                    "timed out after {:?} waiting for {what} (namespace {}); last observation: {last}",
                    timeout, self.ns
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls `kubectl args` (as [`TestEnv::wait_for`] does) until its output satisfies
    /// `accept`, and returns that output.
    pub async fn wait_for_kubectl(
        &self,
        what: &str,
        timeout: Duration,
        args: &[&str],
        accept: impl Fn(&str) -> bool,
    ) -> String {
        self.wait_for(what, timeout, || async {
            let out = self.kubectl_ok(args);
            if accept(&out) { Ok(out) } else { Err(out) }
        })
        .await
    }

    /// The kubectl command [`TestEnv::kubectl`] runs, not started yet.
    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let cluster = cluster();
        let mut cmd = Command::new(&cluster.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .arg("-n")
            .arg(&self.ns)
            .args(args);
        cmd
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("harness: test failed; its namespace was {}", self.ns);
        }
        if std::env::var_os("SBX_KEEP_NS").is_some() {
            eprintln!("harness: SBX_KEEP_NS is set, keeping namespace {}", self.ns);
            return;
        }
        if let Some(Ok(cluster)) = CLUSTER.get() {
            self.cleanup(cluster);
        }
    }
}

/// What a test namespace may hold that carries finalizers of our controller.
const FINALIZED_KINDS: [&str; 3] = [
    "batchsandboxes.sandbox.opensandbox.io",
    "pools.sandbox.opensandbox.io",
    "pods",
];

impl TestEnv {
    /// Deletes the namespace without waiting. The controller of a test is
    /// usually gone by now, so finalizers it put on BatchSandboxes, Pools and
    /// pods would hold the namespace in Terminating forever: delete those
    /// objects first (after which no finalizer can be added) and strip the
    /// finalizers. Best effort; failures are ignored.
    fn cleanup(&self, cluster: &Cluster) {
        let run = |args: &[&str]| {
            Command::new(&cluster.kubectl)
                .env("KUBECONFIG", &self.kubeconfig)
                .arg("-n")
                .arg(&self.ns)
                .args(args)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let kinds = FINALIZED_KINDS.join(",");
        run(&[
            "delete",
            &kinds,
            "--all",
            "--wait=false",
            "--ignore-not-found",
        ]);
        for kind in FINALIZED_KINDS {
            let Some(listing) = run(&[
                "get",
                kind,
                "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.metadata.finalizers}{\"\\n\"}{end}",
            ]) else {
                continue;
            };
            let names: Vec<&str> = listing
                .lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(_, finalizers)| !finalizers.trim().is_empty())
                .map(|(name, _)| name)
                .collect();
            if !names.is_empty() {
                let mut args = vec!["patch", kind];
                args.extend(&names);
                args.extend(["--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#]);
                run(&args);
            }
        }
        run(&[
            "delete",
            "namespace",
            &self.ns,
            "--wait=false",
            "--ignore-not-found",
        ]);
    }
}

/// What [`TestEnv::wait_for`] accepts from its closure.
pub trait Probe {
    type Value;
    /// `Ok(value)` when done, `Err(description of the last observation)` otherwise.
    fn check(self) -> Result<Self::Value, String>;
}

impl Probe for bool {
    type Value = ();
    fn check(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("condition was false".into())
        }
    }
}

impl<T> Probe for Option<T> {
    type Value = T;
    fn check(self) -> Result<T, String> {
        self.ok_or_else(|| "None".into())
    }
}

impl<T, E: Debug> Probe for Result<T, E> {
    type Value = T;
    fn check(self) -> Result<T, String> {
        self.map_err(|e| format!("{e:?}"))
    }
}

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The state directory of `deploy/local/cluster.sh` (`$SBX_DEV_DIR` or `<repo>/.dev`).
pub fn dev_dir() -> PathBuf {
    match std::env::var_os("SBX_DEV_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root().join(".dev"),
    }
}

// ------------------------------------------------------------ spec manifests --

/// The spec's example manifest `name` (with or without `.yaml`), exactly as
/// committed under `examples/spec/`.
pub fn spec_manifest(name: &str) -> String {
    let file = if name.ends_with(".yaml") {
        name.to_owned()
    } else {
        format!("{name}.yaml")
    };
    let path = repo_root().join("examples/spec").join(&file);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("harness: reading {}: {e}", path.display()))
}

/// File names of all spec manifests under `examples/spec/`, sorted.
pub fn spec_manifest_names() -> Vec<String> {
    let dir = repo_root().join("examples/spec");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("harness: reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    names
}

/// Rewrites every `expireTime` that is in the past (or less than an hour
/// away) to 30 days from now, keeping quoting and comments. The spec's
/// `2026-03-02T12:00:00Z` and `2026-03-08T00:00:00Z` have passed, and the
/// webhook rejects past expiry times on create (clarifications.md).
pub fn with_future_expire(yaml: &str) -> String {
    let now = unix_now();
    let future = format_rfc3339(now + 30 * 86_400);
    let mut out = String::with_capacity(yaml.len());
    for line in yaml.split_inclusive('\n') {
        out.push_str(&rewrite_expire_line(line, now + 3600, &future));
    }
    out
}

fn rewrite_expire_line(line: &str, not_before: i64, replacement: &str) -> String {
    let Some(key) = line.find("expireTime:") else {
        return line.to_owned();
    };
    let value_start = key + "expireTime:".len();
    let rest = &line[value_start..];
    let trimmed = rest.trim_start();
    let lead = rest.len() - trimmed.len();
    let (quote, body) = match trimmed.chars().next() {
        Some(q @ ('"' | '\'')) => (Some(q), &trimmed[1..]),
        _ => (None, trimmed),
    };
    let end = match quote {
        Some(q) => body.find(q),
        None => body.find(|c: char| c.is_whitespace() || c == '#'),
    }
    .unwrap_or(body.len());
    let value = &body[..end];
    match parse_rfc3339(value) {
        Some(t) if t < not_before => {
            let offset = value_start + lead + usize::from(quote.is_some());
            format!(
                "{}{}{}",
                &line[..offset],
                replacement,
                &line[offset + value.len()..]
            )
        }
        _ => line.to_owned(),
    }
}

/// Sets `metadata.namespace` of every document in `yaml` to `ns`, so the
/// spec's `namespace: default` manifests can go into a test namespace.
pub fn in_namespace(yaml: &str, ns: &str) -> String {
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let mut value: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc)
            .unwrap_or_else(|e| panic!("harness: invalid YAML: {e}\n{yaml}"));
        if value.is_null() {
            continue;
        }
        let meta = value
            .get_mut("metadata")
            .and_then(|m| m.as_mapping_mut())
            .unwrap_or_else(|| panic!("harness: manifest without metadata:\n{yaml}"));
        meta.insert("namespace".into(), ns.into());
        docs.push(serde_yaml_ng::to_string(&value).expect("serialise YAML"));
    }
    docs.join("---\n")
}

// --------------------------------------------------------------- internals --

fn check_ok(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "{what}\nfailed with {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}

async fn client_for(kubeconfig: &Path) -> Result<kube::Client, String> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

async fn init_cluster() -> Result<Cluster, String> {
    let setup = tokio::task::spawn_blocking(|| {
        let cluster = find_or_start_cluster();
        install_crds(&cluster);
        cluster
    })
    .await;
    setup.map_err(|e| {
        let msg = e
            .try_into_panic()
            .ok()
            .and_then(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            })
            .unwrap_or_else(|| "cancelled".into());
        format!("harness: cluster setup failed: {msg}")
    })
}

/// The kubectl to use: `$SBX_KUBECTL`, else the v1.36 client the cluster
/// script links into `<dev>/bin`, else `kubectl` from PATH.
fn kubectl_path() -> PathBuf {
    if let Some(k) = std::env::var_os("SBX_KUBECTL").filter(|k| !k.is_empty()) {
        return PathBuf::from(k);
    }
    let dev = dev_dir().join("bin/kubectl");
    if dev.exists() {
        dev
    } else {
        PathBuf::from("kubectl")
    }
}

fn is_live(kubectl: &Path, kubeconfig: &Path) -> bool {
    if !kubeconfig.is_file() {
        return false;
    }
    Command::new(kubectl)
        .env("KUBECONFIG", kubeconfig)
        .args(["get", "--raw", "/readyz", "--request-timeout=5s"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && o.stdout.starts_with(b"ok"))
        .unwrap_or(false)
}

/// True if the current context of `kubeconfig` points at a loopback address.
fn is_loopback_cluster(kubeconfig: &Path) -> bool {
    let Ok(kc) = Kubeconfig::read_from(kubeconfig) else {
        return false;
    };
    let Some(ctx_name) = kc.current_context.as_deref() else {
        return false;
    };
    let Some(ctx) = kc
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)
        .and_then(|c| c.context.as_ref())
    else {
        return false;
    };
    let Some(server) = kc
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.as_deref())
    else {
        return false;
    };
    is_loopback_url(server)
}

/// True if the host of URL `server` (`scheme://host[:port][/path]`) is loopback.
fn is_loopback_url(server: &str) -> bool {
    let authority = server.split_once("://").map_or(server, |(_, rest)| rest);
    let authority = authority.split('/').next().unwrap_or_default();
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn find_or_start_cluster() -> Cluster {
    let mut kubectl = kubectl_path();

    if let Some(path) = std::env::var_os("SBX_KUBECONFIG").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            is_live(&kubectl, &path),
            "harness: SBX_KUBECONFIG={} does not reach a ready apiserver",
            path.display()
        );
        return Cluster {
            kubeconfig: path,
            kubectl,
        };
    }
    if let Some(path) = std::env::var_os("KUBECONFIG").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if path.is_file() && is_loopback_cluster(&path) && is_live(&kubectl, &path) {
            return Cluster {
                kubeconfig: path,
                kubectl,
            };
        }
        eprintln!(
            "harness: ignoring KUBECONFIG={} (not a single live kubeconfig for a cluster on 127.0.0.0/8)",
            path.display()
        );
    }

    let dev = dev_dir();
    let kubeconfig = dev.join("kubeconfig");
    fs::create_dir_all(&dev).unwrap_or_else(|e| panic!("harness: creating {}: {e}", dev.display()));
    // Serialise with other test processes sharing this state directory.
    let lock_path = dev.join("harness.lock");
    let lock = File::create(&lock_path)
        .unwrap_or_else(|e| panic!("harness: {}: {e}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|e| panic!("harness: locking {}: {e}", lock_path.display()));

    if !is_live(&kubectl, &kubeconfig) {
        let script = repo_root().join("deploy/local/cluster.sh");
        eprintln!(
            "harness: starting the local control plane with {} up (a first build of sbx-cluster takes 10-20 min)",
            script.display()
        );
        let started = Instant::now();
        let out = Command::new(&script)
            .args(["up", "--watch-parent", &std::process::id().to_string()])
            // The executor runner uses the binaries cargo built for this test run, instead of
            // a nested `cargo build` whose different environment would rebuild dependencies.
            .env("SBX_RUNNER_BIN", workspace_bin("sandbox-local-executors"))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("harness: running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "harness: {} up failed ({}); see {}/logs",
            script.display(),
            out.status,
            dev.display()
        );
        eprintln!("harness: control plane up in {:.1?}", started.elapsed());
        kubectl = kubectl_path();
        assert!(
            is_live(&kubectl, &kubeconfig),
            "harness: cluster.sh up succeeded but {} is not live",
            kubeconfig.display()
        );
    }
    drop(lock);
    Cluster {
        kubeconfig,
        kubectl,
    }
}

/// Server-side applies every `crds/*.yaml` and waits until each CRD is Established.
fn install_crds(cluster: &Cluster) {
    let dir = repo_root().join("crds");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("harness: reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "harness: {} has no CRD manifests; run `make crds`",
        dir.display()
    );

    let mut args: Vec<String> = [
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=sbx-e2e",
        "-o",
        "name",
    ]
    .map(String::from)
    .to_vec();
    for f in &files {
        args.push("-f".into());
        args.push(f.display().to_string());
    }
    let out = Command::new(&cluster.kubectl)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("harness: running kubectl apply");
    let names = check_ok("harness: installing crds/", &out);
    let crds: Vec<&str> = names
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("customresourcedefinition"))
        .collect();
    assert!(
        !crds.is_empty(),
        "harness: crds/ applied no CustomResourceDefinition:\n{names}"
    );

    // A CRD created a moment ago may have no status yet, which `kubectl wait` reports as an
    // error ("accessor error: <nil>") instead of waiting: ask again until the deadline.
    let mut wait = vec!["wait", "--for=condition=Established", "--timeout=10s"];
    wait.extend(crds.iter().copied());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(&cluster.kubectl)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .args(&wait)
            .stdin(Stdio::null())
            .output()
            .expect("harness: running kubectl wait");
        let no_status_yet = String::from_utf8_lossy(&out.stderr).contains("accessor error: <nil>");
        if out.status.success() || !no_status_yet || Instant::now() > deadline {
            check_ok("harness: waiting for CRDs to be Established", &out);
            return;
        }
    }
}

static NS_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `<sanitized test name>-<6 random chars>`, a valid DNS label of at most 63 chars.
fn namespace_name(test_name: &str) -> String {
    let mut base = label_value(test_name).replace(['_', '.'], "-");
    base.truncate(50);
    let base = base.trim_matches('-');
    let base = if base.is_empty() { "e2e" } else { base };

    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NS_COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_i128(Timestamp::now().as_nanosecond());
    let mut n = h.finish();
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = (0..6)
        .map(|_| {
            let c = alphabet[(n % 36) as usize] as char;
            n /= 36;
            c
        })
        .collect();
    format!("{base}-{suffix}")
}

/// Lower-case alphanumerics and `-_.`, at most 63 chars, alphanumeric at both ends.
fn label_value(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
            c
        } else {
            '-'
        };
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    out.truncate(63);
    out.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

// ------------------------------------------------------------------ time --

fn unix_now() -> i64 {
    Timestamp::now().as_second()
}

/// Unix seconds of an RFC 3339 time (any offset), if it is one.
fn parse_rfc3339(s: &str) -> Option<i64> {
    s.parse::<Timestamp>().ok().map(|t| t.as_second())
}

/// `t` (Unix seconds) as RFC 3339 in UTC, e.g. `2026-03-02T12:00:00Z`.
fn format_rfc3339(t: i64) -> String {
    Timestamp::from_second(t)
        .map(|t| t.to_string())
        .unwrap_or_else(|e| panic!("harness: {t} is not a representable time: {e}"))
}

/// A binary of another workspace package (the executor, the local runner), built next to the
/// controller binary this test run built. `make test` builds them all first (`cargo build --workspace --all-targets`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_sandbox-controller")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace --all-targets`, as `make test` does)",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        for t in [0, 951_782_400, 1_772_452_800, 1_798_761_599, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("2026-03-02T12:00:00Z"), Some(1_772_452_800));
        assert_eq!(
            parse_rfc3339("2026-03-02T13:00:00+01:00"),
            Some(1_772_452_800)
        );
        assert_eq!(parse_rfc3339("2026-03-02T12:00:00.5Z"), Some(1_772_452_800));
        assert_eq!(parse_rfc3339("2026-13-02T12:00:00Z"), None);
        assert_eq!(parse_rfc3339("not a date"), None);
    }

    #[test]
    fn past_expire_times_move_to_the_future() {
        let yaml =
            "spec:\n  expireTime: \"2026-03-02T12:00:00Z\"  # Auto-delete on March 2, 2026\n";
        let out = with_future_expire(yaml);
        let line = out.lines().nth(1).unwrap();
        assert!(line.starts_with("  expireTime: \""), "{line}");
        assert!(
            line.ends_with("\"  # Auto-delete on March 2, 2026"),
            "{line}"
        );
        let value = line.split('"').nth(1).unwrap();
        let t = parse_rfc3339(value).expect("valid RFC 3339");
        assert!(
            t > unix_now() + 29 * 86_400,
            "{value} is not ~30 days ahead"
        );

        let unquoted = with_future_expire("  expireTime: 2026-03-08T00:00:00Z\n");
        assert!(!unquoted.contains("2026-03-08"), "{unquoted}");

        let far = "  expireTime: \"2999-12-31T23:59:59Z\"\n";
        assert_eq!(
            with_future_expire(far),
            far,
            "future times stay as they are"
        );
        assert_eq!(with_future_expire("replicas: 3\n"), "replicas: 3\n");
    }

    #[test]
    fn namespace_names_are_dns_labels() {
        for name in [
            "crds::gc_removes_pods",
            "Weird Name!!",
            "",
            &"x".repeat(200),
        ] {
            let ns = namespace_name(name);
            assert!(ns.len() <= 63, "{ns}");
            assert!(
                ns.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{ns}"
            );
            assert!(ns.starts_with(|c: char| c.is_ascii_alphanumeric()), "{ns}");
        }
        assert_ne!(namespace_name("a"), namespace_name("a"));
    }

    #[test]
    fn loopback_urls() {
        assert!(is_loopback_url("https://127.0.0.1:16440"));
        assert!(is_loopback_url("https://127.9.8.7"));
        assert!(is_loopback_url("https://localhost:6443/"));
        assert!(is_loopback_url("https://[::1]:6443"));
        assert!(!is_loopback_url("https://10.0.0.1:6443"));
        assert!(!is_loopback_url("https://example.com"));
        assert!(!is_loopback_url("https://127.0.0.1.example.com:443"));
    }

    #[test]
    fn in_namespace_replaces_and_adds() {
        let out = in_namespace(&spec_manifest("pool"), "t-1");
        assert!(out.contains("namespace: t-1"), "{out}");
        assert!(!out.contains("namespace: default"), "{out}");
        let out = in_namespace(&spec_manifest("rl-batch.yaml"), "t-2");
        assert!(out.contains("namespace: t-2"), "{out}");
    }
}
