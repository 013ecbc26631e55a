//! Given/when/then tests of every Project command, rejections included.

use cqrs_es::test::TestFramework;
use uuid::Uuid;

use super::*;
use crate::name::NameError;
use crate::testing::{at, name, user};
use crate::Actor;

type F = TestFramework<Project>;

fn alice() -> Actor {
    user("alice")
}
fn created() -> ProjectEvent {
    ProjectEvent::Created {
        project_id: Uuid::from_u128(3),
        name: name("vision"),
        description: String::new(),
        owner: "alice".into(),
        at: at(0),
    }
}
fn add(user: &str, role: Role) -> ProjectCommand {
    ProjectCommand::AddMember {
        user: user.into(),
        role,
        by: alice(),
        at: at(1),
    }
}
fn added(user: &str, role: Role) -> ProjectEvent {
    ProjectEvent::MemberAdded {
        user: user.into(),
        role,
        by: alice(),
        at: at(1),
    }
}
fn archived() -> ProjectEvent {
    ProjectEvent::Archived {
        by: alice(),
        at: at(2),
    }
}

#[test]
fn creating_makes_the_owner_a_maintainer() {
    let mut p = Project::default();
    let events = F::with(())
        .given_no_previous_events()
        .when(ProjectCommand::Create {
            project_id: Uuid::from_u128(3),
            name: "vision".into(),
            description: String::new(),
            owner: "alice".into(),
            at: at(0),
        })
        .inspect_result()
        .unwrap();
    assert_eq!(events, vec![created()]);
    p.apply_event(created());
    assert_eq!(p.role_of("alice"), Some(Role::Maintainer));
}

#[test]
fn creating_twice_is_refused() {
    F::with(())
        .given(vec![created()])
        .when(ProjectCommand::Create {
            project_id: Uuid::from_u128(3),
            name: "x".into(),
            description: String::new(),
            owner: "bob".into(),
            at: at(0),
        })
        .then_expect_error(ProjectError::AlreadyExists);
}

#[test]
fn a_project_is_neither_created_nor_renamed_to_a_bad_name() {
    F::with(())
        .given_no_previous_events()
        .when(ProjectCommand::Create {
            project_id: Uuid::from_u128(3),
            name: "-vision".into(),
            description: String::new(),
            owner: "bob".into(),
            at: at(0),
        })
        .then_expect_error(ProjectError::InvalidName(NameError));
    F::with(())
        .given(vec![created()])
        .when(ProjectCommand::Rename {
            name: "Vision 2".into(),
            by: alice(),
            at: at(1),
        })
        .then_expect_error(ProjectError::InvalidName(NameError));
}

#[test]
fn commands_on_a_missing_project_say_not_found() {
    F::with(())
        .given_no_previous_events()
        .when(add("bob", Role::Member))
        .then_expect_error(ProjectError::NotFound);
}

#[test]
fn adding_a_member_twice_with_the_same_role_appends_nothing() {
    F::with(())
        .given(vec![created()])
        .when(add("bob", Role::Viewer))
        .then_expect_events(vec![added("bob", Role::Viewer)]);
    F::with(())
        .given(vec![created(), added("bob", Role::Viewer)])
        .when(add("bob", Role::Viewer))
        .then_expect_events(vec![]);
    F::with(())
        .given(vec![created(), added("bob", Role::Viewer)])
        .when(add("bob", Role::Member))
        .then_expect_events(vec![added("bob", Role::Member)]);
}

#[test]
fn the_last_maintainer_can_neither_leave_nor_be_demoted() {
    F::with(())
        .given(vec![created()])
        .when(ProjectCommand::RemoveMember {
            user: "alice".into(),
            by: alice(),
            at: at(1),
        })
        .then_expect_error(ProjectError::LastMaintainer);
    F::with(())
        .given(vec![created()])
        .when(add("alice", Role::Viewer))
        .then_expect_error(ProjectError::LastMaintainer);
}

#[test]
fn removing_a_stranger_is_refused() {
    F::with(())
        .given(vec![created()])
        .when(ProjectCommand::RemoveMember {
            user: "carol".into(),
            by: alice(),
            at: at(1),
        })
        .then_expect_error(ProjectError::NotAMember("carol".into()));
}

#[test]
fn a_quota_is_set_and_an_unchanged_one_appends_nothing() {
    let set = ProjectCommand::SetQuota {
        max_running: Some(4),
        by: alice(),
        at: at(1),
    };
    let was_set = ProjectEvent::QuotaSet {
        max_running: Some(4),
        by: alice(),
        at: at(1),
    };
    F::with(())
        .given(vec![created()])
        .when(set.clone())
        .then_expect_events(vec![was_set.clone()]);
    F::with(())
        .given(vec![created(), was_set])
        .when(set)
        .then_expect_events(vec![]);
}

#[test]
fn renaming_records_the_new_name() {
    F::with(())
        .given(vec![created()])
        .when(ProjectCommand::Rename {
            name: "vision2".into(),
            by: alice(),
            at: at(1),
        })
        .then_expect_events(vec![ProjectEvent::Renamed {
            name: name("vision2"),
            by: alice(),
            at: at(1),
        }]);
}

#[test]
fn an_archived_project_is_read_only() {
    F::with(())
        .given(vec![created()])
        .when(ProjectCommand::Archive {
            by: alice(),
            at: at(2),
        })
        .then_expect_events(vec![archived()]);
    F::with(())
        .given(vec![created(), archived()])
        .when(add("bob", Role::Member))
        .then_expect_error(ProjectError::Archived);
    F::with(())
        .given(vec![created(), archived()])
        .when(ProjectCommand::Archive {
            by: alice(),
            at: at(3),
        })
        .then_expect_events(vec![]);
}

fn remove(user: &str) -> ProjectCommand {
    ProjectCommand::RemoveMember {
        user: user.into(),
        by: alice(),
        at: at(3),
    }
}

#[test]
fn a_member_of_an_archived_project_can_still_be_removed() {
    F::with(())
        .given(vec![created(), added("bob", Role::Member), archived()])
        .when(remove("bob"))
        .then_expect_events(vec![ProjectEvent::MemberRemoved {
            user: "bob".into(),
            by: alice(),
            at: at(3),
        }]);
}

#[test]
fn removal_from_an_archived_project_keeps_its_other_rules() {
    F::with(())
        .given(vec![created(), archived()])
        .when(remove("alice"))
        .then_expect_error(ProjectError::LastMaintainer);
    F::with(())
        .given(vec![created(), archived()])
        .when(remove("carol"))
        .then_expect_error(ProjectError::NotAMember("carol".into()));
}

#[test]
fn an_archived_project_refuses_every_other_change() {
    let given = || vec![created(), added("bob", Role::Member), archived()];
    F::with(())
        .given(given())
        .when(add("bob", Role::Maintainer))
        .then_expect_error(ProjectError::Archived);
    F::with(())
        .given(given())
        .when(ProjectCommand::Rename {
            name: "vision2".into(),
            by: alice(),
            at: at(3),
        })
        .then_expect_error(ProjectError::Archived);
    F::with(())
        .given(given())
        .when(ProjectCommand::SetQuota {
            max_running: Some(1),
            by: alice(),
            at: at(3),
        })
        .then_expect_error(ProjectError::Archived);
}

fn set_secret(name: &str, version: u32) -> ProjectCommand {
    ProjectCommand::SetSecret {
        name: name.into(),
        version,
        value_id: Uuid::from_u128(u128::from(version)),
        by: alice(),
        at: at(3),
    }
}
fn secret_set(name_: &str, version: u32) -> ProjectEvent {
    ProjectEvent::SecretSet {
        name: name(name_),
        version,
        value_id: Uuid::from_u128(u128::from(version)),
        by: alice(),
        at: at(3),
    }
}
fn secret_deleted(name_: &str, version: u32) -> ProjectEvent {
    ProjectEvent::SecretDeleted {
        name: name(name_),
        version,
        by: alice(),
        at: at(4),
    }
}
fn delete_secret(name: &str) -> ProjectCommand {
    ProjectCommand::DeleteSecret {
        name: name.into(),
        by: alice(),
        at: at(4),
    }
}

#[test]
fn a_secret_is_set_then_rotated_with_growing_versions() {
    F::with(())
        .given_no_previous_events()
        .when(set_secret("wandb", 1))
        .then_expect_error(ProjectError::NotFound);
    F::with(())
        .given(vec![created()])
        .when(set_secret("wandb", 1))
        .then_expect_events(vec![secret_set("wandb", 1)]);
    F::with(())
        .given(vec![created(), secret_set("wandb", 1)])
        .when(set_secret("wandb", 2))
        .then_expect_events(vec![secret_set("wandb", 2)]);
}

#[test]
fn a_set_that_raced_another_is_refused_naming_the_next_version() {
    F::with(())
        .given(vec![created(), secret_set("wandb", 1)])
        .when(set_secret("wandb", 1))
        .then_expect_error(ProjectError::SecretChanged {
            name: name("wandb"),
            next: 2,
        });
}

#[test]
fn a_deleted_secret_is_gone_and_its_versions_go_on_counting() {
    let given = vec![
        created(),
        secret_set("wandb", 1),
        secret_deleted("wandb", 1),
    ];
    let mut p = Project::default();
    for e in given.clone() {
        p.apply_event(e);
    }
    assert_eq!(p.secret(&name("wandb")), None);
    assert_eq!(p.live_secrets(), 0);
    F::with(())
        .given(given.clone())
        .when(delete_secret("wandb"))
        .then_expect_error(ProjectError::NoSuchSecret("wandb".into()));
    F::with(())
        .given(given)
        .when(set_secret("wandb", 2))
        .then_expect_events(vec![secret_set("wandb", 2)]);
}

#[test]
fn secret_names_are_checked_and_their_number_is_bounded() {
    F::with(())
        .given(vec![created()])
        .when(set_secret("WANDB KEY", 1))
        .then_expect_error(ProjectError::InvalidName(NameError));
    let mut given = vec![created()];
    given.extend((0..MAX_SECRETS).map(|i| secret_set(&format!("s{i}"), 1)));
    F::with(())
        .given(given.clone())
        .when(set_secret("one-more", 1))
        .then_expect_error(ProjectError::TooManySecrets(MAX_SECRETS));
    // A new value of an existing one is no more secrets.
    F::with(())
        .given(given)
        .when(set_secret("s0", 2))
        .then_expect_events(vec![secret_set("s0", 2)]);
}

#[test]
fn an_archived_project_keeps_its_secrets_but_they_can_still_be_deleted() {
    let given = vec![created(), secret_set("wandb", 1), archived()];
    F::with(())
        .given(given.clone())
        .when(set_secret("wandb", 2))
        .then_expect_error(ProjectError::Archived);
    F::with(())
        .given(given)
        .when(delete_secret("wandb"))
        .then_expect_events(vec![secret_deleted("wandb", 1)]);
}
