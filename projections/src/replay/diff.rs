//! What an event changed in an aggregate's state: the paths whose values
//! differ between two JSON documents.

use serde::Serialize;
use serde_json::Value;

/// One value that differs between the state before an event and after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// Where, such as `state`, `attempts[1].outcome` or `labels.gpu`.
    pub path: String,
    /// The value before; absent when the path did not exist.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<Value>,
    /// The value after; absent when the path no longer exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<Value>,
}

/// The changes from `before` to `after`: objects and arrays are compared
/// member by member (arrays by index), anything else as a whole. Keys come
/// in sorted order.
pub fn diff(before: &Value, after: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    walk(String::new(), before, after, &mut out);
    out
}

fn walk(path: String, before: &Value, after: &Value, out: &mut Vec<Change>) {
    if before == after {
        return;
    }
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, old) in a {
                let p = member(&path, key);
                match b.get(key) {
                    Some(new) => walk(p, old, new, out),
                    None => out.push(Change {
                        path: p,
                        old: Some(old.clone()),
                        new: None,
                    }),
                }
            }
            for (key, new) in b.iter().filter(|(k, _)| !a.contains_key(*k)) {
                out.push(Change {
                    path: member(&path, key),
                    old: None,
                    new: Some(new.clone()),
                });
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let p = format!("{path}[{i}]");
                match (a.get(i), b.get(i)) {
                    (Some(old), Some(new)) => walk(p, old, new, out),
                    (old, new) => out.push(Change {
                        path: p,
                        old: old.cloned(),
                        new: new.cloned(),
                    }),
                }
            }
        }
        _ => out.push(Change {
            path,
            old: Some(before.clone()),
            new: Some(after.clone()),
        }),
    }
}

fn member(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn paths(changes: &[Change]) -> Vec<&str> {
        changes.iter().map(|c| c.path.as_str()).collect()
    }

    #[test]
    fn equal_documents_have_no_changes() {
        let doc = json!({"a": [1, {"b": null}], "c": "x"});
        assert!(diff(&doc, &doc).is_empty());
    }

    #[test]
    fn changes_name_the_innermost_path_with_old_and_new() {
        let before = json!({"state": "queued", "attempts": [{"n": 1, "outcome": null}], "gone": 1});
        let after = json!({"state": "running", "attempts": [{"n": 1, "outcome": "lost"}, {"n": 2}], "new": true});
        let changes = diff(&before, &after);
        assert_eq!(
            paths(&changes),
            ["attempts[0].outcome", "attempts[1]", "gone", "state", "new"]
        );
        assert_eq!(changes[0].old, Some(Value::Null));
        assert_eq!(changes[0].new, Some(json!("lost")));
        assert_eq!(changes[1].old, None);
        assert_eq!(changes[2].new, None);
        assert_eq!(changes[3].old, Some(json!("queued")));
    }

    #[test]
    fn a_value_changing_kind_is_one_change() {
        let changes = diff(&json!({"spec": null}), &json!({"spec": {"a": 1}}));
        assert_eq!(paths(&changes), ["spec"]);
    }
}
