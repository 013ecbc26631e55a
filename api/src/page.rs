//! Pagination, the same on every list route: `limit` (1 to [`MAX_LIMIT`],
//! [`DEFAULT_LIMIT`] when absent) and `cursor` in, `items` and
//! `next_cursor` out, `next_cursor` absent on the last page.
//!
//! Pages are keyset pages: a cursor holds the sort key of the last item
//! shown, and the next page starts strictly after it. Items that existed
//! when a client started paging are each seen exactly once however many
//! are added meanwhile (new ones appear or not, depending on where they
//! sort). A cursor is opaque text naming the list it belongs to, so a
//! cursor of one list is refused by another with a 400.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;
use crate::extract::parse_limit;

/// Items per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 50;
/// The most items per page.
pub const MAX_LIMIT: i64 = 500;

/// Parses the `limit` parameter.
///
/// # Errors
/// 400 naming `limit` when it is not a whole number from 1 to
/// [`MAX_LIMIT`].
pub fn limit(value: Option<&str>) -> Result<i64, ApiError> {
    parse_limit("limit", value, DEFAULT_LIMIT, MAX_LIMIT)
}

/// The cursor of list `list` that continues after `key`.
pub fn encode<K: Serialize>(list: &str, key: &K) -> String {
    let key = serde_json::to_string(key).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(format!("{list}:{key}"))
}

/// The key in a cursor of list `list`.
///
/// # Errors
/// 400 naming `cursor` when it is not a cursor of this list.
pub fn decode<K: DeserializeOwned>(list: &str, cursor: &str) -> Result<K, ApiError> {
    URL_SAFE_NO_PAD
        .decode(cursor.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            let key = s.strip_prefix(list)?.strip_prefix(':')?;
            serde_json::from_str(key).ok()
        })
        .ok_or_else(|| {
            ApiError::bad_request(
                "cursor",
                "not a cursor of this list: pass the next_cursor of its previous page",
            )
        })
}

/// Cuts `rows` (read with `limit + 1`) to one page and gives the cursor
/// after its last item, when more follow.
pub fn split<T, K: Serialize>(
    list: &str,
    mut rows: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> K,
) -> (Vec<T>, Option<String>) {
    let limit = usize::try_from(limit).unwrap_or(0);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = rows
        .last()
        .filter(|_| more)
        .map(|last| encode(list, &key(last)));
    (rows, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_only_within_their_list() {
        let c = encode("users", &"alice");
        assert_eq!(decode::<String>("users", &c).ok().as_deref(), Some("alice"));
        assert!(decode::<String>("nodes", &c).is_err());
        assert!(decode::<String>("user", &c).is_err());
        for bad in ["", "!!", "dXNlcnM", &URL_SAFE_NO_PAD.encode("users:{")] {
            assert!(decode::<String>("users", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_page_has_a_next_cursor_only_when_more_follow() {
        let (items, next) = split("n", vec![1, 2, 3], 2, |i| *i);
        assert_eq!(items, [1, 2]);
        assert_eq!(decode::<i32>("n", &next.unwrap_or_default()).ok(), Some(2));
        let (items, next) = split("n", vec![1, 2], 2, |i| *i);
        assert_eq!((items.len(), next), (2, None));
    }
}
