//! Where objects live in the bucket.
//!
//! ```text
//! projects/<project id>/objects/<object name>                     uploaded by users
//! projects/<project id>/tasks/<task id>/<attempt>/<output name>   a task's outputs
//! ```
//!
//! Object names and output names are validated by the domain before they
//! get here (relative, no `..`, a small character set), so a key never
//! leaves its project's prefix.

use uuid::Uuid;

/// The key of object `name` of project `project_id`.
pub fn project_object(project_id: Uuid, name: &str) -> String {
    format!("projects/{project_id}/objects/{name}")
}

/// The key of output `name` of attempt `attempt` of task `task_id`.
pub fn task_output(project_id: Uuid, task_id: Uuid, attempt: u32, name: &str) -> String {
    format!("projects/{project_id}/tasks/{task_id}/{attempt}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projects_and_tasks_have_separate_prefixes() {
        let p = Uuid::from_u128(1);
        let t = Uuid::from_u128(2);
        assert_eq!(
            project_object(p, "data/a.tar"),
            format!("projects/{p}/objects/data/a.tar")
        );
        assert_eq!(
            task_output(p, t, 3, "model"),
            format!("projects/{p}/tasks/{t}/3/model")
        );
    }
}
