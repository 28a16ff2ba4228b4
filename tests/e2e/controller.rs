//! A real `sandbox-controller run` process per test, scoped to the test's namespace, so tests run
//! in parallel without two controllers ever managing the same objects.
#![allow(dead_code)]

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use sandbox_domain::allocation::AllocStatus;
use sandbox_domain::api::{BatchSandbox, Pool, names};

use crate::harness::{TestEnv, dev_dir};

/// A controller process; killed (SIGKILL) when dropped.
pub struct ControllerProcess {
    child: Child,
    pub log: std::path::PathBuf,
    args: Vec<String>,
    binary: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
    ns: String,
}

impl TestEnv {
    /// Starts `sandbox-controller run --namespace <ns> <extra>` against the test cluster.
    pub fn start_controller(&self, extra: &[&str]) -> ControllerProcess {
        self.start_controller_from(
            std::path::Path::new(env!("CARGO_BIN_EXE_sandbox-controller")),
            &self.kubeconfig,
            extra,
        )
    }

    /// Like [`TestEnv::start_controller`], with another binary and another identity (the
    /// credentials in `kubeconfig`).
    pub fn start_controller_from(
        &self,
        binary: &std::path::Path,
        kubeconfig: &std::path::Path,
        extra: &[&str],
    ) -> ControllerProcess {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if !extra.iter().any(|a| a.starts_with("--health-addr")) {
            // Parallel tests each run a controller: let the OS pick the health port.
            args.extend(["--health-addr".to_string(), "127.0.0.1:0".to_string()]);
        }
        // The local executor runner's signing key sits beside the kubeconfig (cluster.sh's
        // state dir): the controller signs each executor request with it.
        let key = self.kubeconfig.with_file_name("executor-signing-key");
        if key.exists()
            && !extra
                .iter()
                .any(|a| a.starts_with("--executor-signing-key"))
        {
            args.extend([
                "--executor-signing-key-file".to_string(),
                key.display().to_string(),
            ]);
        }
        // Each process its own log (tests read their health address from it).
        let logs = dev_dir().join("logs");
        let generation = (0..)
            .find(|g| {
                !logs
                    .join(format!("controller-{}-{g}.log", self.ns))
                    .exists()
            })
            .unwrap_or_default();
        spawn(binary, kubeconfig, &self.ns, args, generation)
    }

    pub fn batches(&self) -> Api<BatchSandbox> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pools(&self) -> Api<Pool> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// The batch, or `None` once it is gone.
    pub async fn batch(&self, name: &str) -> Option<BatchSandbox> {
        self.batches()
            .get_opt(name)
            .await
            .expect("reading BatchSandbox")
    }

    pub async fn pool(&self, name: &str) -> Option<Pool> {
        self.pools().get_opt(name).await.expect("reading Pool")
    }

    /// Pods in the namespace with `label_selector`, terminating ones excluded.
    pub async fn live_pods(&self, label_selector: &str) -> Vec<Pod> {
        self.pods()
            .list(&ListParams::default().labels(label_selector))
            .await
            .expect("listing pods")
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect()
    }

    /// Waits until the batch reports `allocated` and `ready` equal to `n` (and desired `n`).
    pub async fn wait_batch_ready(&self, name: &str, n: i32, timeout: Duration) -> BatchSandbox {
        self.wait_for(
            &format!("BatchSandbox {name} to have {n} ready sandboxes"),
            timeout,
            || async {
                let batch = self.batch(name).await?;
                let status = batch.status.clone()?;
                (batch.spec.replicas == n
                    && status.allocated == n
                    && status.ready == n
                    && status.replicas == n)
                    .then_some(batch)
            },
        )
        .await
    }
}

/// The pods a pooled batch holds, from its ledger.
pub fn ledger(batch: &BatchSandbox) -> Vec<String> {
    AllocStatus::of(batch).expect("valid alloc-status").pods
}

/// The parsed endpoints annotation: (sandbox_id, ip) in order.
pub fn endpoints(batch: &BatchSandbox) -> Vec<(String, String)> {
    let text = batch
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(names::ANNOTATION_ENDPOINTS))
        .cloned()
        .unwrap_or_default();
    let list: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
    list.iter()
        .map(|e| {
            (
                e["sandbox_id"].as_str().unwrap_or_default().to_string(),
                e["ip"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn spawn(
    binary: &std::path::Path,
    kubeconfig: &std::path::Path,
    ns: &str,
    args: Vec<String>,
    generation: u32,
) -> ControllerProcess {
    let logs = dev_dir().join("logs");
    std::fs::create_dir_all(&logs).expect("creating log dir");
    let log = logs.join(format!("controller-{ns}-{generation}.log"));
    let file = File::create(&log).expect("creating controller log");
    let child = Command::new(binary)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,sandbox_controller=debug")
        .args(["run", "--namespace", ns])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log handle"))
        .stderr(file)
        .spawn()
        .expect("starting sandbox-controller");
    ControllerProcess {
        child,
        log,
        args,
        binary: binary.to_path_buf(),
        kubeconfig: kubeconfig.to_path_buf(),
        ns: ns.to_string(),
    }
}

impl ControllerProcess {
    /// SIGKILL: no cleanup, no graceful shutdown.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a fresh process with the same arguments (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        self.kill();
        let logs = self.log.parent().expect("log dir").to_path_buf();
        let generation = (0..)
            .find(|g| {
                !logs
                    .join(format!("controller-{}-{g}.log", self.ns))
                    .exists()
            })
            .unwrap_or_default();
        *self = spawn(
            &self.binary.clone(),
            &self.kubeconfig.clone(),
            &self.ns.clone(),
            self.args.clone(),
            generation,
        );
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The process id (part of its identity in the leader Lease: `<host>-<pid>`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Where this process serves `/healthz`, `/readyz` and `/metrics`, from the line it logs
    /// once the port is bound.
    pub async fn health_addr(&self) -> std::net::SocketAddr {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let addr = log
                .lines()
                .filter(|l| l.contains("health and metrics listening"))
                .find_map(|l| {
                    l.split("addr=")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                });
            if let Some(addr) = addr {
                return addr;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never logged its health address",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET path` on the health server: the status code and the body.
    pub async fn health_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.health_addr().await;
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connecting to the health server");
        let request = format!("GET {path} HTTP/1.1\r\nhost: e2e\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("sending");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.expect("reading");
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
        let body = reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// The sum of `sandbox_controller_api_writes_total` over all targets.
    pub async fn api_writes(&self) -> u64 {
        self.api_writes_in("sandbox_controller_api_writes_total{")
            .await
    }

    /// `sandbox_controller_api_writes_total` for one target (`batchsandbox`, `event`...).
    pub async fn api_writes_to(&self, target: &str) -> u64 {
        self.api_writes_in(&format!(
            "sandbox_controller_api_writes_total{{target=\"{target}\"}}"
        ))
        .await
    }

    /// The sum of the series whose lines start with `series`.
    async fn api_writes_in(&self, series: &str) -> u64 {
        let (status, body) = self.health_get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Shared handle type for tests that hand the environment to spawned tasks.
pub type SharedEnv = Arc<TestEnv>;
