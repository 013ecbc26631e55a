//! The JSON shapes the API reads and writes, with their OpenAPI schemas.
//!
//! They are separate from the domain's types on purpose: the domain may
//! change its state's layout freely, the API's shapes change only by
//! addition. Each response shape is built from the domain state it shows,
//! and never carries a secret or a token fingerprint.

pub mod event;
pub mod health;
pub mod host_ssh;
pub mod node;
pub mod object;
pub mod project;
pub mod secret;
pub mod task;
pub mod timeline;
pub mod user;

use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};

/// The schema of a label map as [`domain::spec::validate_labels`] checks
/// it: keys of 1-63 letters, digits, '.', '_', '-' or '/' starting with a
/// letter or digit; values of at most 63 letters, digits, '.', '_' or '-';
/// at most [`domain::spec::limits::MAX_LABELS`] labels.
pub fn labels() -> utoipa::openapi::schema::Object {
    labels_of(SchemaType::new(Type::Object))
}

/// [`labels`], or `null`.
pub fn optional_labels() -> utoipa::openapi::schema::Object {
    labels_of(SchemaType::from_iter([Type::Object, Type::Null]))
}

fn labels_of(schema_type: SchemaType) -> utoipa::openapi::schema::Object {
    let text = |pattern: &str| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(pattern))
    };
    ObjectBuilder::new()
        .schema_type(schema_type)
        .property_names(Some(text("^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")))
        .additional_properties(Some(text("^[A-Za-z0-9._-]{0,63}$")))
        .max_properties(Some(domain::spec::limits::MAX_LABELS))
        .build()
}
