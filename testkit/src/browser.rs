//! Headless Chromium driven over WebDriver: Debian's `chromium` and
//! `chromium-driver` (ops/test.sh installs both), `chromedriver` started on
//! a free port of 127.0.0.1 for one browser session.
//!
//! `UNIDESK_CHROMIUM` and `UNIDESK_CHROMEDRIVER` name other binaries.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

/// The window the pages are shown in, in CSS pixels.
pub const WINDOW: (u32, u32) = (1440, 1100);

/// A browser session. Call [`Browser::close`] to end it; dropping it
/// only stops the driver.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    _driver: Driver,
}

/// The chromedriver process, stopped when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first of `candidates` that exists, or `env`'s value.
fn binary(env: &str, candidates: &[&str]) -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var(env) {
        return Ok(PathBuf::from(path));
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            format!(
                "none of {candidates:?} exists: install Debian's chromium and chromium-driver \
                 (ops/test.sh does), or set {env}"
            )
        })
}

impl Browser {
    /// Starts chromedriver and opens a headless Chromium session.
    ///
    /// # Errors
    /// What is missing or failed, in words.
    pub async fn start() -> Result<Browser, String> {
        let chromium = binary(
            "UNIDESK_CHROMIUM",
            &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
        )?;
        let chromedriver = binary(
            "UNIDESK_CHROMEDRIVER",
            &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
        )?;
        let port = crate::free_port();
        let driver = Driver(
            Command::new(&chromedriver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting {}: {e}", chromedriver.display()))?,
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{url}/status")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err("chromedriver did not answer within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut caps = Capabilities::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Tests run as root, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-extensions",
                    "--no-first-run",
                    "--force-device-scale-factor=1",
                    format!("--window-size={},{}", WINDOW.0, WINDOW.1),
                ],
            }),
        );
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .map_err(|e| format!("opening a Chromium session: {e}"))?;
        Ok(Browser {
            client,
            _driver: driver,
        })
    }

    /// Waits at most `patience` for an element matching `css`.
    ///
    /// # Errors
    /// The selector and what the page showed instead.
    pub async fn wait_for(
        &self,
        css: &str,
        patience: Duration,
    ) -> Result<fantoccini::elements::Element, String> {
        match self
            .client
            .wait()
            .at_most(patience)
            .every(Duration::from_millis(50))
            .for_element(Locator::Css(css))
            .await
        {
            Ok(e) => Ok(e),
            Err(e) => {
                let text = self.client.find(Locator::Css("main")).await.ok();
                let shown = match text {
                    Some(el) => el.text().await.unwrap_or_default(),
                    None => String::new(),
                };
                Err(format!(
                    "no {css} within {patience:?} ({e}); the page shows:\n{shown}"
                ))
            }
        }
    }

    /// Ends the session and the driver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}
