//! `POST /api/v1/users`: create a user. The user's name is its aggregate's
//! id, so names are unique by construction.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::Json;
use chrono::Utc;
use domain::spec::validate_name;
use domain::user::{User, UserCommand};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::JsonBody;
use crate::schema::user::{self, CreateUser};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create))
}

/// Creates a user without tokens. Admins only.
#[utoipa::path(
    post,
    path = "/users",
    tag = "users",
    request_body = CreateUser,
    responses(
        (status = 201, description = "Created", body = user::User),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 422, description = "Invalid name", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateUser>,
) -> Result<
    (
        StatusCode,
        [(header::HeaderName, String); 1],
        Json<user::User>,
    ),
    ApiError,
> {
    caller.require_admin("create users")?;
    validate_name(&body.name).map_err(|reason| ApiError::invalid("name", reason))?;
    let now = Utc::now();
    let command = UserCommand::Create {
        name: body.name.clone(),
        admin: body.admin,
        by: caller.actor(),
        at: now,
    };
    let executed = state
        .store()
        .execute::<User>(&body.name, command, &caller.actor(), now)
        .await?;
    let location = format!("{}/users/{}", crate::routes::API_PREFIX, body.name);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(user::User::at(executed.state, now)),
    ))
}
