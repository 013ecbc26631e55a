//! The web view: a dashboard of nodes and tasks, the live audit timeline
//! and a page per task, node and project, served at `/` by the API itself.
//!
//! Plain HTML, CSS and JavaScript modules, shipped inside the binary (no
//! build step, nothing fetched from elsewhere): `main.js` routes between
//! pages and imports the others, which the browser loads from `/js/`. The page is a client of the REST
//! API like any other: it signs in with a user token, keeps it in the
//! browser's session (or local) storage and sends it as a bearer header,
//! reading Server-Sent Events through `fetch` so that the token never
//! appears in a URL or a server log. What it shows is therefore exactly what
//! the API shows that user.
//!
//! Every file is sent with a content security policy that allows scripts,
//! styles and connections to this origin only, and with an `ETag` so that a
//! browser revalidates instead of downloading it again.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use crate::AppState;

/// What the page may load and where it may connect: this origin only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
    manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One file of the web view.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: HeaderValue,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str) -> Self {
        let digest = hex::encode(&Sha256::digest(body.as_bytes())[..12]);
        Self {
            body,
            content_type,
            etag: HeaderValue::from_str(&format!("\"{digest}\""))
                .unwrap_or(HeaderValue::from_static("\"0\"")),
        }
    }

    fn respond(&self, request: &HeaderMap) -> Response {
        let fresh = request
            .get(header::IF_NONE_MATCH)
            .is_some_and(|tag| tag == self.etag);
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            self.body.into_response()
        };
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        headers.insert(header::ETAG, self.etag.clone());
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        response
    }
}

static INDEX: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("index.html"), "text/html; charset=utf-8"));
/// The JavaScript modules, by the name they are served under in `/js/`.
static SCRIPTS: LazyLock<[(&str, Asset); 6]> = LazyLock::new(|| {
    let script = |body| Asset::new(body, "text/javascript; charset=utf-8");
    [
        ("main.js", script(include_str!("main.js"))),
        ("api.js", script(include_str!("api.js"))),
        ("dom.js", script(include_str!("dom.js"))),
        ("dashboard.js", script(include_str!("dashboard.js"))),
        ("timeline.js", script(include_str!("timeline.js"))),
        ("pages.js", script(include_str!("pages.js"))),
    ]
});
static STYLE: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("app.css"), "text/css; charset=utf-8"));
static ICON: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("favicon.svg"), "image/svg+xml"));

/// The web view's routes: `/`, `/js/{file}` for its modules, `/app.css` and
/// `/favicon.svg`.
/// Its pages are addressed by the URL's fragment (`/#/tasks/<id>`), so
/// these are all the server serves.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { INDEX.respond(&h) }))
        .route("/js/{file}", get(script))
        .route(
            "/app.css",
            get(|h: HeaderMap| async move { STYLE.respond(&h) }),
        )
        .route(
            "/favicon.svg",
            get(|h: HeaderMap| async move { ICON.respond(&h) }),
        )
}

/// One of the modules, or the API's 404 for a name that is not one.
async fn script(Path(file): Path<String>, request: HeaderMap) -> Response {
    match SCRIPTS.iter().find(|(name, _)| *name == file) {
        Some((_, asset)) => asset.respond(&request),
        None => crate::error::ApiError::not_found(format!("there is no script named {file:?}"))
            .into_response(),
    }
}
