//! The OpenAPI document, generated from the handlers' own annotations.
//!
//! Every route is registered through `utoipa_axum::routes!`, which adds the
//! handler to the router and its operation to the document in one step, so
//! the document cannot forget a route.

use serde_json::{json, Value};
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::SchemaType;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, Object, ObjectBuilder, Ref, RefOr, Response, ResponseBuilder, Schema, Type,
};
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

/// The full document as utoipa builds it; [`document`] is what is served.
pub fn openapi() -> utoipa::openapi::OpenApi {
    crate::routes::all().into_openapi()
}

/// The document as served at `/api/v1/openapi.json`: [`openapi()`] with
/// what utoipa's types cannot say ([`describe_streams`]).
pub fn document() -> Value {
    finish(openapi())
}

/// `doc` as JSON, with the events of the live streams described.
pub fn finish(doc: utoipa::openapi::OpenApi) -> Value {
    let mut doc = serde_json::to_value(doc).unwrap_or_else(|_| json!({}));
    describe_streams(&mut doc);
    doc
}

/// The statuses every operation of a kind may answer, added to each when
/// the document is built so that no annotation can forget one: a route's
/// own description of a status is kept.
///
/// - with the bearer scheme: 401 (no valid token);
/// - with parameters: 400 (a malformed one, named);
/// - with a JSON body: 400 (malformed JSON), 413 (too large), 415 (not
///   JSON) and 422 (the wrong shape or an invalid value, named);
/// - changing state (POST, PUT, DELETE) under `/api/v1`: 409 (the state
///   does not allow it, or others changed it at the same moment);
/// - with the bearer scheme (every such request reads the database): 503
///   (the database cannot be reached now). Every 503, these and the
///   routes' own, names its `Retry-After` header.
///
/// The `cursor` parameter of every list gets the pattern of its cursors
/// ([`crate::page::cursor_pattern`]).
///
/// Also gives every operation a unique `operationId`: its handler's name
/// prefixed with its resource (`tasks_list`, `users_get`), so that links
/// and generated clients can name it.
pub fn complete(doc: &mut utoipa::openapi::OpenApi) {
    for (path, item) in doc.paths.paths.iter_mut() {
        let resource = path
            .strip_prefix(crate::routes::API_PREFIX)
            .and_then(|rest| rest.trim_start_matches('/').split('/').next())
            .map(|r| r.trim_end_matches(".json").to_string());
        for (method, operation) in operations_mut(item) {
            if let (Some(resource), Some(id)) = (&resource, &operation.operation_id) {
                if !id.starts_with(resource.as_str()) {
                    operation.operation_id = Some(format!("{resource}_{id}"));
                }
            }
            if let Some(pattern) = path
                .strip_prefix(crate::routes::API_PREFIX)
                .and_then(crate::page::cursor_pattern)
            {
                for parameter in operation.parameters.iter_mut().flatten() {
                    if parameter.name == "cursor" {
                        parameter.schema = Some(
                            ObjectBuilder::new()
                                .schema_type(Type::String)
                                .pattern(Some(pattern.clone()))
                                .into(),
                        );
                    }
                }
            }
            // A parameter is text on the wire: it is absent, never null.
            for parameter in operation.parameters.iter_mut().flatten() {
                if let Some(RefOr::T(Schema::Object(object))) = parameter.schema.as_mut() {
                    if let SchemaType::Array(types) = &object.schema_type {
                        let types: Vec<Type> = types
                            .iter()
                            .filter(|t| **t != Type::Null)
                            .cloned()
                            .collect();
                        object.schema_type = SchemaType::from_iter(types);
                    }
                }
            }
            let responses = &mut operation.responses.responses;
            let mut add = |status: &str, description: &str| {
                responses
                    .entry(status.to_string())
                    .or_insert_with(|| error_response(description));
            };
            if operation.security.is_some() {
                add("401", "No valid token");
            }
            if operation.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
                add("400", "A malformed parameter, named");
            }
            if operation.request_body.is_some() {
                add("400", "Malformed JSON");
                add("413", "The body is larger than the server's limit");
                add(
                    "415",
                    "The body is not sent as JSON (Content-Type: application/json)",
                );
                add(
                    "422",
                    "A body of the wrong shape or an invalid value, the field named",
                );
            }
            if resource.is_some() && method != "get" {
                add(
                    "409",
                    "The current state does not allow this, or others changed it at the same moment; try again",
                );
            }
            if operation.security.is_some() {
                add(
                    "503",
                    "The database cannot be reached now; try again after Retry-After",
                );
            }
            if let Some(RefOr::T(unavailable)) = responses.get_mut("503") {
                unavailable
                    .headers
                    .entry("Retry-After".into())
                    .or_insert_with(|| {
                        HeaderBuilder::new()
                            .schema(Object::with_type(Type::Integer))
                            .description(Some("Whole seconds to wait before trying again"))
                            .build()
                    });
            }
        }
    }
}

fn error_response(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = (&'static str, &mut Operation)> {
    [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("patch", &mut item.patch),
    ]
    .into_iter()
    .filter_map(|(m, o)| o.as_mut().map(|o| (m, o)))
}

/// The pattern of a path in a task's workspace.
const WORKSPACE_PATH: &str = r"^(?:\.(?:/\.?)*/(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\.(?:[A-Za-fh-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|g(?:[A-Za-hj-z0-9._+=@,-][A-Za-z0-9._+=@,-]*|i(?:[A-Za-su-z0-9._+=@,-][A-Za-z0-9._+=@,-]*|t[A-Za-z0-9._+=@,-]+)?)?)|\.\.[A-Za-z0-9._+=@,-]+)(?:/(?:\.|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\.\.[A-Za-z0-9._+=@,-]+))?)*|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\.(?:[A-Za-fh-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|g(?:[A-Za-hj-z0-9._+=@,-][A-Za-z0-9._+=@,-]*|i(?:[A-Za-su-z0-9._+=@,-][A-Za-z0-9._+=@,-]*|t[A-Za-z0-9._+=@,-]+)?)?)|\.\.[A-Za-z0-9._+=@,-]+)(?:/(?:\.|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\.\.[A-Za-z0-9._+=@,-]+))?)*)$";

/// The pattern of a Dockerfile's path in its repository: segments of any
/// characters but control ones, `/` and `\`, none of them `..`, at least
/// one neither empty nor `.`, the first such not `.git`.
const DOCKERFILE_PATH: &str = r"^(?:\./(?:\.?/)*)?(?:[^\x00-\x1F\x7F-\x9F\\/.][^\x00-\x1F\x7F-\x9F\\/]*|\.(?:[^\x00-\x1F\x7F-\x9F\\/.g][^\x00-\x1F\x7F-\x9F\\/]*|g(?:[^\x00-\x1F\x7F-\x9F\\/i][^\x00-\x1F\x7F-\x9F\\/]*|i(?:[^\x00-\x1F\x7F-\x9F\\/t][^\x00-\x1F\x7F-\x9F\\/]*|t[^\x00-\x1F\x7F-\x9F\\/]+)?)?)|\.\.[^\x00-\x1F\x7F-\x9F\\/]+)(?:/(?:\.|[^\x00-\x1F\x7F-\x9F\\/.][^\x00-\x1F\x7F-\x9F\\/]*|\.[^\x00-\x1F\x7F-\x9F\\/.][^\x00-\x1F\x7F-\x9F\\/]*|\.\.[^\x00-\x1F\x7F-\x9F\\/]+)?)*$";

/// A secret's name, as [`domain::Name`] checks it.
pub const SECRET_NAME: &str = "^[a-z0-9][a-z0-9._-]{0,62}$";

/// Adds what utoipa's types cannot carry: that a token takes one expiry
/// at most, and the events of the live streams.
///
/// Replaces the `text/event-stream` schemas of the live streams by the
/// schema of one event, as OpenAPI 3.1 reads a sequential media type's
/// schema: the event's name, its id and its `data`, which is JSON of the
/// schema given by `contentSchema` (keywords utoipa's types do not carry,
/// hence this step on the JSON).
fn describe_streams(doc: &mut Value) {
    // Paths in a task's workspace ([`domain::spec::WorkspacePath`]): an
    // object name's rules, and not into `.git`, which a regular
    // expression without lookahead says segment by segment.
    let workspace = json!({"type": "string", "maxLength": 512, "pattern": WORKSPACE_PATH});
    // [`domain::spec::DockerfilePath`]: no control characters or `\`, no
    // `..` segment, a file, not in `.git`, and no drive letter.
    let dockerfile = json!({
        "type": "string",
        "minLength": 1,
        "maxLength": 1024,
        "pattern": DOCKERFILE_PATH,
        "not": {"pattern": "^[\\x00-\\x7F]:"}
    });
    // [`domain::spec::TaskSpecDraft::validate`]: variable names, not the
    // GPU visibility ones the node sets; values and arguments without NUL.
    let no_nul = "^[^\\u0000]*$";
    let env = json!({
        "type": ["object", "null"],
        "maxProperties": domain::spec::limits::MAX_ENV,
        "propertyNames": {
            "type": "string",
            "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,255}$",
            "not": {"anyOf": [
                {"pattern": "^[Nn][Vv][Ii][Dd][Ii][Aa]_"},
                {"pattern": "^[Cc][Uu][Dd][Aa]_[Vv][Ii][Ss][Ii][Bb][Ll][Ee]_[Dd][Ee][Vv][Ii][Cc][Ee][Ss]$"}
            ]}
        },
        "additionalProperties": {"type": "string", "pattern": no_nul}
    });
    // [`domain::spec::TaskSpec::env_secrets`]: variables as in `env`, each
    // naming a secret by its name.
    let mut env_secrets = env.clone();
    env_secrets["additionalProperties"] = json!({"type": "string", "pattern": SECRET_NAME});
    let command = json!({
        "type": ["array", "null"],
        "maxItems": domain::spec::limits::MAX_ARGS,
        "items": {"type": "string", "pattern": no_nul}
    });
    for (pointer, schema) in [
        ("/components/schemas/SubmitTask/properties/env", env),
        ("/components/schemas/SubmitTask/properties/command", command),
        (
            "/components/schemas/SubmitTask/properties/env_secrets",
            env_secrets,
        ),
        (
            "/components/schemas/SubmitInput/properties/name",
            workspace.clone(),
        ),
        (
            "/components/schemas/SubmitOutput/properties/path",
            workspace,
        ),
        (
            "/components/schemas/SubmitTask/properties/dockerfile_path",
            dockerfile,
        ),
    ] {
        if let Some(property) = doc.pointer_mut(pointer) {
            let mut schema = schema;
            for key in ["description", "example"] {
                if let Some(v) = property.get(key) {
                    schema[key] = v.clone();
                }
            }
            *property = schema;
        }
    }
    // Not both expiries (a `null` one counts as absent).
    if let Some(issue) = doc.pointer_mut("/components/schemas/IssueToken") {
        issue["not"] = json!({
            "required": ["expires_in_s", "expires_at"],
            "properties": {
                "expires_in_s": {"type": "integer"},
                "expires_at": {"type": "string"}
            }
        });
    }
    let timeline = json!({
        "oneOf": [
            sse_event(
                "timeline",
                json!({"type": "string", "pattern": "^[0-9]+$"}),
                json!({"$ref": "#/components/schemas/TimelineEntry"}),
            ),
            sse_event(
                "ready",
                json!({"type": "string", "pattern": "^[0-9]+$"}),
                json!({
                    "type": "object",
                    "description": "Everything up to now was sent; `after` is the position of the last event delivered or passed over.",
                    "required": ["after"],
                    "properties": {"after": {"type": "integer", "minimum": 0}},
                    "additionalProperties": false
                }),
            ),
        ]
    });
    let position = json!({"type": "integer", "minimum": 0});
    let logs = json!({
        "oneOf": [
            sse_event(
                "log",
                json!({"type": "string", "pattern": "^[1-9][0-9]*:[0-9]+$"}),
                json!({
                    "type": "object",
                    "description": "The next piece of output, with no gap and no byte twice.",
                    "required": ["attempt", "offset", "next_offset", "data"],
                    "properties": {
                        "attempt": {"type": "integer", "minimum": 1},
                        "offset": position,
                        "next_offset": position,
                        "data": {"type": "string"}
                    },
                    "additionalProperties": false
                }),
            ),
            sse_event(
                "end",
                json!({"type": "string", "pattern": "^[0-9]+:[0-9]+$"}),
                json!({
                    "type": "object",
                    "description": "The attempt ended and all its output was sent; the stream closes.",
                    "required": ["attempt", "state", "next_offset"],
                    "properties": {
                        "attempt": {"type": "integer", "minimum": 0},
                        "state": {"type": "string", "enum": ["succeeded", "failed", "timed_out", "cancelled", "lost"]},
                        "next_offset": position,
                        "removed": {"$ref": "#/components/schemas/OutputRemoved"}
                    },
                    "additionalProperties": false
                }),
            ),
        ]
    });
    let prefix = crate::routes::API_PREFIX;
    for (path, schema) in [
        (format!("{prefix}/timeline/stream"), timeline),
        (format!("{prefix}/tasks/{{id}}/logs"), logs),
    ] {
        let pointer = format!(
            "/paths/{}/get/responses/200/content/text~1event-stream",
            path.replace('~', "~0").replace('/', "~1")
        );
        if let Some(content) = doc.pointer_mut(&pointer) {
            content["schema"] = schema;
        }
    }
}

/// The schema of one Server-Sent Event named `name`, whose `data` is JSON
/// of schema `data`.
fn sse_event(name: &str, id: Value, data: Value) -> Value {
    json!({
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "id": id,
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": data
            },
            "retry": {"type": "integer"}
        },
        "additionalProperties": false
    })
}
