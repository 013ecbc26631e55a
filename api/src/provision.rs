//! Provisioning a node: one rule for the REST route and the `unidesk node
//! add` command.

use std::collections::BTreeMap;

use chrono::Utc;
use domain::node::{Node, NodeCommand, ResourceLimitsDraft};
use domain::spec::{validate_labels, validate_name};
use domain::Actor;
use store::{names, tokens, Store, StoreError};
use uuid::Uuid;

use crate::error::{ApiError, Problem};

/// Creates node `name` with `labels` and its agent's token, with no
/// maximum on what it may claim. Returns the node and the token, which is
/// shown once and stored only as a hash.
///
/// # Errors
/// As [`provision_node_with_limits`].
pub async fn provision_node(
    store: &Store,
    name: &str,
    labels: BTreeMap<String, String>,
    actor: &Actor,
) -> Result<(Node, String), ApiError> {
    provision_node_with_limits(store, name, labels, ResourceLimitsDraft::default(), actor).await
}

/// Creates node `name` with `labels` (the only ones placement matches
/// until an admin changes them) and `max_resources`, the most it may claim
/// whatever its agent declares. Returns the node and its agent's token,
/// which is shown once and stored only as a hash.
///
/// # Errors
/// 422 for a bad name, labels or maximum (naming each field), 409 when the
/// name is taken, 500 when the log cannot be written.
pub async fn provision_node_with_limits(
    store: &Store,
    name: &str,
    labels: BTreeMap<String, String>,
    max_resources: ResourceLimitsDraft,
    actor: &Actor,
) -> Result<(Node, String), ApiError> {
    let mut problems = Vec::new();
    if let Err(reason) = validate_name(name) {
        problems.push(Problem::field("name", reason));
    }
    if let Err(e) = validate_labels("labels", &labels) {
        problems.push(e.into());
    }
    let max_resources = max_resources
        .validate("max_resources")
        .map_err(|errors| problems.extend(errors.into_iter().map(Problem::from)))
        .unwrap_or_default();
    if !problems.is_empty() {
        return Err(ApiError::Invalid(problems));
    }
    let id = Uuid::now_v7();
    let key = id.to_string();
    names::claim(store.pool(), "node", name, &key).await?;
    let issued = tokens::issue_node(id);
    let now = Utc::now();
    let command = NodeCommand::Provision {
        node_id: id,
        name: name.to_string(),
        labels,
        token_fingerprint: issued.fingerprint.clone(),
        max_resources,
        by: actor.clone(),
        at: now,
    };
    match store.execute::<Node>(&key, command, actor, now).await {
        Ok(executed) => Ok((executed.state, issued.token)),
        Err(e) => {
            if matches!(e, StoreError::Rejected(_)) {
                if let Err(release) = names::release(store.pool(), "node", name, &key).await {
                    tracing::warn!(error = %release, "releasing a refused node's name failed");
                }
            }
            Err(e.into())
        }
    }
}
