//! The one error type of the API and its JSON envelope.
//!
//! Every failure, whether an extractor rejected the input, a rule refused
//! the caller or the domain refused a command, becomes an [`ApiError`] and
//! leaves as `{"errors": [{"detail": "...", "field": "..."}]}` with the
//! matching status. Server errors are logged in full and returned with a
//! generic message, so internal text never reaches a client.

use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use domain::node::NodeError;
use domain::project::ProjectError;
use domain::spec::FieldError;
use domain::task::TaskError;
use domain::user::UserError;
use serde::Serialize;
use store::names::ClaimError;
use store::StoreError;
use utoipa::ToSchema;

/// One problem with a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Problem {
    /// What is wrong, in words a person can act on.
    pub detail: String,
    /// The input it concerns: a body field path (`resources.cpus`), a query
    /// parameter or a path parameter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Problem {
    /// A problem with no particular field.
    pub fn new(detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
            field: None,
        }
    }

    /// A problem with `field`.
    pub fn field(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
            field: Some(field.into()),
        }
    }
}

impl From<FieldError> for Problem {
    fn from(e: FieldError) -> Self {
        Self::field(e.field, e.reason)
    }
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Every problem found; at least one.
    pub errors: Vec<Problem>,
}

/// Why a request failed. Its [`IntoResponse`] is the only place errors
/// become HTTP responses.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: bad JSON, a bad query or path parameter.
    #[error("bad request: {0:?}")]
    BadRequest(Vec<Problem>),
    /// The request is well-formed but its content is not acceptable.
    #[error("invalid input: {0:?}")]
    Invalid(Vec<Problem>),
    /// No valid credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Valid credentials that do not allow this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The thing does not exist, or the caller may not know that it does.
    #[error("not found: {0:?}")]
    NotFound(Problem),
    /// No route or method matches.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request conflicts with the current state.
    #[error("conflict: {0:?}")]
    Conflict(Problem),
    /// The body is larger than the configured limit.
    #[error("payload too large: {0}")]
    PayloadTooLarge(String),
    /// The body is not JSON.
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// A limit on the caller's requests or streams was reached; try again
    /// after `retry_after_s` seconds (sent as `Retry-After`).
    #[error("too many requests: {detail}")]
    TooManyRequests {
        /// Which limit, in words.
        detail: String,
        /// Whole seconds to wait before trying again, at least 1.
        retry_after_s: u64,
    },
    /// A dependency (the database, the object store) is not ready; try
    /// again later (answered with `Retry-After:` [`RETRY_UNAVAILABLE_S`]).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Something the request waits for (a node's answer) did not come in
    /// time.
    #[error("gateway timeout: {0}")]
    GatewayTimeout(String),
    /// A bug or an infrastructure failure. Logged; the client sees a
    /// generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Seconds a client is told to wait (`Retry-After`) after a 503.
pub const RETRY_UNAVAILABLE_S: u64 = 2;

/// What a client is told when the database cannot be reached.
pub const DATABASE_UNAVAILABLE: &str =
    "the database cannot be reached now (the server's log says why); try again after Retry-After";

impl ApiError {
    /// The database cannot be reached: its error can name its address, so
    /// it goes to the server's log and the client gets a 503 saying to try
    /// again.
    pub fn database_unavailable(error: impl std::fmt::Display) -> Self {
        tracing::warn!(%error, "database unreachable");
        Self::Unavailable(DATABASE_UNAVAILABLE.into())
    }

    /// A malformed `field` (query or path parameter, JSON syntax).
    pub fn bad_request(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::BadRequest(vec![Problem::field(field, detail)])
    }

    /// An unacceptable value of `field`.
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Invalid(vec![Problem::field(field, detail)])
    }

    /// Something that does not exist (or is hidden from the caller).
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::NotFound(Problem::new(detail))
    }

    /// Something named by `field` that does not exist (or is hidden).
    pub fn not_found_field(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::NotFound(Problem::field(field, detail))
    }

    /// A request that conflicts with the current state.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::Conflict(Problem::new(detail))
    }

    /// A server-side failure; `context` is logged, never returned.
    pub fn internal(context: impl std::fmt::Display) -> Self {
        Self::Internal(context.to_string())
    }

    /// The object store failed: its own error can name its internal
    /// address, so it goes to the server's log and the client gets a 503
    /// that says only which service to wait for.
    pub fn object_store(error: impl std::fmt::Display) -> Self {
        tracing::warn!(%error, "object store request failed");
        Self::Unavailable(
            "the object store cannot be reached now (the server's log says why); try again".into(),
        )
    }

    /// The error in words, for a command line: each problem as
    /// `field: detail`.
    pub fn detail(&self) -> String {
        let join = |ps: &[Problem]| {
            ps.iter()
                .map(|p| match &p.field {
                    Some(f) => format!("{f}: {}", p.detail),
                    None => p.detail.clone(),
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        match self {
            Self::BadRequest(ps) | Self::Invalid(ps) => join(ps),
            Self::NotFound(p) | Self::Conflict(p) => join(std::slice::from_ref(p)),
            other => other.to_string(),
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn into_problems(self) -> Vec<Problem> {
        match self {
            Self::BadRequest(p) | Self::Invalid(p) => p,
            Self::NotFound(p) | Self::Conflict(p) => vec![p],
            Self::Unauthorized(d)
            | Self::Forbidden(d)
            | Self::PayloadTooLarge(d)
            | Self::UnsupportedMediaType(d)
            | Self::Unavailable(d)
            | Self::GatewayTimeout(d) => vec![Problem::new(d)],
            Self::TooManyRequests { detail, .. } => vec![Problem::new(detail)],
            Self::MethodNotAllowed => vec![Problem::new("this method is not allowed here")],
            Self::Internal(_) => vec![Problem::new(
                "internal server error; the details were logged on the server",
            )],
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Internal(context) => tracing::error!(error = %context, "request failed"),
            Self::Unavailable(context) => tracing::warn!(error = %context, "not ready"),
            _ => tracing::debug!(error = %self, "request refused"),
        }
        let unauthorized = matches!(self, Self::Unauthorized(_));
        let retry_after = match &self {
            Self::TooManyRequests { retry_after_s, .. } => Some((*retry_after_s).max(1)),
            Self::Unavailable(_) => Some(RETRY_UNAVAILABLE_S),
            _ => None,
        };
        let body = Json(ErrorBody {
            errors: self.into_problems(),
        });
        if unauthorized {
            (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
        } else if let Some(seconds) = retry_after {
            (status, [(header::RETRY_AFTER, seconds.to_string())], body).into_response()
        } else {
            (status, body).into_response()
        }
    }
}

/// Answers requests for paths no route serves.
pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

/// Answers requests whose path exists but not with this method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if store::is_unavailable(&e) {
            return Self::database_unavailable(e);
        }
        Self::internal(format!("database: {e}"))
    }
}

impl From<projections::read::ReadError> for ApiError {
    fn from(e: projections::read::ReadError) -> Self {
        match e {
            projections::read::ReadError::Database(e) => e.into(),
            undecodable => Self::internal(undecodable.to_string()),
        }
    }
}

impl From<ClaimError> for ApiError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::Taken(name) => Self::Conflict(Problem::field(
                "name",
                format!("the name {name:?} is already taken"),
            )),
            ClaimError::Database(e) => e.into(),
        }
    }
}

/// Maps the store's errors; `rejected` maps the aggregate's own refusal.
fn from_store<E: std::error::Error>(
    e: StoreError<E>,
    rejected: impl FnOnce(E) -> ApiError,
) -> ApiError {
    match e {
        StoreError::Rejected(e) => rejected(e),
        StoreError::Conflict => ApiError::conflict(
            "the resource was changed by others at the same moment too often; try again",
        ),
        StoreError::Corrupt(m) => ApiError::internal(format!("corrupt stored data: {m}")),
        e @ StoreError::Unstorable { .. } => ApiError::internal(e.to_string()),
        StoreError::Unavailable(m) => ApiError::database_unavailable(m),
        StoreError::Database(m) => ApiError::internal(format!("database: {m}")),
    }
}

impl From<StoreError<TaskError>> for ApiError {
    fn from(e: StoreError<TaskError>) -> Self {
        from_store(e, |e| match e {
            TaskError::NotFound => ApiError::not_found("task not found"),
            other => ApiError::conflict(other.to_string()),
        })
    }
}

impl From<StoreError<ProjectError>> for ApiError {
    fn from(e: StoreError<ProjectError>) -> Self {
        from_store(e, |e| match e {
            ProjectError::NotFound => ApiError::not_found("project not found"),
            ProjectError::NotAMember(user) => {
                ApiError::not_found_field("user", format!("{user} is not a member of the project"))
            }
            e @ ProjectError::InvalidName(_) => ApiError::invalid("name", e.to_string()),
            other => ApiError::conflict(other.to_string()),
        })
    }
}

impl From<StoreError<NodeError>> for ApiError {
    fn from(e: StoreError<NodeError>) -> Self {
        from_store(e, |e| match e {
            NodeError::NotFound => ApiError::not_found("node not found"),
            NodeError::Invalid(e) => ApiError::Invalid(vec![e.into()]),
            NodeError::NotDeclared(e) => ApiError::Conflict(e.into()),
            other => ApiError::conflict(other.to_string()),
        })
    }
}

impl From<StoreError<UserError>> for ApiError {
    fn from(e: StoreError<UserError>) -> Self {
        from_store(e, |e| match e {
            UserError::NotFound => ApiError::not_found("user not found"),
            UserError::TokenNotFound => ApiError::not_found_field("token_id", "token not found"),
            UserError::AlreadyExists => ApiError::Conflict(Problem::field(
                "name",
                "a user with this name already exists",
            )),
            e @ UserError::TooManyTokens(_) => ApiError::conflict(format!(
                "{e} (DELETE /api/v1/users/{{name}}/tokens/{{token_id}})"
            )),
            e @ UserError::ExpiresBeforeIssue => ApiError::invalid("expires_at", e.to_string()),
            e @ UserError::InvalidName(_) => ApiError::invalid("name", e.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_never_show_their_cause_to_the_client() {
        let problems = ApiError::internal("password=hunter2 at db:5432").into_problems();
        assert_eq!(problems.len(), 1);
        assert!(!problems[0].detail.contains("hunter2"));
    }

    #[test]
    fn object_store_errors_never_show_their_cause_to_the_client() {
        let e =
            ApiError::object_store("object store: error sending request to http://10.0.3.7:9000/");
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let problems = e.into_problems();
        assert!(
            !problems[0].detail.contains("10.0.3.7"),
            "{:?}",
            problems[0].detail
        );
        assert!(problems[0].detail.contains("object store"));
    }

    #[test]
    fn an_unreachable_database_is_a_503_that_names_no_address() {
        for e in [
            ApiError::from(sqlx::Error::PoolTimedOut),
            ApiError::from(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "connect to 10.0.3.7:5432 refused",
            ))),
            ApiError::from(StoreError::<TaskError>::Unavailable(
                "pool timed out at 10.0.3.7".into(),
            )),
        ] {
            assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
            let response = e.into_response();
            assert_eq!(
                response.headers()[header::RETRY_AFTER],
                RETRY_UNAVAILABLE_S.to_string()
            );
        }
        let problems = ApiError::from(sqlx::Error::PoolTimedOut).into_problems();
        assert_eq!(problems[0].detail, DATABASE_UNAVAILABLE);
        assert_eq!(
            ApiError::from(sqlx::Error::RowNotFound).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn a_store_conflict_is_a_409_that_says_try_again() {
        let e = ApiError::from(StoreError::<TaskError>::Conflict);
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert!(e.to_string().contains("try again"));
    }
}
