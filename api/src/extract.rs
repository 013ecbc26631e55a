//! Extractors that turn every kind of bad input into an [`ApiError`] naming
//! the offending field, instead of axum's plain-text rejections.
//!
//! - [`JsonBody`] insists on a JSON content type, enforces the body limit
//!   (413), and deserialises through `serde_path_to_error`, so a type error
//!   deep inside a body names its path (`resources.cpus`).
//! - [`Path`] and [`Query`] wrap axum's extractors and name the parameter.
//! - [`parse_uuid`] and [`parse_limit`] parse query parameters that arrive as
//!   text, so that their errors can name the parameter too.

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::{ApiError, Problem};
use crate::AppState;

/// A JSON request body of type `T`.
///
/// Rejects (with nothing appended to the log): a missing or non-JSON
/// `Content-Type` (415), a body over the limit (413), malformed JSON (400),
/// and JSON of the wrong shape (422 naming the field's path).
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(not_json());
        }
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// An optional body: a request with neither a `Content-Type` nor a body,
/// or with the JSON `null`, gives `None`; anything else must be valid JSON
/// as for [`JsonBody`].
impl<T: DeserializeOwned> OptionalFromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Option<Self>, Self::Rejection> {
        let has_type = req.headers().contains_key(header::CONTENT_TYPE);
        if has_type && !is_json(req.headers()) {
            return Err(not_json());
        }
        let bytes = read_body(req, state).await?;
        if !has_type {
            return if bytes.iter().all(u8::is_ascii_whitespace) {
                Ok(None)
            } else {
                Err(not_json())
            };
        }
        let value = parse_value(&bytes)?;
        if value.is_null() {
            return Ok(None);
        }
        from_value(value).map(|v| Some(JsonBody(v)))
    }
}

fn not_json() -> ApiError {
    ApiError::UnsupportedMediaType(
        "the request body must be JSON, sent with Content-Type: application/json".into(),
    )
}

/// Whether the request says its body is JSON (`application/json` or any
/// `+json` type, parameters such as `charset` allowed).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

async fn read_body(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the request body is larger than the limit of {} bytes",
                state.config().body_limit
            ))
        } else {
            ApiError::bad_request("body", rejection.body_text())
        }
    })
}

/// Deserialises `bytes`, a JSON object, into `T`, naming the field of any
/// error. A whole number written with a fraction of zero (`4.0`, `1e3`) is
/// read as that number wherever a whole number is expected, as JSON
/// Schema's `integer` counts it as one.
///
/// # Errors
/// 400 for malformed JSON, 422 for JSON of the wrong shape.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value = parse_value(bytes)?;
    from_value(value)
}

/// The JSON in `bytes`, with whole numbers written as floats made whole.
fn parse_value(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut value: serde_json::Value =
        serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(|e| {
        ApiError::bad_request("body", format!("malformed JSON: {}", without_position(&e)))
    })?;
    whole_numbers(&mut value);
    Ok(value)
}

/// `value`, a JSON object, as `T`, naming the field of any error.
///
/// # Errors
/// 422 when `value` is not an object or not of `T`'s shape.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    }
    serde_path_to_error::deserialize(&value).map_err(json_error)
}

/// Turns every float with no fractional part that fits an `i64` or `u64`
/// into that integer.
fn whole_numbers(value: &mut serde_json::Value) {
    use serde_json::{Number, Value};
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // The bounds are powers of two, exact as floats.
            let whole = if f.fract() != 0.0 || !f.is_finite() {
                None
            } else if (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&f) {
                Some(Number::from(f as i64))
            } else if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                Some(Number::from(f as u64))
            } else {
                None
            };
            if let Some(whole) = whole {
                *n = whole;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers),
        Value::Object(fields) => fields.values_mut().for_each(whole_numbers),
        _ => {}
    }
}

fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let message = without_position(&inner);
    match inner.classify() {
        serde_json::error::Category::Data => {
            // serde_path_to_error's path already ends at an unknown field,
            // but stops at the parent of a missing one.
            let field = match missing_field(&message) {
                Some(name) => join(&path, name),
                None if path == "." => named_field(&message).unwrap_or("body").to_string(),
                None => path,
            };
            ApiError::Invalid(vec![Problem::field(field, message)])
        }
        serde_json::error::Category::Eof
        | serde_json::error::Category::Syntax
        | serde_json::error::Category::Io => {
            let field = if path == "." {
                "body".to_string()
            } else {
                path
            };
            ApiError::bad_request(field, format!("malformed JSON: {message}"))
        }
    }
}

/// serde_json's message without its " at line L column C" suffix.
fn without_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The field named in serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// The field named in serde's "missing field `x`" and "unknown field `x`"
/// messages.
fn named_field(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("missing field `")
        .or_else(|| message.strip_prefix("unknown field `"))?;
    rest.split('`').next()
}

fn join(path: &str, name: &str) -> String {
    if path == "." || path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// Path parameters of type `T`; a parameter that does not parse gives 400
/// naming it.
#[derive(Debug, Clone, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        use axum::extract::path::ErrorKind;
        if let PathRejection::FailedToDeserializePathParams(e) = &rejection {
            if let ErrorKind::ParseErrorAtKey {
                key,
                value,
                expected_type,
            } = e.kind()
            {
                let expected = if expected_type.ends_with("Uuid") {
                    "a UUID"
                } else {
                    expected_type
                };
                return ApiError::bad_request(key.clone(), format!("{value:?} is not {expected}"));
            }
            if let ErrorKind::DeserializeError {
                key,
                value,
                message,
            } = e.kind()
            {
                return ApiError::bad_request(key.clone(), format!("{value:?}: {message}"));
            }
        }
        ApiError::bad_request("path", rejection.body_text())
    }
}

/// Query parameters of type `T`; an unknown parameter gives 400 naming it.
#[derive(Debug, Clone, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        let text = rejection.body_text();
        let message = text
            .strip_prefix("Failed to deserialize query string: ")
            .unwrap_or(&text)
            .to_string();
        // axum reports the parameter as a `name: ` prefix of the message.
        let (field, message) = match message.split_once(": ") {
            Some((field, rest)) if !field.is_empty() && !field.contains(' ') => {
                (field.to_string(), rest.to_string())
            }
            _ => (
                named_field(&message).unwrap_or("query").to_string(),
                message.clone(),
            ),
        };
        ApiError::bad_request(field, message)
    }
}

/// Parses query parameter `field` as a UUID.
///
/// # Errors
/// 400 naming `field`.
pub fn parse_uuid(field: &str, value: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(value.trim())
        .map_err(|_| ApiError::bad_request(field, format!("{value:?} is not a UUID")))
}

/// Parses a page size: `default` when absent, else 1 to `max`.
///
/// # Errors
/// 400 naming `field`.
pub fn parse_limit(
    field: &str,
    value: Option<&str>,
    default: i64,
    max: i64,
) -> Result<i64, ApiError> {
    let Some(value) = value else {
        return Ok(default);
    };
    match value.trim().parse::<i64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(
            field,
            format!("must be a whole number from 1 to {max}, got {value:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only deserialised")]
    struct Inner {
        cpus: f64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only deserialised")]
    struct Outer {
        name: String,
        inner: Option<Inner>,
    }

    fn field_of(e: ApiError) -> (StatusCode, Option<String>) {
        let status = e.status();
        let field = match e {
            ApiError::BadRequest(p) | ApiError::Invalid(p) => p[0].field.clone(),
            other => panic!("unexpected {other:?}"),
        };
        (status, field)
    }

    #[test]
    fn a_type_error_names_the_nested_field() {
        let e = parse_json::<Outer>(br#"{"name":"a","inner":{"cpus":"many"}}"#)
            .expect_err("must be refused");
        assert_eq!(
            field_of(e),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("inner.cpus".into()))
        );
    }

    #[test]
    fn missing_and_unknown_fields_are_named() {
        let e = parse_json::<Outer>(br#"{"inner":null}"#).expect_err("must be refused");
        assert_eq!(field_of(e).1.as_deref(), Some("name"));
        let e = parse_json::<Outer>(br#"{"name":"a","inner":{}}"#).expect_err("must be refused");
        assert_eq!(field_of(e).1.as_deref(), Some("inner.cpus"));
        let e = parse_json::<Outer>(br#"{"name":"a","colour":1}"#).expect_err("must be refused");
        assert_eq!(field_of(e).1.as_deref(), Some("colour"));
        let e = parse_json::<Outer>(br#"{"name":"a","inner":{"cpus":1,"gpus":2}}"#)
            .expect_err("must be refused");
        assert_eq!(field_of(e).1.as_deref(), Some("inner.gpus"));
    }

    #[test]
    fn malformed_json_is_a_bad_request() {
        for body in [&br#"{"name":"#[..], b"", br#"{"name":"a"} trailing"#] {
            let e = parse_json::<Outer>(body).expect_err("must be refused");
            assert_eq!(field_of(e).0, StatusCode::BAD_REQUEST, "{body:?}");
        }
    }

    #[test]
    fn limits_outside_their_range_name_the_parameter() {
        assert_eq!(parse_limit("limit", None, 50, 500).ok(), Some(50));
        assert_eq!(parse_limit("limit", Some("500"), 50, 500).ok(), Some(500));
        for bad in ["0", "501", "-1", "x"] {
            let e = parse_limit("limit", Some(bad), 50, 500).expect_err("must be refused");
            assert_eq!(field_of(e).1.as_deref(), Some("limit"));
        }
    }
}
