//! Shared harness of the incusctl integration tests: connects to the real
//! incusd prepared by `.ci/setup-incus.sh`, names instances uniquely and
//! deletes them when a test ends (also on panic).

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::time::Duration;

use incusctl::{Client, CreateInstance, ImageSource};

/// Alias of the image `.ci/setup-incus.sh` imports.
pub const TEST_IMAGE: &str = "test/debian-ssh";

/// Bound on waiting for a fresh container's DHCP address.
pub const ADDRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// Connects to incusd, or fails with instructions.
pub async fn incus() -> Client {
    match Client::connect(None).await {
        Ok(c) => c,
        Err(e) => panic!(
            "the incusctl tests need a running incusd with the test image: {e}\n\
             run `.ci/setup-incus.sh` as root first"
        ),
    }
}

/// `t-incusctl-<tag>-<random>`: unique per test and per run.
pub fn unique_name(tag: &str) -> String {
    format!("t-incusctl-{tag}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// An instance deleted (forcibly) when dropped.
pub struct TestInstance {
    pub client: Client,
    pub name: String,
}

impl TestInstance {
    /// Launches `test/debian-ssh` with nesting and small limits, started.
    pub async fn launch(client: &Client, tag: &str) -> TestInstance {
        let (guard, req) = Self::prepare(client, tag);
        client.create_instance(&req).await.expect("create instance");
        guard
    }

    /// Like [`TestInstance::launch`], collecting Incus' progress reports.
    pub async fn launch_with_progress(
        client: &Client,
        tag: &str,
    ) -> (TestInstance, Vec<incusctl::Progress>) {
        let (guard, req) = Self::prepare(client, tag);
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let collector = tokio::spawn(async move {
            let mut all = Vec::new();
            while let Some(p) = rx.recv().await {
                all.push(p);
            }
            all
        });
        client
            .create_instance_with_progress(&req, tx)
            .await
            .expect("create instance");
        (guard, collector.await.unwrap())
    }

    fn prepare(client: &Client, tag: &str) -> (TestInstance, CreateInstance) {
        let name = unique_name(tag);
        let req = CreateInstance::new(&name, ImageSource::local(TEST_IMAGE))
            .docker_ready()
            .limits_cpu(1)
            .limits_memory("512MiB")
            .config("user.incusctl.test", "1")
            .start(true);
        // The guard exists before the instance, so a half-made instance
        // is removed too.
        let guard = TestInstance {
            client: client.clone(),
            name,
        };
        (guard, req)
    }

    /// A guard for an instance the test creates itself.
    pub fn adopt(client: &Client, name: &str) -> TestInstance {
        TestInstance {
            client: client.clone(),
            name: name.to_string(),
        }
    }
}

impl Drop for TestInstance {
    fn drop(&mut self) {
        let client = self.client.clone();
        let name = self.name.clone();
        // Drop cannot be async: run the cleanup on its own small runtime.
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async {
                match client.delete_instance(&name, true).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => eprintln!("cleanup of instance {name} failed: {e}"),
                }
            });
        });
        let _ = handle.join();
    }
}
