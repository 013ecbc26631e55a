//! What UniDesk's benchmark binaries share: the database they measure on,
//! and the parts of the fault harness ([`faults`]). Servers are started
//! through [`testkit::process`], as the end-to-end tests start them.

pub mod faults;

/// The database a benchmark measures on: the one given, or a private
/// PostgreSQL cluster started for this run (fsync off, like the test
/// clusters), kept until [`Database::stop`] or the process exits.
pub struct Database {
    /// The URL to connect to.
    pub url: String,
    cluster: Option<pgcluster::LocalCluster>,
}

impl Database {
    /// `url` when given, else a private cluster's `unidesk` database.
    ///
    /// # Errors
    /// When the private cluster cannot be started.
    pub async fn given_or_private(url: Option<&str>) -> anyhow::Result<Database> {
        use anyhow::Context;
        match url {
            Some(url) => Ok(Database {
                url: url.to_string(),
                cluster: None,
            }),
            None => {
                let cluster = pgcluster::LocalCluster::start_ephemeral()
                    .await
                    .context("starting a private PostgreSQL")?;
                Ok(Database {
                    url: cluster.url(),
                    cluster: Some(cluster),
                })
            }
        }
    }

    /// Stops the private cluster, if one was started.
    ///
    /// # Errors
    /// When the cluster does not stop cleanly.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Some(cluster) = self.cluster {
            cluster.stop().await?;
        }
        Ok(())
    }
}
