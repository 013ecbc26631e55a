//! The OpenAPI document, generated from the handlers' own annotations.
//!
//! Every route is registered through `utoipa_axum::routes!`, which adds the
//! handler to the router and its operation to the document in one step, so
//! the document cannot forget a route.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The name of the bearer security scheme operations refer to.
pub const BEARER: &str = "bearer";

/// The document's fixed parts: title, tags and the security scheme.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "UniDesk",
        description = "UniDesk's REST API: submit and follow tasks, manage projects, nodes and users, and read the event log."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "tasks", description = "Units of work and their history"),
        (name = "projects", description = "Projects, members and quotas"),
        (name = "nodes", description = "Compute machines and their agents"),
        (name = "users", description = "Users and their API tokens"),
        (name = "events", description = "The event log in its global order"),
        (name = "objects", description = "Large files: uploads and stored outputs, through presigned URLs"),
        (name = "health", description = "Liveness, readiness and this document")
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A user token (`udu~...`) issued by POST /api/v1/users/{name}/tokens. \
                         Node tokens are not accepted.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The full document, as served at `/api/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    crate::routes::all().into_openapi()
}
