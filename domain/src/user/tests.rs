//! Given/when/then tests of every User command, rejections included.

use chrono::{DateTime, Utc};
use cqrs_es::test::TestFramework;
use uuid::Uuid;

use super::*;
use crate::name::NameError;
use crate::testing::{admin, at, name};

type F = TestFramework<User>;

fn created() -> UserEvent {
    UserEvent::Created {
        name: name("alice"),
        admin: false,
        by: admin(),
        at: at(0),
    }
}
fn issued() -> UserEvent {
    UserEvent::TokenIssued {
        token_id: Uuid::from_u128(5),
        fingerprint: "ff".into(),
        label: "laptop".into(),
        by: admin(),
        at: at(1),
        expires_at: None,
    }
}

#[test]
fn a_name_is_taken_once() {
    F::with(())
        .given(vec![created()])
        .when(UserCommand::Create {
            name: "alice".into(),
            admin: true,
            by: admin(),
            at: at(0),
        })
        .then_expect_error(UserError::AlreadyExists);
}

#[test]
fn a_user_whose_name_is_not_a_name_is_refused() {
    F::with(())
        .given_no_previous_events()
        .when(UserCommand::Create {
            name: "Alice Smith".into(),
            admin: false,
            by: admin(),
            at: at(0),
        })
        .then_expect_error(UserError::InvalidName(NameError));
}

#[test]
fn tokens_are_issued_to_existing_users_only() {
    let issue = UserCommand::IssueToken {
        token_id: Uuid::from_u128(5),
        fingerprint: "ff".into(),
        label: "laptop".into(),
        by: admin(),
        at: at(1),
        expires_at: None,
        max_live: 20,
    };
    F::with(())
        .given(vec![created()])
        .when(issue.clone())
        .then_expect_events(vec![issued()]);
    F::with(())
        .given_no_previous_events()
        .when(issue)
        .then_expect_error(UserError::NotFound);
}

#[test]
fn a_revoked_token_is_no_longer_live() {
    let revoke = UserCommand::RevokeToken {
        token_id: Uuid::from_u128(5),
        by: admin(),
        at: at(2),
    };
    let events = F::with(())
        .given(vec![created(), issued()])
        .when(revoke.clone())
        .inspect_result()
        .unwrap();
    let mut u = User::default();
    for e in [created(), issued()].into_iter().chain(events) {
        u.apply_event(e);
    }
    assert_eq!(u.live_token(Uuid::from_u128(5), at(3)), None);
    F::with(())
        .given(vec![created()])
        .when(revoke)
        .then_expect_error(UserError::TokenNotFound);
}

fn issue(id: u128, at_s: i64, expires_at: Option<DateTime<Utc>>) -> UserCommand {
    UserCommand::IssueToken {
        token_id: Uuid::from_u128(id),
        fingerprint: "ff".into(),
        label: String::new(),
        by: admin(),
        at: at(at_s),
        expires_at,
        max_live: 2,
    }
}

fn issued_at(id: u128, at_s: i64, expires_at: Option<DateTime<Utc>>) -> UserEvent {
    UserEvent::TokenIssued {
        token_id: Uuid::from_u128(id),
        fingerprint: "ff".into(),
        label: String::new(),
        by: admin(),
        at: at(at_s),
        expires_at,
    }
}

#[test]
fn a_user_holds_at_most_max_live_tokens_and_expired_or_revoked_ones_do_not_count() {
    let two = vec![
        created(),
        issued_at(1, 1, None),
        issued_at(2, 1, Some(at(10))),
    ];
    F::with(())
        .given(two.clone())
        .when(issue(3, 5, None))
        .then_expect_error(UserError::TooManyTokens(2));
    // Token 2 expired at 10.
    F::with(())
        .given(two.clone())
        .when(issue(3, 10, None))
        .then_expect_events(vec![issued_at(3, 10, None)]);
    let mut revoked = two;
    revoked.push(UserEvent::TokenRevoked {
        token_id: Uuid::from_u128(1),
        by: admin(),
        at: at(2),
    });
    F::with(())
        .given(revoked)
        .when(issue(3, 5, None))
        .then_expect_events(vec![issued_at(3, 5, None)]);
}

#[test]
fn a_token_expires_after_its_issue_and_stops_being_live_then() {
    F::with(())
        .given(vec![created()])
        .when(issue(1, 5, Some(at(5))))
        .then_expect_error(UserError::ExpiresBeforeIssue);
    let mut u = User::default();
    for e in [created(), issued_at(1, 1, Some(at(10)))] {
        u.apply_event(e);
    }
    assert_eq!(u.live_token(Uuid::from_u128(1), at(9)), Some("ff"));
    assert_eq!(u.live_token(Uuid::from_u128(1), at(10)), None);
}

#[test]
fn a_token_event_stored_before_expiry_existed_still_loads() {
    let old = serde_json::json!({"TokenIssued": {
        "token_id": Uuid::from_u128(1), "fingerprint": "ff", "label": "",
        "by": admin(), "at": at(1)
    }});
    let event: UserEvent = serde_json::from_value(old).unwrap();
    assert_eq!(event, issued_at(1, 1, None));
}
