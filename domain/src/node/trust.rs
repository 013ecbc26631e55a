//! What an admin vouches for about a node, as opposed to what its agent
//! says.
//!
//! A node token proves which node is talking, not that its hello is true:
//! an agent could declare `gpu=a100` or 64 CPUs to attract work (and the
//! data that comes with it) meant for other machines. So:
//!
//! - **Labels.** Placement matches only [`Node::labels`], which an admin
//!   sets: when provisioning, by replacing the whole set
//!   ([`NodeCommand::SetLabels`] → [`NodeEvent::LabelsSet`]), or by
//!   accepting labels the agent declared
//!   ([`NodeCommand::AcceptDeclaredLabels`] →
//!   [`NodeEvent::DeclaredLabelsAccepted`], which records the values
//!   accepted, so a later hello cannot change what was vouched for).
//!   [`Node::declared_labels`] are shown, never matched.
//! - **Resources.** An admin may set a maximum ([`ResourceLimits`], when
//!   provisioning or by [`NodeCommand::SetLimits`] → [`NodeEvent::LimitsSet`]).
//!   What the agent declares beyond it is clamped; of its GPUs only the
//!   first declared devices count ([`Node::effective_resources`]).
//!   Lowering a maximum below what running tasks hold stops nothing: the
//!   scheduler places nothing more there until they fit again.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Node, NodeError, NodeResources};
#[cfg(doc)]
use super::{NodeCommand, NodeEvent};
use crate::spec::{validate_labels, FieldError};
use crate::Actor;

/// The largest CPU maximum, in cores.
pub const MAX_NODE_CPUS: f64 = 65_536.0;
/// The largest memory maximum, in MiB (1 PiB).
pub const MAX_NODE_MEMORY_MB: i64 = 1024 * 1024 * 1024;
/// The largest GPU maximum.
pub const MAX_NODE_GPUS: i64 = 1024;

/// The most a node may claim, as an admin set it. A dimension without a
/// value has no maximum; the default has none at all.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ResourceLimits {
    /// CPU cores, fractions allowed.
    pub cpus: Option<f64>,
    /// Memory in MiB.
    pub memory_mb: Option<u64>,
    /// How many of the GPUs the node declares count: the first ones, in
    /// the order declared.
    pub gpus: Option<u32>,
}

impl ResourceLimits {
    /// Whether no dimension has a maximum.
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }

    /// Checks each maximum's range; `prefix` is the path of the limits in
    /// the request body (`max_resources`), empty when they are the body.
    ///
    /// # Errors
    /// A [`FieldError`] naming the first maximum out of range.
    pub fn validate(&self, prefix: &str) -> Result<(), FieldError> {
        ResourceLimitsDraft {
            cpus: self.cpus,
            memory_mb: self.memory_mb.map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
            gpus: self.gpus.map(i64::from),
        }
        .validate(prefix)
        .map(|_| ())
        .map_err(|mut errors| errors.swap_remove(0))
    }

    /// What of `declared` counts: each dimension at most its maximum; GPUs
    /// the first declared devices, each index once (a device declared twice
    /// is one device). CPUs that are not a number of cores count as none.
    pub fn clamp(&self, declared: &NodeResources) -> NodeResources {
        let cpus = if declared.cpus.is_finite() && declared.cpus > 0.0 {
            declared.cpus
        } else {
            0.0
        };
        let mut seen = BTreeSet::new();
        NodeResources {
            cpus: self.cpus.map_or(cpus, |max| cpus.min(max)),
            memory_mb: self
                .memory_mb
                .map_or(declared.memory_mb, |max| declared.memory_mb.min(max)),
            gpus: declared
                .gpus
                .iter()
                .filter(|g| seen.insert(g.index))
                .take(self.gpus.map_or(usize::MAX, |n| n as usize))
                .cloned()
                .collect(),
        }
    }
}

/// The raw form of [`ResourceLimits`] as it arrives at the edge, wide
/// enough that a negative or huge number gets a clear error instead of a
/// type error.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceLimitsDraft {
    /// See [`ResourceLimits::cpus`].
    pub cpus: Option<f64>,
    /// See [`ResourceLimits::memory_mb`].
    pub memory_mb: Option<i64>,
    /// See [`ResourceLimits::gpus`].
    pub gpus: Option<i64>,
}

impl ResourceLimitsDraft {
    /// Checks every maximum; `prefix` as for [`ResourceLimits::validate`].
    ///
    /// # Errors
    /// One [`FieldError`] per maximum out of range.
    pub fn validate(self, prefix: &str) -> Result<ResourceLimits, Vec<FieldError>> {
        let field = |name: &str| {
            if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            }
        };
        let mut errors = Vec::new();
        if let Some(c) = self.cpus {
            if !(c.is_finite() && c > 0.0 && c <= MAX_NODE_CPUS) {
                errors.push(FieldError::new(
                    field("cpus"),
                    format!("must be more than 0 and at most {MAX_NODE_CPUS}, or null for no maximum, got {c}"),
                ));
            }
        }
        let mut ranged = |name: &str, v: Option<i64>, min: i64, max: i64| match v {
            Some(v) if !(min..=max).contains(&v) => {
                errors.push(FieldError::new(
                    field(name),
                    format!("must be between {min} and {max}, or null for no maximum, got {v}"),
                ));
                None
            }
            v => v,
        };
        let memory_mb = ranged("memory_mb", self.memory_mb, 1, MAX_NODE_MEMORY_MB);
        let gpus = ranged("gpus", self.gpus, 0, MAX_NODE_GPUS);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ResourceLimits {
            cpus: self.cpus,
            memory_mb: memory_mb.and_then(|m| u64::try_from(m).ok()),
            gpus: gpus.and_then(|g| u32::try_from(g).ok()),
        })
    }
}

impl Node {
    pub(super) fn set_labels(
        &self,
        labels: BTreeMap<String, String>,
        by: Actor,
        at: DateTime<Utc>,
    ) -> Result<Vec<super::NodeEvent>, NodeError> {
        validate_labels("labels", &labels).map_err(NodeError::Invalid)?;
        if labels == self.labels {
            return Ok(vec![]);
        }
        Ok(vec![super::NodeEvent::LabelsSet { labels, by, at }])
    }

    pub(super) fn accept_declared_labels(
        &self,
        keys: Option<&[String]>,
        by: Actor,
        at: DateTime<Utc>,
    ) -> Result<Vec<super::NodeEvent>, NodeError> {
        let mut accepted = match keys {
            None => self.declared_labels.clone(),
            Some(keys) => {
                let mut chosen = BTreeMap::new();
                for (i, key) in keys.iter().enumerate() {
                    let Some(value) = self.declared_labels.get(key) else {
                        return Err(NodeError::NotDeclared(FieldError::new(
                            format!("keys[{i}]"),
                            format!("the node's agent does not declare a label {key:?}"),
                        )));
                    };
                    chosen.insert(key.clone(), value.clone());
                }
                chosen
            }
        };
        accepted.retain(|k, v| self.labels.get(k) != Some(v));
        if accepted.is_empty() {
            return Ok(vec![]);
        }
        let mut merged = self.labels.clone();
        merged.extend(accepted.clone());
        validate_labels("labels", &merged).map_err(NodeError::Invalid)?;
        Ok(vec![super::NodeEvent::DeclaredLabelsAccepted {
            labels: accepted,
            by,
            at,
        }])
    }

    pub(super) fn set_limits(
        &self,
        max_resources: ResourceLimits,
        by: Actor,
        at: DateTime<Utc>,
    ) -> Result<Vec<super::NodeEvent>, NodeError> {
        max_resources
            .validate("max_resources")
            .map_err(NodeError::Invalid)?;
        if max_resources == self.max_resources {
            return Ok(vec![]);
        }
        Ok(vec![super::NodeEvent::LimitsSet {
            max_resources,
            by,
            at,
        }])
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;
    use uuid::Uuid;

    use super::super::{Gpu, NodeCommand, NodeEvent};
    use super::*;
    use crate::testing::{admin, at, name, state_after};

    type F = TestFramework<Node>;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
    fn provisioned() -> NodeEvent {
        NodeEvent::Provisioned {
            node_id: Uuid::from_u128(7),
            name: name("gpu-3"),
            labels: labels(&[("zone", "lab")]),
            token_fingerprint: "ff".into(),
            max_resources: ResourceLimits::default(),
            by: admin(),
            at: at(0),
        }
    }
    fn gpus(indices: &[u32]) -> Vec<Gpu> {
        indices
            .iter()
            .map(|&index| Gpu {
                index,
                name: "A100".into(),
                memory_mb: 40960,
            })
            .collect()
    }
    /// An agent that claims a lot: 64 CPUs, 8 GPUs and `gpu=a100`.
    fn boastful() -> NodeEvent {
        NodeEvent::Connected {
            session: Uuid::from_u128(11),
            agent_version: "0.1.0".into(),
            resources: NodeResources {
                cpus: 64.0,
                memory_mb: 512 * 1024,
                gpus: gpus(&[0, 1, 2, 3, 4, 5, 6, 7]),
            },
            labels: labels(&[("gpu", "a100"), ("os", "linux")]),
            at: at(1),
        }
    }
    fn revoked() -> NodeEvent {
        NodeEvent::TokenRevoked {
            by: admin(),
            at: at(2),
        }
    }
    fn state(events: Vec<NodeEvent>) -> Node {
        state_after(events)
    }
    fn max(cpus: Option<f64>, memory_mb: Option<u64>, gpus: Option<u32>) -> ResourceLimits {
        ResourceLimits {
            cpus,
            memory_mb,
            gpus,
        }
    }

    #[test]
    fn an_agent_declaring_a_label_does_not_get_it_until_an_admin_accepts() {
        let n = state(vec![provisioned(), boastful()]);
        assert_eq!(n.labels, labels(&[("zone", "lab")]));
        assert_eq!(n.declared_labels["gpu"], "a100");
        let accepted = NodeEvent::DeclaredLabelsAccepted {
            labels: labels(&[("gpu", "a100")]),
            by: admin(),
            at: at(3),
        };
        F::with(())
            .given(vec![provisioned(), boastful()])
            .when(NodeCommand::AcceptDeclaredLabels {
                keys: Some(vec!["gpu".into()]),
                by: admin(),
                at: at(3),
            })
            .then_expect_events(vec![accepted.clone()]);
        let n = state(vec![provisioned(), boastful(), accepted.clone()]);
        assert_eq!(n.labels, labels(&[("gpu", "a100"), ("zone", "lab")]));
        // Accepting again changes nothing.
        F::with(())
            .given(vec![provisioned(), boastful(), accepted])
            .when(NodeCommand::AcceptDeclaredLabels {
                keys: Some(vec!["gpu".into()]),
                by: admin(),
                at: at(4),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn accepting_without_keys_takes_every_declared_label_that_differs() {
        F::with(())
            .given(vec![provisioned(), boastful()])
            .when(NodeCommand::AcceptDeclaredLabels {
                keys: None,
                by: admin(),
                at: at(3),
            })
            .then_expect_events(vec![NodeEvent::DeclaredLabelsAccepted {
                labels: labels(&[("gpu", "a100"), ("os", "linux")]),
                by: admin(),
                at: at(3),
            }]);
        // Nothing declared: nothing to accept.
        F::with(())
            .given(vec![provisioned()])
            .when(NodeCommand::AcceptDeclaredLabels {
                keys: None,
                by: admin(),
                at: at(3),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_key_the_agent_does_not_declare_cannot_be_accepted() {
        F::with(())
            .given(vec![provisioned(), boastful()])
            .when(NodeCommand::AcceptDeclaredLabels {
                keys: Some(vec!["os".into(), "gpu-count".into()]),
                by: admin(),
                at: at(3),
            })
            .then_expect_error(NodeError::NotDeclared(FieldError::new(
                "keys[1]",
                "the node's agent does not declare a label \"gpu-count\"",
            )));
    }

    #[test]
    fn accepted_values_are_the_ones_declared_at_the_time() {
        // The agent later declares another value: the admin's set keeps
        // what was accepted.
        let mut later = boastful();
        if let NodeEvent::Connected { labels: l, .. } = &mut later {
            *l = labels(&[("gpu", "h100")]);
        }
        let n = state(vec![
            provisioned(),
            boastful(),
            NodeEvent::DeclaredLabelsAccepted {
                labels: labels(&[("gpu", "a100")]),
                by: admin(),
                at: at(3),
            },
            later,
        ]);
        assert_eq!(n.labels["gpu"], "a100");
        assert_eq!(n.declared_labels["gpu"], "h100");
    }

    #[test]
    fn an_admin_replaces_the_whole_label_set() {
        let set = |pairs: &[(&str, &str)]| NodeCommand::SetLabels {
            labels: labels(pairs),
            by: admin(),
            at: at(3),
        };
        F::with(())
            .given(vec![provisioned(), boastful()])
            .when(set(&[("gpu", "h100")]))
            .then_expect_events(vec![NodeEvent::LabelsSet {
                labels: labels(&[("gpu", "h100")]),
                by: admin(),
                at: at(3),
            }]);
        let n = state(vec![
            provisioned(),
            NodeEvent::LabelsSet {
                labels: BTreeMap::new(),
                by: admin(),
                at: at(3),
            },
        ]);
        assert!(n.labels.is_empty());
        // The same set again appends nothing.
        F::with(())
            .given(vec![provisioned()])
            .when(set(&[("zone", "lab")]))
            .then_expect_events(vec![]);
    }

    #[test]
    fn bad_labels_are_refused_naming_the_key() {
        for (key, value) in [("-gpu", "a100"), ("gpu", "a 100"), ("", "x")] {
            F::with(())
                .given(vec![provisioned()])
                .when(NodeCommand::SetLabels {
                    labels: labels(&[(key, value)]),
                    by: admin(),
                    at: at(3),
                })
                .then_expect_error(NodeError::Invalid(
                    validate_labels("labels", &labels(&[(key, value)])).unwrap_err(),
                ));
        }
        let too_many: BTreeMap<String, String> = (0..=crate::spec::limits::MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        F::with(())
            .given(vec![provisioned()])
            .when(NodeCommand::SetLabels {
                labels: too_many,
                by: admin(),
                at: at(3),
            })
            .then_expect_error_message("labels: at most 64 labels");
    }

    #[test]
    fn a_revoked_or_unknown_node_gets_no_labels_or_maximum() {
        for command in [
            NodeCommand::SetLabels {
                labels: BTreeMap::new(),
                by: admin(),
                at: at(3),
            },
            NodeCommand::AcceptDeclaredLabels {
                keys: None,
                by: admin(),
                at: at(3),
            },
            NodeCommand::SetLimits {
                max_resources: max(Some(1.0), None, None),
                by: admin(),
                at: at(3),
            },
        ] {
            F::with(())
                .given(vec![provisioned(), revoked()])
                .when(command.clone())
                .then_expect_error(NodeError::Revoked);
            F::with(())
                .given_no_previous_events()
                .when(command)
                .then_expect_error(NodeError::NotFound);
        }
    }

    #[test]
    fn what_a_node_declares_beyond_its_maximum_is_clamped() {
        let limit = max(Some(4.0), Some(8192), Some(1));
        F::with(())
            .given(vec![provisioned(), boastful()])
            .when(NodeCommand::SetLimits {
                max_resources: limit,
                by: admin(),
                at: at(3),
            })
            .then_expect_events(vec![NodeEvent::LimitsSet {
                max_resources: limit,
                by: admin(),
                at: at(3),
            }]);
        let mut n = state(vec![
            provisioned(),
            boastful(),
            NodeEvent::LimitsSet {
                max_resources: limit,
                by: admin(),
                at: at(3),
            },
        ]);
        let effective = n.effective_resources().unwrap();
        assert_eq!(effective.cpus, 4.0);
        assert_eq!(effective.memory_mb, 8192);
        assert_eq!(effective.gpus, gpus(&[0]));
        // What it declared is kept, to be shown.
        assert_eq!(n.declared_resources.as_ref().unwrap().cpus, 64.0);
        // Declaring less than the maximum is taken as declared.
        n.declared_resources = Some(NodeResources {
            cpus: 2.0,
            memory_mb: 1024,
            gpus: vec![],
        });
        let effective = n.effective_resources().unwrap();
        assert_eq!((effective.cpus, effective.memory_mb), (2.0, 1024));
    }

    #[test]
    fn only_the_first_declared_gpus_count_and_a_repeated_index_is_one_device() {
        let declared = NodeResources {
            cpus: 8.0,
            memory_mb: 1024,
            gpus: gpus(&[3, 3, 3, 1, 0]),
        };
        let kept = |n: Option<u32>| -> Vec<u32> {
            max(None, None, n)
                .clamp(&declared)
                .gpus
                .iter()
                .map(|g| g.index)
                .collect()
        };
        assert_eq!(kept(None), [3, 1, 0]);
        assert_eq!(kept(Some(2)), [3, 1]);
        assert_eq!(kept(Some(0)), Vec::<u32>::new());
        let nan = NodeResources {
            cpus: f64::NAN,
            ..declared.clone()
        };
        assert_eq!(max(Some(4.0), None, None).clamp(&nan).cpus, 0.0);
    }

    #[test]
    fn a_maximum_is_provisioned_lifted_and_checked() {
        let provision = |limit: ResourceLimits| NodeCommand::Provision {
            node_id: Uuid::from_u128(7),
            name: "gpu-3".into(),
            labels: labels(&[("zone", "lab")]),
            token_fingerprint: "ff".into(),
            max_resources: limit,
            by: admin(),
            at: at(0),
        };
        let limit = max(Some(4.0), None, Some(1));
        let with_limit = NodeEvent::Provisioned {
            node_id: Uuid::from_u128(7),
            name: name("gpu-3"),
            labels: labels(&[("zone", "lab")]),
            token_fingerprint: "ff".into(),
            max_resources: limit,
            by: admin(),
            at: at(0),
        };
        F::with(())
            .given_no_previous_events()
            .when(provision(limit))
            .then_expect_events(vec![with_limit.clone()]);
        assert_eq!(state(vec![with_limit.clone()]).max_resources, limit);
        F::with(())
            .given(vec![with_limit.clone()])
            .when(NodeCommand::SetLimits {
                max_resources: ResourceLimits::default(),
                by: admin(),
                at: at(3),
            })
            .then_expect_events(vec![NodeEvent::LimitsSet {
                max_resources: ResourceLimits::default(),
                by: admin(),
                at: at(3),
            }]);
        F::with(())
            .given(vec![with_limit])
            .when(NodeCommand::SetLimits {
                max_resources: limit,
                by: admin(),
                at: at(3),
            })
            .then_expect_events(vec![]);
        for (bad, field) in [
            (max(Some(0.0), None, None), "max_resources.cpus"),
            (max(Some(f64::INFINITY), None, None), "max_resources.cpus"),
            (max(None, Some(0), None), "max_resources.memory_mb"),
            (max(None, None, Some(100_000)), "max_resources.gpus"),
        ] {
            F::with(())
                .given_no_previous_events()
                .when(provision(bad))
                .then_expect_error(NodeError::Invalid(
                    bad.validate("max_resources").unwrap_err(),
                ));
            assert_eq!(bad.validate("max_resources").unwrap_err().field, field);
        }
    }

    #[test]
    fn a_draft_names_every_maximum_out_of_range() {
        let errors = ResourceLimitsDraft {
            cpus: Some(-1.0),
            memory_mb: Some(-5),
            gpus: Some(-1),
        }
        .validate("")
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["cpus", "memory_mb", "gpus"]);
        assert_eq!(
            ResourceLimitsDraft {
                cpus: Some(0.5),
                memory_mb: None,
                gpus: Some(0),
            }
            .validate("max_resources"),
            Ok(max(Some(0.5), None, Some(0)))
        );
    }

    #[test]
    fn events_and_states_stored_before_labels_and_maxima_were_split_still_load() {
        // A NodeProvisioned and a node state exactly as older builds wrote
        // them.
        let old_event = serde_json::json!({"Provisioned": {
            "node_id": Uuid::from_u128(7), "name": "gpu-3", "labels": {"zone": "lab"},
            "token_fingerprint": "ff", "by": "user:admin", "at": at(0)
        }});
        let event: NodeEvent = serde_json::from_value(old_event.clone()).unwrap();
        assert_eq!(event, provisioned());
        // Without a maximum the event is written as before.
        assert_eq!(serde_json::to_value(&event).unwrap(), old_event);
        let old_state = serde_json::json!({
            "id": Uuid::from_u128(7), "name": "gpu-3",
            "provisioned_labels": {"zone": "lab"}, "agent_labels": {"gpu": "a100"},
            "token_fingerprint": "ff", "status": "online", "drained": false,
            "session": null, "agent_version": "0.1.0",
            "resources": {"cpus": 8.0, "memory_mb": 1024, "gpus": []},
            "provisioned_at": at(0), "connected_at": at(1), "updated_at": at(1)
        });
        let n: Node = serde_json::from_value(old_state).unwrap();
        assert_eq!(n.labels, labels(&[("zone", "lab")]));
        assert_eq!(n.declared_labels, labels(&[("gpu", "a100")]));
        assert_eq!(n.declared_resources.as_ref().unwrap().cpus, 8.0);
        assert!(n.max_resources.is_unlimited());
        assert_eq!(n.effective_resources().unwrap().cpus, 8.0);
        // And a state written now reads back the same.
        let again: Node = serde_json::from_value(serde_json::to_value(&n).unwrap()).unwrap();
        assert_eq!(again, n);
    }
}
