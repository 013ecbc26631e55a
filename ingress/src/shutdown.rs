//! Recording the ends of the sessions an ingress closes when it stops.
//!
//! At shutdown every session says goodbye first (a close frame, "going
//! away"), so its agent reconnects to another replica at once, and only
//! then are the ends recorded as `NodeDisconnected`, here, a few at a
//! time. Ten thousand sessions each appending its own end at the same
//! moment would queue ten thousand commands behind the pool's connections:
//! each command's queries wait behind all the others', hardly any end is
//! recorded before the process must exit, and the goodbyes waited behind
//! them.
//!
//! The same few recorders serve sessions that end while the ingress
//! serves ([`record_end`]): a thousand agents dropping together (a site's
//! gateway restarting) wait their turn here, where before most timed out
//! on the pool, their nodes left online in the log until liveness noticed.
//!
//! Ends are recorded until [`crate::SHUTDOWN_WAIT`] has passed; a session
//! whose node already connected elsewhere has nothing to record. An end
//! left unrecorded is what a crash of the ingress leaves too: the node
//! stays online in the log until its agent connects again, or until the
//! scheduler finds it silent and marks it offline.

use chrono::Utc;
use domain::node::{Node, NodeCommand};
use domain::Actor;
use futures::StreamExt;
use tokio::time::Instant;
use uuid::Uuid;

use crate::Ingress;

/// Ends recorded at once, at shutdown as while serving: enough to use the
/// pool, few enough that each command's queries do not queue behind the
/// others'.
pub(crate) const RECORDERS: usize = 16;

/// The reason every end recorded at shutdown gives.
pub(crate) const REASON: &str = "the ingress shut down";

/// What [`record_ends`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Recorded {
    /// `NodeDisconnected` appended.
    pub(crate) recorded: usize,
    /// Sessions whose node had connected elsewhere meanwhile.
    pub(crate) moved: usize,
    /// Ends not recorded before `deadline`.
    pub(crate) left: usize,
}

/// Records the end of each of `sessions` (node, session) until `deadline`.
pub(crate) async fn record_ends(
    ingress: &Ingress,
    sessions: Vec<(Uuid, Uuid)>,
    deadline: Instant,
) -> Recorded {
    let total = sessions.len();
    let current = still_current(ingress, sessions).await;
    let mut out = Recorded {
        moved: total - current.len(),
        left: current.len(),
        ..Recorded::default()
    };
    let mut appends = futures::stream::iter(current)
        .map(|(node_id, session)| record(ingress, node_id, session))
        .buffer_unordered(RECORDERS);
    while let Ok(Some(appended)) = tokio::time::timeout_at(deadline, appends.next()).await {
        out.left -= 1;
        if appended {
            out.recorded += 1;
        }
    }
    out
}

/// Of `sessions`, those still named by their node's liveness row: the
/// others' nodes connected again elsewhere, and their end would append
/// nothing. All of them when the database cannot say.
async fn still_current(ingress: &Ingress, sessions: Vec<(Uuid, Uuid)>) -> Vec<(Uuid, Uuid)> {
    if sessions.is_empty() {
        return sessions;
    }
    let (nodes, ids): (Vec<Uuid>, Vec<Uuid>) = sessions.iter().copied().unzip();
    let current: Result<Vec<(Uuid, Uuid)>, sqlx::Error> = sqlx::query_as(
        "SELECT l.node_id, l.session FROM node_liveness l \
         JOIN unnest($1::uuid[], $2::uuid[]) AS c(node_id, session) \
           ON l.node_id = c.node_id AND l.session = c.session",
    )
    .bind(&nodes)
    .bind(&ids)
    .fetch_all(ingress.store().pool())
    .await;
    match current {
        Ok(current) => current,
        Err(e) => {
            tracing::warn!(error = %e, "reading which nodes moved elsewhere failed; recording every end");
            sessions
        }
    }
}

/// Appends `NodeDisconnected` for `session` unless the node moved on;
/// whether it appended.
async fn record(ingress: &Ingress, node_id: Uuid, session: Uuid) -> bool {
    let actor = Actor::Node(node_id.to_string());
    match record_end(ingress, (node_id, session), REASON.into(), &actor).await {
        Ok(appended) => appended,
        Err(e) => {
            tracing::warn!(%node_id, error = %e, "recording the disconnection at shutdown failed");
            false
        }
    }
}

/// Appends `NodeDisconnected` for `session` of `node_id` with `reason`,
/// unless the node has moved on to a newer session (then the aggregate
/// appends nothing); whether it appended. At most [`RECORDERS`] ends are
/// recorded at once in one ingress; the others wait their turn.
pub(crate) async fn record_end(
    ingress: &Ingress,
    (node_id, session): (Uuid, Uuid),
    reason: String,
    actor: &Actor,
) -> Result<bool, store::StoreError<domain::node::NodeError>> {
    // The semaphore is never closed.
    let _turn = ingress.end_recorders.acquire().await.ok();
    let at = Utc::now();
    let command = NodeCommand::Disconnect {
        session,
        reason,
        at,
    };
    let executed = ingress
        .store()
        .execute::<Node>(&node_id.to_string(), command, actor, at)
        .await?;
    Ok(!executed.events.is_empty())
}
