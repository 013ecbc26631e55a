//! The projects read models, `project_view` and `project_member_view`.

use domain::project::Project;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{decode, ReadError};

/// The name of the checkpoint of the read model `project_view` and `project_member_view` belong to:
/// events after it are not in them yet.
pub const CHECKPOINT: &str = "projects";

/// One project of a page, with the key it is ordered by.
#[derive(Debug, Clone)]
pub struct ProjectRow {
    /// The project.
    pub project: Project,
    /// Its name, the first part of the order.
    pub name: String,
    /// Its id, which breaks ties between equal names.
    pub id: Uuid,
}

/// Up to `limit` projects ordered by (name, id), those after `after` when
/// it is given, and only those `member` belongs to when it is given.
pub async fn page(
    db: impl PgExecutor<'_>,
    after: Option<(&str, Uuid)>,
    member: Option<&str>,
    limit: i64,
) -> Result<Vec<ProjectRow>, ReadError> {
    let (name, id) = after.unzip();
    let rows: Vec<(serde_json::Value, String, Uuid)> = sqlx::query_as(
        "SELECT p.doc, p.name, p.id FROM project_view p \
         WHERE ($1::text IS NULL OR (p.name, p.id) > ($1, $2)) \
           AND ($3::text IS NULL OR p.id IN \
                (SELECT project_id FROM project_member_view WHERE user_name = $3)) \
         ORDER BY p.name, p.id LIMIT $4",
    )
    .bind(name)
    .bind(id)
    .bind(member)
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|(doc, name, id)| {
            Ok(ProjectRow {
                project: decode("project_view", doc)?,
                name,
                id,
            })
        })
        .collect()
}

/// The ids of the projects `user` is a member of.
pub async fn of_member(db: impl PgExecutor<'_>, user: &str) -> Result<Vec<Uuid>, ReadError> {
    Ok(
        sqlx::query_scalar("SELECT project_id FROM project_member_view WHERE user_name = $1")
            .bind(user)
            .fetch_all(db)
            .await?,
    )
}

/// The most running tasks of each of `ids` that has a limit, as stored
/// (possibly negative).
pub async fn running_limits(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, (doc->>'max_running')::bigint FROM project_view \
         WHERE id = ANY($1) AND doc->>'max_running' IS NOT NULL",
    )
    .bind(ids)
    .fetch_all(db)
    .await
}

/// [`running_limits`] and where the projects read model stood when they
/// were read (`None` before its first batch), in one statement, so the
/// two agree.
pub async fn running_limits_at(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<(Vec<(Uuid, i64)>, Option<store::Checkpoint>), sqlx::Error> {
    /// A project's limit, or the checkpoint.
    type Row = (Option<Uuid>, Option<i64>, Option<i64>, Option<i64>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT NULL::uuid, NULL::bigint, txid, position FROM checkpoints WHERE name = 'projects' \
         UNION ALL \
         SELECT id, (doc->>'max_running')::bigint, NULL, NULL FROM project_view \
         WHERE id = ANY($1) AND doc->>'max_running' IS NOT NULL",
    )
    .bind(ids)
    .fetch_all(db)
    .await?;
    let mut at = None;
    let mut limits = Vec::with_capacity(rows.len());
    for row in rows {
        match row {
            (Some(id), Some(limit), _, _) => limits.push((id, limit)),
            (None, _, Some(txid), Some(position)) => {
                at = Some(store::Checkpoint { txid, position });
            }
            _ => {}
        }
    }
    Ok((limits, at))
}
