//! `GET /api/v1/version`: which server build answers and which agent
//! protocol versions it accepts, so an operator upgrading agents one by one
//! (and the web view) can tell what runs where.

use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::ErrorBody;
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(version))
}

/// The server's build and the agents it accepts.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Version {
    /// The server's version (the `unidesk` release).
    #[schema(example = "0.1.0")]
    pub server: String,
    /// The agent protocol versions this server accepts: an agent speaking
    /// one of them connects; others are refused with `protocol_version`.
    pub agent_protocol: ProtocolRange,
}

/// A range of agent protocol versions, both ends included.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProtocolRange {
    /// The oldest accepted.
    pub oldest: u32,
    /// The newest accepted, the one this server writes.
    pub newest: u32,
}

/// The server's version and the agent protocol versions it accepts. Any
/// user may ask.
#[utoipa::path(
    get,
    path = "/version",
    tag = "health",
    responses(
        (status = 200, description = "The server's version", body = Version),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn version(_caller: Caller) -> Json<Version> {
    Json(Version {
        server: env!("CARGO_PKG_VERSION").to_owned(),
        agent_protocol: ProtocolRange {
            oldest: protocol::OLDEST_VERSION,
            newest: protocol::VERSION,
        },
    })
}
