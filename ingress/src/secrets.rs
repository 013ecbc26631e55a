//! Project secrets for running attempts: a node asks (a
//! [`TransferOp::Secrets`](protocol::TransferOp::Secrets) request) right
//! before it needs them, and gets the values of exactly the secrets its
//! attempt's task names, only while that attempt runs on it. Which secrets
//! is read from the task's spec, never taken from the node. Values are
//! opened with the server's secrets key at that moment, so a secret set
//! again since submission gives its current value, and one deleted since
//! fails the attempt saying so. The answer never enters a log line or an
//! event: only the names and the attempt are logged.

use domain::project::Project;
use protocol::{SecretValues, TransferGrant, TransferRequest, MAX_FRAME_BYTES};
use store::secrets::{self, SecretsKey};
use store::Store;
use uuid::Uuid;

use crate::transfers::{database_failed, live_attempt};

/// What a node is told when the server has no key.
const NO_KEY: &str =
    "this server has no secrets key (start it with --secrets-key-file), so it cannot hand out the task's secrets";

/// The room a frame leaves for values, after the rest of the answer.
const VALUES_BUDGET: usize = MAX_FRAME_BYTES - 4096;

/// The values of the secrets the task of `request`'s attempt names.
pub(crate) async fn grant(
    store: &Store,
    key: Option<&SecretsKey>,
    node_id: Uuid,
    request: &TransferRequest,
) -> Result<TransferGrant, String> {
    let task = live_attempt(store, node_id, request.task_id, request.attempt).await?;
    let spec = task.spec.as_ref().ok_or("the task has no spec")?;
    let names = spec.secrets();
    if names.is_empty() {
        return Ok(TransferGrant::default());
    }
    let key = key.ok_or(NO_KEY)?;
    let project = store
        .load::<Project>(&spec.project_id.to_string())
        .await
        .map_err(|e| database_failed("the task's project", &e))?
        .map(|l| l.state)
        .ok_or("the task's project does not exist")?;
    let mut values = SecretValues::default();
    let mut bytes = 0;
    for (name, field) in names {
        let value_id = project
            .secret(name)
            .and_then(|s| s.value_id)
            .ok_or_else(|| {
                format!("secret {name} ({field}) was deleted from the project after the task was submitted")
            })?;
        let value =
            secrets::open_value(store.pool(), key, spec.project_id, name.as_str(), value_id)
                .await
                .map_err(|e| match e {
                    secrets::SecretsError::Db(e) => database_failed("the task's secrets", &e),
                    other => format!("secret {name} ({field}): {other}"),
                })?;
        let value = String::from_utf8(value.to_vec())
            .map_err(|_| format!("secret {name} ({field}) is not text"))?;
        // As it travels: JSON-escaped.
        bytes += name.as_str().len()
            + serde_json::to_string(&value).map_or(value.len() * 6, |j| j.len());
        if bytes > VALUES_BUDGET {
            return Err(format!(
                "the task's secrets are too large to hand to a node at once (more than {VALUES_BUDGET} bytes); use fewer or smaller ones"
            ));
        }
        values.0.insert(name.to_string(), value);
    }
    tracing::info!(
        %node_id,
        task_id = %request.task_id,
        attempt = request.attempt,
        secrets = ?values,
        "handed the attempt its secrets"
    );
    Ok(TransferGrant {
        secrets: values,
        ..TransferGrant::default()
    })
}
