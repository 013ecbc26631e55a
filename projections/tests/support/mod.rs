//! What the projection tests share.

use sqlx::PgPool;

/// Every read-model table as text, rows in key order: two dumps are equal
/// exactly when the read models hold the same rows.
pub async fn dump(pool: &PgPool) -> String {
    let mut out = String::new();
    for (table, key) in [
        ("task_view", "id"),
        ("task_counts", "project_id, state"),
        ("node_view", "id"),
        ("project_view", "id"),
        ("project_member_view", "project_id, user_name"),
        ("user_view", "name"),
        ("timeline", "position"),
    ] {
        let rows: Option<String> = sqlx::query_scalar(&format!(
            "SELECT string_agg(t::text, E'\\n' ORDER BY {key}) FROM {table} t"
        ))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("dumping {table}: {e}"));
        out.push_str(&format!("== {table}\n{}\n", rows.unwrap_or_default()));
    }
    out
}
