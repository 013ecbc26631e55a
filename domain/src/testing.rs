//! What the given/when/then tests of every aggregate share: a fixed clock
//! and the people who act.

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::Aggregate;

use crate::Actor;

/// `s` seconds after a fixed instant, so events compare equal.
pub(crate) fn at(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
}

/// The user named `name`.
pub(crate) fn user(name: &str) -> Actor {
    Actor::User(name.into())
}

/// The admin user.
pub(crate) fn admin() -> Actor {
    user("admin")
}

/// The state `events` leave an empty aggregate in.
pub(crate) fn state_after<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> A {
    let mut state = A::default();
    for event in events {
        state.apply(event);
    }
    state
}

/// `s` as a name, which it must be.
pub(crate) fn name(s: &str) -> crate::Name {
    crate::Name::parse(s).unwrap()
}
