//! UniDesk's large-file store.
//!
//! Files never travel through the WebSocket or the database: they move
//! between nodes (or users) and an S3-compatible object store. Nobody but
//! the server holds the store's credentials. For each transfer it signs a
//! short-lived URL for exactly one object and one method (SigV4 query
//! authentication, [`ObjectStore::presign_get`] and friends), and the client
//! streams straight to or from the store. A signature covers the method, the
//! object's key, the expiry and the headers named in the URL, so an expired
//! or altered URL is refused by the store itself, and a URL for one object
//! can neither read nor write another.
//!
//! - [`keys`] fixes where objects live in the bucket: one namespace per
//!   project, outputs under their task and attempt.
//! - [`ObjectStore`] signs URLs and makes the few calls the server itself
//!   needs (look at an object, start and complete a multipart upload), through
//!   rust-s3, against any S3 service (MinIO, Garage, AWS).
//! - [`uploads`] keeps the record of uploads through the API: each one is
//!   completed by reading the stored object back and comparing it with the
//!   declared size and SHA-256, only verified objects reach tasks, and the
//!   [`uploads::Sweeper`] aborts uploads nobody completed.
//! - [`embedded`] serves an S3-compatible store from a local directory (s3s
//!   with s3s-fs) inside the server process, for `unidesk dev`.
//!
//! Content is checked at the far end: every upload names the SHA-256 of its
//! body in a signed `x-amz-content-sha256` header, which the store verifies
//! while it reads the body, and an object's SHA-256 travels with it as the
//! user metadata `x-amz-meta-sha256`, checked by whoever downloads it. A
//! multipart upload's parts carry no declared hash, so the server checks
//! the assembled object itself before anything may use it ([`uploads`]).

pub mod embedded;
pub mod keys;
mod served;
mod store;
pub mod uploads;

pub use store::{
    Config, ObjectError, ObjectInfo, ObjectStore, Presigned, ReadBack, Secret, MAX_OBJECT_BYTES,
    MAX_PARTS, MIN_PART_BYTES,
};
