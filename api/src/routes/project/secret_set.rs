//! `PUT /api/v1/projects/{id}/secrets/{name}`: set a project secret, or
//! give it a new value. Maintainers only; the value is sealed with the
//! server's secrets key and kept outside the event log, which records only
//! that the secret was set, by whom, and its version.

use axum::extract::State;
use axum::Json;
use domain::project::{ProjectCommand, Role};
use domain::Name;
use store::secrets::{self, MAX_VALUE_BYTES};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::access;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, Path};
use crate::schema::secret::{Secret, SetSecret};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(set_secret))
}

/// The shortest value, in characters: shorter ones would mask ordinary
/// words in output.
pub const MIN_VALUE_CHARS: usize = 4;
/// The longest value, in characters (and so at most 64 KiB).
pub const MAX_VALUE_CHARS: usize = 16 * 1024;

/// Sets the secret `name` of the project to a new value (a new version).
/// Maintainers only. The value is never shown again.
#[utoipa::path(
    put,
    path = "/projects/{id}/secrets/{name}",
    tag = "projects",
    params(
        ("id" = Uuid, Path, description = "The project's id"),
        ("name" = String, Path, description = "The secret's name: 1-63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit", pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")
    ),
    request_body = SetSecret,
    responses(
        (status = 200, description = "The secret, without its value", body = Secret),
        (status = 400, description = "Malformed id or JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not a maintainer of the project", body = ErrorBody),
        (status = 404, description = "No such project", body = ErrorBody),
        (status = 409, description = "The project is archived, the server has no secrets key, it holds as many secrets as it may, or the secret changed meanwhile", body = ErrorBody),
        (status = 422, description = "A bad name or value, named", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn set_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, name)): Path<(Uuid, String)>,
    JsonBody(body): JsonBody<SetSecret>,
) -> Result<Json<Secret>, ApiError> {
    let value = zeroize::Zeroizing::new(body.value);
    let access = access::project(&state, &caller, id, None).await?;
    access.require(Role::Maintainer, "set secrets")?;
    let name = Name::parse(&name).map_err(|e| ApiError::invalid("name", e.to_string()))?;
    check_value(&value)?;
    let key = state.secrets_key()?;
    let replaced = access.project.secret(&name).and_then(|s| s.value_id);
    let version = access
        .project
        .secrets
        .get(&name)
        .map_or(1, |s| s.version + 1);
    let value_id = Uuid::now_v7();
    secrets::store_value(
        state.pool(),
        key,
        id,
        name.as_str(),
        value_id,
        value.as_bytes(),
    )
    .await
    .map_err(|e| ApiError::internal(format!("storing the secret: {e}")))?;
    let executed = super::execute(&state, &caller, id, |at| ProjectCommand::SetSecret {
        name: name.to_string(),
        version,
        value_id,
        by: caller.actor(),
        at,
    })
    .await;
    // Whatever happened, values no event names go: this one when the set
    // was refused, the one it replaced when it was not.
    let current = match &executed {
        Ok(_) => Some(value_id),
        Err(_) => replaced,
    };
    let stale = if executed.is_ok() {
        replaced
    } else {
        Some(value_id)
    };
    if let Err(e) =
        secrets::remove_old_values(state.pool(), id, name.as_str(), stale, current).await
    {
        tracing::warn!(project = %id, secret = %name, error = %e, "could not remove old secret values; the next set or delete retries");
    }
    executed?;
    let project = state
        .store()
        .load::<domain::project::Project>(&id.to_string())
        .await?
        .ok_or_else(|| ApiError::not_found("project not found"))?
        .state;
    let secret = project
        .secret(&name)
        .map(|s| Secret::of(&name, s))
        .ok_or_else(|| ApiError::conflict("the secret was deleted meanwhile"))?;
    Ok(Json(secret))
}

/// Refuses values that cannot be kept or used: too short to mask, too
/// long, or holding NUL (no environment variable or file can carry it).
fn check_value(value: &str) -> Result<(), ApiError> {
    let chars = value.chars().count();
    if chars < MIN_VALUE_CHARS {
        return Err(ApiError::invalid(
            "value",
            format!("must be at least {MIN_VALUE_CHARS} characters (shorter values would be masked wherever they appear in output); got {chars}"),
        ));
    }
    if chars > MAX_VALUE_CHARS || value.len() > MAX_VALUE_BYTES {
        return Err(ApiError::invalid(
            "value",
            format!("must be at most {MAX_VALUE_CHARS} characters; got {chars}"),
        ));
    }
    if value.contains('\0') {
        return Err(ApiError::invalid("value", "must not contain NUL"));
    }
    Ok(())
}
