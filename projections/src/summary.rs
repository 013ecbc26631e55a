//! One-line summaries of events, for the audit timeline and the replay
//! tools. One function per aggregate's event type, so that every view that
//! explains an event says the same thing.

use domain::node::{HostSshOutcome, NodeEvent, ResourceLimits};
use domain::project::ProjectEvent;
use domain::task::TaskEvent;
use domain::user::UserEvent;
use domain::Actor;
use serde::Deserialize;
use store::outbox::RecordedEvent;
use uuid::Uuid;

/// The node an event refers to, whose name a summary would mention.
pub fn node_of(event: &RecordedEvent) -> Option<Uuid> {
    match event.aggregate_type.as_str() {
        "node" => event.aggregate_id.parse().ok(),
        "task" => match TaskEvent::deserialize(&event.payload).ok()? {
            TaskEvent::Assigned { node_id, .. }
            | TaskEvent::Lost { node_id, .. }
            | TaskEvent::ReportRefused { node_id, .. } => Some(node_id),
            _ => None,
        },
        _ => None,
    }
}

/// Summarises a stored event. `node_name` is the name of the node from
/// [`node_of`], when known.
///
/// # Errors
/// The decoding error when the payload does not fit its aggregate's events.
pub fn summarize(
    event: &RecordedEvent,
    node_name: Option<&str>,
) -> Result<String, serde_json::Error> {
    let p = &event.payload;
    let actor = event.actor();
    Ok(match event.aggregate_type.as_str() {
        "task" => task(&Deserialize::deserialize(p)?, actor, node_name),
        "node" => node(&Deserialize::deserialize(p)?, node_name),
        "project" => project(&Deserialize::deserialize(p)?),
        "user" => user(&Deserialize::deserialize(p)?, &event.aggregate_id),
        other => format!("{} on {other} {}", event.event_type, event.aggregate_id),
    })
}

fn node_label(id: &Uuid, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("node {n}"),
        None => format!("node {id}"),
    }
}

/// Summarises a task event.
pub fn task(e: &TaskEvent, actor: &str, node_name: Option<&str>) -> String {
    match e {
        TaskEvent::Submitted { spec, by, .. } => format!(
            "{by} submitted `{}` at code {} / env {} ({}), needing {} CPU, {} MiB, {} GPU",
            if spec.command.is_empty() {
                "<image default command>".to_string()
            } else {
                spec.command.join(" ")
            },
            &spec.code_commit_id.as_str()[..12],
            &spec.env_commit_id.as_str()[..12],
            spec.dockerfile_path,
            spec.resources.cpus,
            spec.resources.memory_mb,
            spec.resources.gpus
        ),
        TaskEvent::Assigned {
            node_id,
            attempt,
            gpus,
            reason,
            ..
        } => {
            let devices = match gpus.as_slice() {
                [] => String::new(),
                list => format!(
                    " on GPU device(s) {}",
                    list.iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            format!(
                "{actor} assigned attempt {attempt} to {}{devices}: {reason}",
                node_label(node_id, node_name)
            )
        }
        TaskEvent::Accepted { attempt, .. } => format!("node accepted attempt {attempt}"),
        TaskEvent::Preparing {
            attempt,
            stage,
            detail,
            ..
        } => match detail {
            Some(d) => format!("attempt {attempt} preparing: {stage} ({d})"),
            None => format!("attempt {attempt} preparing: {stage}"),
        },
        TaskEvent::Started {
            attempt, container, ..
        } => format!(
            "attempt {attempt} started in container {}",
            container.chars().take(12).collect::<String>()
        ),
        TaskEvent::Succeeded { attempt, .. } => format!("attempt {attempt} succeeded (exit 0)"),
        TaskEvent::Failed {
            attempt,
            exit_code,
            reason,
            ..
        } => {
            let which = attempt.map_or("task".to_string(), |a| format!("attempt {a}"));
            match exit_code {
                Some(c) => format!("{which} failed with exit code {c}: {reason}"),
                None => format!("{which} failed: {reason}"),
            }
        }
        TaskEvent::TimedOut { attempt, by, .. } => {
            format!("attempt {attempt} timed out ({by} stopped it)")
        }
        TaskEvent::CancelRequested { by, .. } => format!("{by} asked to cancel the task"),
        TaskEvent::Cancelled { attempt, .. } => match attempt {
            Some(a) => format!("attempt {a} cancelled"),
            None => "task cancelled before it ran".to_string(),
        },
        TaskEvent::Lost {
            node_id,
            attempt,
            reason,
            ..
        } => format!(
            "attempt {attempt} lost on {}: {reason}",
            node_label(node_id, node_name)
        ),
        TaskEvent::Requeued {
            previous_attempt,
            not_before,
            at,
        } => {
            let wait = not_before
                .map(|t| (t - *at).num_seconds())
                .filter(|s| *s > 0)
                .map_or(String::new(), |s| format!(", not before {s} s from now"));
            format!(
                "task requeued for attempt {} after attempt {previous_attempt} was lost{wait}",
                previous_attempt + 1
            )
        }
        TaskEvent::ArtifactRecorded {
            attempt,
            name,
            size,
            sha256,
            ..
        } => format!(
            "attempt {attempt} stored output {name}: {size} bytes, sha256 {}",
            sha256.chars().take(12).collect::<String>()
        ),
        TaskEvent::ReportRefused {
            node_id,
            attempt,
            report,
            state,
            reason,
            ..
        } => format!(
            "{} sent a {state} report (#{report}) for attempt {attempt} that was refused for good: {reason}",
            node_label(node_id, node_name)
        ),
    }
}

/// Summarises a node event.
pub fn node(e: &NodeEvent, name: Option<&str>) -> String {
    let me = name.map_or_else(|| "node".to_string(), |n| format!("node {n}"));
    match e {
        NodeEvent::Provisioned {
            name,
            labels,
            max_resources,
            by,
            ..
        } => {
            let mut text = format!("{by} provisioned node {name}");
            if !labels.is_empty() {
                text.push_str(&format!(" with labels {}", label_list(labels)));
            }
            if !max_resources.is_unlimited() {
                text.push_str(&format!(", {}", at_most(max_resources)));
            }
            text
        }
        NodeEvent::Connected {
            agent_version,
            resources,
            ..
        } => format!(
            "{me} connected (agent {agent_version}): {} CPU, {} MiB, {} GPU",
            resources.cpus,
            resources.memory_mb,
            resources.gpus.len()
        ),
        NodeEvent::Disconnected { reason, .. } => format!("{me} disconnected: {reason}"),
        NodeEvent::MarkedOffline { last_seen, at } => format!(
            "{me} marked offline: no heartbeat for {} s",
            (*at - *last_seen).num_seconds()
        ),
        NodeEvent::Drained { by, .. } => format!("{by} drained {me}: no new tasks"),
        NodeEvent::Undrained { by, .. } => format!("{by} undrained {me}: takes tasks again"),
        NodeEvent::TokenRevoked { by, .. } => format!("{by} revoked the token of {me}"),
        NodeEvent::HostSshRequested {
            command,
            timeout_s,
            by,
            ..
        } => host_ssh_requested(command, *timeout_s, by, &me),
        NodeEvent::HostSshFinished { result, .. } => host_ssh_finished(result, &me),
        NodeEvent::LabelsSet { labels, by, .. } if labels.is_empty() => {
            format!("{by} removed every label of {me}")
        }
        NodeEvent::LabelsSet { labels, by, .. } => {
            format!("{by} set the labels of {me} to {}", label_list(labels))
        }
        NodeEvent::DeclaredLabelsAccepted { labels, by, .. } => format!(
            "{by} accepted labels declared by {me}: {}",
            label_list(labels)
        ),
        NodeEvent::LimitsSet {
            max_resources, by, ..
        } if max_resources.is_unlimited() => format!("{by} lifted the maximum of {me}"),
        NodeEvent::LimitsSet {
            max_resources, by, ..
        } => format!("{by} set the maximum of {me}: {}", at_most(max_resources)),
    }
}

/// `gpu=a100, zone=lab`.
fn label_list(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `at most 4 CPU, 1 GPU`: the dimensions that have a maximum.
fn at_most(max: &ResourceLimits) -> String {
    let mut parts = Vec::new();
    if let Some(c) = max.cpus {
        parts.push(format!("{c} CPU"));
    }
    if let Some(m) = max.memory_mb {
        parts.push(format!("{m} MiB"));
    }
    if let Some(g) = max.gpus {
        parts.push(format!("{g} GPU"));
    }
    format!("at most {}", parts.join(", "))
}

/// The longest part of a host command a summary quotes.
const SUMMARY_COMMAND_CHARS: usize = 200;

/// Summarises `NodeHostSshRequested`: who ran what, with which limit. The
/// command is quoted on one line and cut if long; the event has it whole.
fn host_ssh_requested(command: &str, timeout_s: u64, by: &Actor, me: &str) -> String {
    let one_line: String = command
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('`', "'");
    let quoted = if one_line.chars().count() > SUMMARY_COMMAND_CHARS {
        let cut: String = one_line.chars().take(SUMMARY_COMMAND_CHARS).collect();
        format!("{cut}…")
    } else {
        one_line
    };
    format!("{by} ran on the host of {me} over SSH: `{quoted}` (time limit {timeout_s} s)")
}

/// Summarises `NodeHostSshFinished`: how it ended and how much output
/// there is, never the output itself (it is in the event).
fn host_ssh_finished(result: &HostSshOutcome, me: &str) -> String {
    let took = duration(result.duration_ms);
    let mut output = format!("{} output", size(result.output.len()));
    if result.truncated {
        output.push_str(", truncated");
    }
    match (&result.error, result.exit_code, result.timed_out) {
        (_, _, true) => format!("host SSH on {me} timed out after {took}, {output}"),
        (_, Some(code), false) => {
            format!("host SSH on {me} exited {code} in {took}, {output}")
        }
        (Some(error), None, false) => format!("host SSH on {me} failed: {error}"),
        (None, None, false) => {
            format!("host SSH on {me} ended without an exit status in {took}, {output}")
        }
    }
}

/// `120 ms`, `2.5 s`.
fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// `512 B`, `2.1 KiB`.
fn size(bytes: usize) -> String {
    if bytes < 1024 {
        format!("{bytes} B")
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// Summarises a project event.
pub fn project(e: &ProjectEvent) -> String {
    match e {
        ProjectEvent::Created { name, owner, .. } => {
            format!("user:{owner} created project {name}")
        }
        ProjectEvent::Renamed { name, by, .. } => format!("{by} renamed the project to {name}"),
        ProjectEvent::MemberAdded { user, role, by, .. } => {
            format!("{by} made {user} a {role}")
        }
        ProjectEvent::MemberRemoved { user, by, .. } => format!("{by} removed {user}"),
        ProjectEvent::QuotaSet {
            max_running, by, ..
        } => match max_running {
            Some(n) => format!("{by} limited the project to {n} running tasks"),
            None => format!("{by} removed the project's running-task limit"),
        },
        ProjectEvent::SecretSet {
            name,
            version: 1,
            by,
            ..
        } => format!("{by} set secret {name}"),
        ProjectEvent::SecretSet {
            name, version, by, ..
        } => format!("{by} rotated secret {name} (version {version})"),
        ProjectEvent::SecretDeleted { name, by, .. } => format!("{by} deleted secret {name}"),
        ProjectEvent::Archived { by, .. } => format!("{by} archived the project"),
    }
}

/// Summarises a user event.
pub fn user(e: &UserEvent, name: &str) -> String {
    match e {
        UserEvent::Created {
            admin: true, by, ..
        } => format!("{by} created admin {name}"),
        UserEvent::Created { by, .. } => format!("{by} created user {name}"),
        UserEvent::TokenIssued { label, by, .. } => {
            format!("{by} issued a token for {name} ({label})")
        }
        UserEvent::TokenRevoked { token_id, by, .. } => {
            format!("{by} revoked token {} of {name}", token_id.simple())
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn finished(result: HostSshOutcome) -> String {
        node(
            &NodeEvent::HostSshFinished {
                request_id: Uuid::nil(),
                result,
                at: Utc::now(),
            },
            Some("gpu-3"),
        )
    }

    #[test]
    fn label_and_maximum_changes_say_who_set_what() {
        let admin = || Actor::User("alice".into());
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let say = |e: NodeEvent| node(&e, Some("gpu-3"));
        assert_eq!(
            say(NodeEvent::LabelsSet {
                labels: labels(&[("gpu", "a100"), ("zone", "lab")]),
                by: admin(),
                at: Utc::now(),
            }),
            "user:alice set the labels of node gpu-3 to gpu=a100, zone=lab"
        );
        assert_eq!(
            say(NodeEvent::LabelsSet {
                labels: labels(&[]),
                by: admin(),
                at: Utc::now(),
            }),
            "user:alice removed every label of node gpu-3"
        );
        assert_eq!(
            say(NodeEvent::DeclaredLabelsAccepted {
                labels: labels(&[("gpu", "a100")]),
                by: admin(),
                at: Utc::now(),
            }),
            "user:alice accepted labels declared by node gpu-3: gpu=a100"
        );
        let limits = ResourceLimits {
            cpus: Some(4.0),
            memory_mb: None,
            gpus: Some(1),
        };
        assert_eq!(
            say(NodeEvent::LimitsSet {
                max_resources: limits,
                by: admin(),
                at: Utc::now(),
            }),
            "user:alice set the maximum of node gpu-3: at most 4 CPU, 1 GPU"
        );
        assert_eq!(
            say(NodeEvent::LimitsSet {
                max_resources: ResourceLimits::default(),
                by: admin(),
                at: Utc::now(),
            }),
            "user:alice lifted the maximum of node gpu-3"
        );
        assert_eq!(
            say(NodeEvent::Provisioned {
                node_id: Uuid::nil(),
                name: domain::Name::parse("gpu-3").unwrap(),
                labels: labels(&[("gpu", "a100")]),
                token_fingerprint: "ff".into(),
                max_resources: limits,
                by: admin(),
                at: Utc::now(),
            }),
            "user:alice provisioned node gpu-3 with labels gpu=a100, at most 4 CPU, 1 GPU"
        );
    }

    #[test]
    fn a_refused_report_names_its_node_and_why_and_odd_container_ids_do_not_panic() {
        let text = task(
            &TaskEvent::ReportRefused {
                node_id: Uuid::nil(),
                attempt: 2,
                report: 9,
                state: "running".into(),
                reason: "container: holds a control character or white space at byte 3".into(),
                at: Utc::now(),
            },
            "node:x",
            Some("gpu-3"),
        );
        assert_eq!(
            text,
            "node gpu-3 sent a running report (#9) for attempt 2 that was refused for good: \
             container: holds a control character or white space at byte 3"
        );
        let text = task(
            &TaskEvent::Started {
                attempt: 1,
                container: "abcdefghijk€€".into(),
                at: Utc::now(),
            },
            "node:x",
            None,
        );
        assert_eq!(text, "attempt 1 started in container abcdefghijk€");
    }

    #[test]
    fn a_host_ssh_request_names_who_ran_what() {
        let text = node(
            &NodeEvent::HostSshRequested {
                request_id: Uuid::nil(),
                command: "nvidia-smi\n  -L".into(),
                timeout_s: 30,
                by: Actor::User("alice".into()),
                at: Utc::now(),
            },
            Some("gpu-3"),
        );
        assert_eq!(
            text,
            "user:alice ran on the host of node gpu-3 over SSH: `nvidia-smi -L` (time limit 30 s)"
        );
    }

    #[test]
    fn a_host_ssh_result_says_how_it_ended_but_not_what_it_printed() {
        let text = finished(HostSshOutcome {
            exit_code: Some(0),
            output: "secret-ish host detail ".repeat(100),
            duration_ms: 120,
            ..HostSshOutcome::default()
        });
        assert_eq!(
            text,
            "host SSH on node gpu-3 exited 0 in 120 ms, 2.2 KiB output"
        );
        let text = finished(HostSshOutcome {
            timed_out: true,
            truncated: true,
            output: "x".repeat(65536),
            duration_ms: 5003,
            ..HostSshOutcome::default()
        });
        assert_eq!(
            text,
            "host SSH on node gpu-3 timed out after 5.0 s, 64.0 KiB output, truncated"
        );
        let text = finished(HostSshOutcome {
            error: Some("no answer from the node within 45 s".into()),
            ..HostSshOutcome::default()
        });
        assert_eq!(
            text,
            "host SSH on node gpu-3 failed: no answer from the node within 45 s"
        );
    }
}
