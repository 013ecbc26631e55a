//! Pagination, the same on every list route: `limit` (1 to [`MAX_LIMIT`],
//! [`DEFAULT_LIMIT`] when absent) and `cursor` in, `items` and
//! `next_cursor` out, `next_cursor` absent on the last page.
//!
//! Pages are keyset pages: a cursor holds the sort key of the last item
//! shown, and the next page starts strictly after it. Items that existed
//! when a client started paging are each seen exactly once however many
//! are added meanwhile (new ones appear or not, depending on where they
//! sort). A cursor is text naming its list and the key,
//! `<list>~<part>~<part>…` (such as `nodes~gpu-3~<uuid>`), so a cursor of
//! one list is refused by another with a 400. Any key of the right form
//! is a place in the list, so every cursor the list's `pattern` admits
//! gives a page (empty past the end).

use uuid::Uuid;

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

/// A sort key that a cursor can hold: written as parts without `~`, read
/// back only from exactly the form written.
pub trait Key: Sized {
    /// Appends the key's parts to `out`.
    fn write(&self, out: &mut Vec<String>);
    /// Reads the key from the next parts, `None` unless they are of its
    /// form.
    fn read<'a>(parts: &mut impl Iterator<Item = &'a str>) -> Option<Self>;
}

/// An outbox position or an index: 1 to 18 digits.
impl Key for i64 {
    fn write(&self, out: &mut Vec<String>) {
        out.push(self.to_string());
    }
    fn read<'a>(parts: &mut impl Iterator<Item = &'a str>) -> Option<Self> {
        let part = parts.next()?;
        let digits = (1..=18).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit());
        digits.then(|| part.parse().ok()).flatten()
    }
}

/// An index into a list: as `i64`.
impl Key for usize {
    fn write(&self, out: &mut Vec<String>) {
        out.push(self.to_string());
    }
    fn read<'a>(parts: &mut impl Iterator<Item = &'a str>) -> Option<Self> {
        i64::read(parts).and_then(|n| usize::try_from(n).ok())
    }
}

/// A name of a user, node or project
/// ([`domain::spec::validate_name`]).
impl Key for String {
    fn write(&self, out: &mut Vec<String>) {
        out.push(self.clone());
    }
    fn read<'a>(parts: &mut impl Iterator<Item = &'a str>) -> Option<Self> {
        let part = parts.next()?;
        domain::spec::validate_name(part).ok()?;
        Some(part.to_string())
    }
}

/// A UUID, lower-case and hyphenated.
impl Key for Uuid {
    fn write(&self, out: &mut Vec<String>) {
        out.push(self.hyphenated().to_string());
    }
    fn read<'a>(parts: &mut impl Iterator<Item = &'a str>) -> Option<Self> {
        let part = parts.next()?;
        let id = Uuid::try_parse(part).ok()?;
        (id.hyphenated().to_string() == part).then_some(id)
    }
}

impl<A: Key, B: Key> Key for (A, B) {
    fn write(&self, out: &mut Vec<String>) {
        self.0.write(out);
        self.1.write(out);
    }
    fn read<'a>(parts: &mut impl Iterator<Item = &'a str>) -> Option<Self> {
        Some((A::read(parts)?, B::read(parts)?))
    }
}

/// The pattern of a position part of a cursor, as [`Key`] for `i64`
/// reads it.
pub const POSITION: &str = "[0-9]{1,18}";
/// The pattern of a name part, as [`Key`] for `String` reads it.
pub const NAME: &str = "[a-z0-9][a-z0-9._-]{0,62}";
/// The pattern of a UUID part, as [`Key`] for `Uuid` reads it.
pub const UUID: &str = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}";

/// Every list's path under `/api/v1`, its name in its cursors and the
/// patterns of its key's parts.
pub const LISTS: [(&str, &str, &[&str]); 8] = [
    ("/users", "users", &[NAME]),
    ("/users/{name}/tokens", "tokens", &[UUID]),
    ("/nodes", "nodes", &[NAME, UUID]),
    ("/projects", "projects", &[NAME, UUID]),
    ("/tasks", "tasks", &[POSITION]),
    ("/tasks/{id}/artifacts", "artifacts", &[POSITION]),
    ("/events", "events", &[POSITION]),
    ("/timeline", "timeline", &[POSITION]),
];

/// The pattern every cursor of the list at `path` (under `/api/v1`)
/// matches, and every string matching it is a cursor of that list.
pub fn cursor_pattern(path: &str) -> Option<String> {
    let (_, list, parts) = LISTS.iter().find(|(p, _, _)| *p == path)?;
    Some(format!("^{list}~{}$", parts.join("~")))
}

/// The cursor of list `list` that continues after `key`.
pub fn encode<K: Key>(list: &str, key: &K) -> String {
    let mut parts = vec![list.to_string()];
    key.write(&mut parts);
    parts.join("~")
}

/// The key in a cursor of list `list`.
///
/// # Errors
/// 400 naming `cursor` when it is not a cursor of this list.
pub fn decode<K: Key>(list: &str, cursor: &str) -> Result<K, ApiError> {
    let mut parts = cursor.split('~');
    let key = (parts.next() == Some(list))
        .then(|| K::read(&mut parts))
        .flatten()
        .filter(|_| parts.next().is_none());
    key.ok_or_else(|| {
        ApiError::bad_request(
            "cursor",
            format!(
                "not a cursor of this list ({list}~…): pass the next_cursor of its previous page"
            ),
        )
    })
}

/// Cuts `rows` (read with `limit + 1`) to one page and gives the cursor
/// after its last item, when more follow.
pub fn split<T, K: Key>(
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
        let c = encode("users", &"alice".to_string());
        assert_eq!(c, "users~alice");
        assert_eq!(decode::<String>("users", &c).ok().as_deref(), Some("alice"));
        assert!(decode::<String>("nodes", &c).is_err());
        assert!(decode::<String>("user", &c).is_err());
        for bad in [
            "",
            "!!",
            "users",
            "users~",
            "users~Alice",
            "users~a~b",
            "dXNlcnM6",
        ] {
            assert!(decode::<String>("users", bad).is_err(), "{bad}");
        }
        let id = Uuid::nil();
        let c = encode("nodes", &("gpu-3".to_string(), id));
        assert_eq!(
            decode::<(String, Uuid)>("nodes", &c).ok(),
            Some(("gpu-3".to_string(), id))
        );
        let upper = format!("nodes~gpu-3~{}", Uuid::max().hyphenated()).to_uppercase();
        assert!(decode::<(String, Uuid)>("nodes", &upper).is_err());
        for bad in [
            "events~-1",
            "events~1.5",
            "events~1234567890123456789",
            "events~",
        ] {
            assert!(decode::<i64>("events", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_page_has_a_next_cursor_only_when_more_follow() {
        let (items, next) = split("n", vec![1_i64, 2, 3], 2, |i| *i);
        assert_eq!(items, [1, 2]);
        assert_eq!(decode::<i64>("n", &next.unwrap_or_default()).ok(), Some(2));
        let (items, next) = split("n", vec![1_i64, 2], 2, |i| *i);
        assert_eq!((items.len(), next), (2, None));
    }
}
