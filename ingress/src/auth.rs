//! Who may open an agent WebSocket: only a node with a valid token.
//!
//! The token (`udn~<node id>~<secret>`) names its node, whose aggregate is
//! loaded from the event log on every upgrade: the log is the source of
//! truth, so a revoked token stops working at the next connection on every
//! replica, with no cache to invalidate. The token is never logged; the
//! node id it names is.

use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use domain::node::{Node, NodeStatus};
use serde::Serialize;
use store::tokens::{self, Presented};
use store::Store;
use uuid::Uuid;

/// Why an upgrade was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// No token, a malformed one, an unknown node, a revoked node or a
    /// wrong secret. The detail is for the agent's operator.
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    /// The log could not be read; the agent should try again later.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

#[derive(Serialize)]
struct Problem {
    detail: String,
}

/// The same envelope as the REST API's errors.
#[derive(Serialize)]
struct ErrorBody {
    errors: Vec<Problem>,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthorized(detail) => (
                StatusCode::UNAUTHORIZED,
                [(WWW_AUTHENTICATE, "Bearer")],
                Json(ErrorBody {
                    errors: vec![Problem {
                        detail: detail.into(),
                    }],
                }),
            )
                .into_response(),
            Refusal::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(ErrorBody {
                    errors: vec![Problem {
                        detail: "the server cannot check the token right now; try again later"
                            .into(),
                    }],
                }),
            )
                .into_response(),
        }
    }
}

/// The node whose valid token is in `headers`.
///
/// # Errors
/// [`Refusal::Unauthorized`] when there is no node token, the node does not
/// exist or was revoked, or the secret does not match;
/// [`Refusal::Unavailable`] when the log cannot be read.
pub(crate) async fn authenticate(store: &Store, headers: &HeaderMap) -> Result<Uuid, Refusal> {
    let value = headers
        .get(AUTHORIZATION)
        .ok_or(Refusal::Unauthorized(
            "send an Authorization: Bearer <node token> header",
        ))?
        .to_str()
        .ok()
        .and_then(tokens::bearer)
        .ok_or(Refusal::Unauthorized(
            "the Authorization header must be Bearer <node token>",
        ))?;
    let invalid = Refusal::Unauthorized("the node token is invalid or was revoked");
    let Some(Presented::Node { node_id, secret }) = tokens::parse(value) else {
        tracing::info!("agent connection refused: not a node token");
        return Err(invalid);
    };
    let node = match store.load::<Node>(&node_id.to_string()).await {
        Ok(Some(loaded)) => loaded.state,
        Ok(None) => {
            tracing::info!(%node_id, "agent connection refused: no such node");
            return Err(invalid);
        }
        Err(e) => {
            tracing::warn!(%node_id, error = %e, "agent connection refused: cannot load the node");
            return Err(Refusal::Unavailable(e.to_string()));
        }
    };
    if node.status == NodeStatus::Revoked {
        tracing::info!(%node_id, "agent connection refused: the node's token was revoked");
        return Err(invalid);
    }
    if !tokens::matches(&secret, &node.token_fingerprint) {
        tracing::warn!(%node_id, "agent connection refused: wrong secret for the node");
        return Err(invalid);
    }
    Ok(node_id)
}
