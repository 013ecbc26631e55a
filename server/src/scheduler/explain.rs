//! Why queued tasks wait: a pure function of the queue and the cluster as
//! a round left it, deciding by placement's own rules
//! ([`Candidate::misfit`]), so an explanation cannot disagree with what
//! placement does.
//!
//! A task that fits no node is explained by counting every node once,
//! under the first rule it breaks: offline (or never connected), drained,
//! a missing label, then too little free CPU, memory or GPUs, with what
//! the task needs and the most any of those nodes has free. One that fits
//! a node now but did not before the last tasks were placed lost its room
//! to them; one that fits and is not held by its project's `max_running`
//! or a retry backoff simply waits for its turn.
//!
//! Tasks of one shape (labels and resources) share the nodes' verdict, so
//! explaining a long queue costs about as much as its distinct shapes.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use store::queue_reasons::{Explanation, Reason};
use uuid::Uuid;

use super::placement::{Candidate, Misfit, Queued};

/// A queued task to explain.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// The task as placement sees it.
    pub task: Queued,
    /// The attempt it waits after: 0 before its first.
    pub attempt: u32,
    /// The end of its retry backoff, if it has one.
    pub not_before: Option<DateTime<Utc>>,
}

/// A node placement does not consider.
#[derive(Debug, Clone, PartialEq)]
pub struct Unavailable {
    /// Offline or never connected; otherwise online but drained.
    pub offline: bool,
    /// Its labels, as an admin set them.
    pub labels: BTreeMap<String, String>,
}

/// The cluster as a round left it.
#[derive(Debug, Clone, Copy)]
pub struct Cluster<'a> {
    /// The nodes placement considers, with what they hold now.
    pub nodes: &'a [Candidate],
    /// The same nodes without the tasks placed since the last explanation,
    /// when any were: a task fitting them lost its room to those tasks.
    pub before: Option<&'a [Candidate]>,
    /// The nodes placement does not consider.
    pub unavailable: &'a [Unavailable],
    /// Each project's tasks holding nodes.
    pub running: &'a HashMap<Uuid, u32>,
    /// The projects' `max_running`.
    pub quota: &'a HashMap<Uuid, u32>,
}

/// The explanation of each task of `queue` as of `now`, with the attempt
/// it waits after, in the queue's order.
pub fn explain(
    queue: &[Waiting],
    cluster: &Cluster<'_>,
    now: DateTime<Utc>,
) -> Vec<(Uuid, u32, Explanation)> {
    type Shape<'q> = (&'q BTreeMap<String, String>, u64, u64, u32);
    let mut verdicts: HashMap<Shape<'_>, Option<Held>> = HashMap::new();
    queue
        .iter()
        .map(|w| {
            let t = &w.task;
            let shape = (&t.labels, t.millicpus, t.memory_mb, t.gpus);
            let held = verdicts
                .entry(shape)
                .or_insert_with(|| held_by_nodes(t, cluster));
            let mut reasons = Vec::new();
            let mut sentences = Vec::new();
            if let Some(until) = w.not_before.filter(|u| *u > now) {
                reasons.push(Reason::Backoff { until });
                sentences.push(format!(
                    "retry backoff ends at {}",
                    until.format("%Y-%m-%d %H:%M:%S UTC")
                ));
            }
            if let Some(&max_running) = cluster.quota.get(&t.project) {
                let running = cluster.running.get(&t.project).copied().unwrap_or(0);
                if running >= max_running {
                    reasons.push(Reason::Quota {
                        max_running,
                        running,
                    });
                    sentences.push(format!(
                        "the project is at its max_running: {running} of {max_running} running"
                    ));
                }
            }
            match held {
                Some(h) => {
                    reasons.extend(h.reasons.iter().cloned());
                    sentences.push(h.sentence.clone());
                }
                None if reasons.is_empty() => {
                    reasons.push(Reason::InLine);
                    sentences.push("it fits a node and waits for its turn".into());
                }
                None => {}
            }
            let explanation = Explanation {
                summary: sentences.join("; "),
                reasons,
            };
            (t.id, w.attempt, explanation)
        })
        .collect()
}

/// What keeps a task off every node, in data and in words.
#[derive(Debug, Clone)]
struct Held {
    reasons: Vec<Reason>,
    sentence: String,
}

/// Why no node takes `t`, or `None` when one does.
fn held_by_nodes(t: &Queued, cluster: &Cluster<'_>) -> Option<Held> {
    let funnel = Funnel::of(t, cluster)?;
    let mut held = funnel.held(t);
    if let Some(before) = cluster.before {
        if before.iter().any(|n| n.misfit(t).is_none()) {
            held.reasons.insert(0, Reason::Taken);
            held.sentence = format!(
                "the room it fitted went to tasks placed ahead of it: {}",
                held.sentence
            );
        }
    }
    Some(held)
}

/// Nodes that break one resource rule first, and the best of them.
#[derive(Debug, Default, Clone, Copy)]
struct Short {
    nodes: u32,
    most_free: u64,
    largest: u64,
}

impl Short {
    fn add(&mut self, free: u64, total: u64) {
        self.nodes += 1;
        self.most_free = self.most_free.max(free);
        self.largest = self.largest.max(total);
    }
}

/// Every node counted once, under the first rule it breaks for a task.
#[derive(Debug, Default)]
struct Funnel<'t> {
    total: u32,
    /// Offline nodes, and how many of them carry the task's labels.
    offline: (u32, u32),
    /// Drained nodes, likewise.
    drained: (u32, u32),
    labels: BTreeMap<(&'t str, &'t str), u32>,
    cpu: Short,
    memory: Short,
    gpus: Short,
}

impl<'t> Funnel<'t> {
    /// The funnel of `t`, or `None` when a node takes it.
    fn of(t: &'t Queued, cluster: &Cluster<'_>) -> Option<Self> {
        let mut f = Funnel {
            total: (cluster.nodes.len() + cluster.unavailable.len()) as u32,
            ..Funnel::default()
        };
        for u in cluster.unavailable {
            let with = u32::from(t.labels.iter().all(|(k, v)| u.labels.get(k) == Some(v)));
            let count = if u.offline {
                &mut f.offline
            } else {
                &mut f.drained
            };
            count.0 += 1;
            count.1 += with;
        }
        for n in cluster.nodes {
            let (cpu, memory, gpus) = n.free();
            match n.misfit(t)? {
                Misfit::Label(k, v) => *f.labels.entry((k, v)).or_default() += 1,
                Misfit::Cpu => f.cpu.add(cpu, n.millicpus),
                Misfit::Memory => f.memory.add(memory, n.memory_mb),
                Misfit::Gpus => f.gpus.add(u64::from(gpus), n.gpus.len() as u64),
            }
        }
        Some(f)
    }

    /// The funnel as reasons and a sentence.
    fn held(&self, t: &Queued) -> Held {
        if self.total == 0 {
            return Held {
                reasons: vec![Reason::NoNodes],
                sentence: "no node has joined".into(),
            };
        }
        let mut reasons = Vec::new();
        let mut parts = Vec::new();
        let labels = t
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let label_word = if t.labels.len() == 1 {
            "label"
        } else {
            "labels"
        };
        for (kind, (n, with)) in [("offline", self.offline), ("drained", self.drained)] {
            if n == 0 {
                continue;
            }
            let mut part = format!("{n} {kind}");
            if !t.labels.is_empty() && with > 0 {
                part.push_str(&format!(" ({with} with the {label_word})"));
            }
            parts.push(part);
            reasons.push(if kind == "offline" {
                Reason::Offline {
                    nodes_filtered: n,
                    with_labels: with,
                }
            } else {
                Reason::Drained {
                    nodes_filtered: n,
                    with_labels: with,
                }
            });
        }
        for (&(k, v), &n) in &self.labels {
            parts.push(format!("{n} {} label {k}={v}", lack(n)));
            reasons.push(Reason::Label {
                label: format!("{k}={v}"),
                nodes_filtered: n,
            });
        }
        let mut shortages = Vec::new();
        if self.cpu.nodes > 0 {
            let c = self.cpu;
            let cores = |m: u64| m as f64 / 1000.0;
            reasons.push(Reason::Cpu {
                nodes_filtered: c.nodes,
                need: cores(t.millicpus),
                most_free: cores(c.most_free),
                largest: cores(c.largest),
            });
            shortages.push(shortage(c, "CPU", t.millicpus, |m| format!("{}", cores(m))));
        }
        if self.memory.nodes > 0 {
            let m = self.memory;
            reasons.push(Reason::Memory {
                nodes_filtered: m.nodes,
                need_mb: t.memory_mb,
                most_free_mb: m.most_free,
                largest_mb: m.largest,
            });
            shortages.push(shortage(m, "memory", t.memory_mb, |b| format!("{b} MiB")));
        }
        if self.gpus.nodes > 0 {
            let g = self.gpus;
            reasons.push(Reason::Gpus {
                nodes_filtered: g.nodes,
                need: t.gpus,
                most_free: g.most_free as u32,
                largest: g.largest as u32,
            });
            shortages.push(shortage(g, "GPUs", u64::from(t.gpus), |n| n.to_string()));
        }
        for (short, what) in [
            (self.cpu, "CPU"),
            (self.memory, "memory"),
            (self.gpus, "GPUs"),
        ] {
            if short.nodes > 0 {
                parts.push(format!("{} {} free {what}", short.nodes, lack(short.nodes)));
            }
        }
        let main = if shortages.is_empty() && self.labels.is_empty() {
            "no node is online and undrained".to_string()
        } else if shortages.is_empty() {
            format!("no online node carries {label_word} {labels}")
        } else {
            let with = if t.labels.is_empty() {
                String::new()
            } else {
                format!(" with {label_word} {labels}")
            };
            shortages
                .iter()
                .map(|(n, s)| format!("{n} node{}{with} {s}", plural(*n)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let sentence = format!(
            "{main} (of {} node{}: {})",
            self.total,
            plural(self.total),
            parts.join(", ")
        );
        Held { reasons, sentence }
    }
}

/// How many nodes lack `what`, and the words: `lack free GPUs: need 2,
/// most free 1`.
fn shortage(s: Short, what: &str, need: u64, show: impl Fn(u64) -> String) -> (u32, String) {
    let mut words = format!(
        "{} free {what}: need {}, most free {}",
        lack(s.nodes),
        show(need),
        show(s.most_free)
    );
    if s.largest < need {
        words.push_str(&format!(" (none of them has {} at all)", show(need)));
    }
    (s.nodes, words)
}

fn lack(n: u32) -> &'static str {
    if n == 1 {
        "lacks"
    } else {
        "lack"
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use super::*;

    fn task(labels: &[(&str, &str)], cpus: u64, gpus: u32) -> Queued {
        Queued {
            id: Uuid::from_u128(1),
            project: Uuid::from_u128(100),
            priority: 0,
            millicpus: cpus * 1000,
            memory_mb: 1024,
            gpus,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            image: "img".into(),
            code_commit: "c".into(),
        }
    }

    fn node(n: u128, labels: &[(&str, &str)], cpus: u64, gpus: u32) -> Candidate {
        Candidate {
            id: Uuid::from_u128(1000 + n),
            name: format!("n{n}"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            millicpus: cpus * 1000,
            memory_mb: 16_384,
            gpus: (0..gpus).collect::<BTreeSet<_>>(),
            used_millicpus: 0,
            used_memory_mb: 0,
            used_gpus: BTreeSet::new(),
            images: HashSet::new(),
            commits: HashSet::new(),
        }
    }

    fn offline(labels: &[(&str, &str)]) -> Unavailable {
        Unavailable {
            offline: true,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).expect("a valid time")
    }

    /// The explanation of `t` alone.
    fn explain_one(t: Queued, nodes: &[Candidate], unavailable: &[Unavailable]) -> Explanation {
        let none = HashMap::new();
        let cluster = Cluster {
            nodes,
            before: None,
            unavailable,
            running: &none,
            quota: &none,
        };
        let queue = [Waiting {
            task: t,
            attempt: 0,
            not_before: None,
        }];
        explain(&queue, &cluster, now()).remove(0).2
    }

    #[test]
    fn a_missing_label_is_named_with_how_many_nodes_lack_it() {
        let nodes = [node(1, &[], 8, 0), node(2, &[("gpu", "h100")], 8, 4)];
        let e = explain_one(
            task(&[("gpu", "a100")], 1, 0),
            &nodes,
            &[offline(&[("gpu", "a100")]), offline(&[])],
        );
        assert_eq!(
            e.reasons,
            [
                Reason::Offline {
                    nodes_filtered: 2,
                    with_labels: 1
                },
                Reason::Label {
                    label: "gpu=a100".into(),
                    nodes_filtered: 2
                },
            ]
        );
        assert_eq!(
            e.summary,
            "no online node carries label gpu=a100 \
             (of 4 nodes: 2 offline (1 with the label), 2 lack label gpu=a100)"
        );
    }

    #[test]
    fn nodes_with_the_label_but_too_few_free_gpus_say_need_and_most_free() {
        let mut busy = node(1, &[("gpu", "a100")], 8, 4);
        busy.hold(1000, 100, &[0, 1, 2]);
        let nodes = [busy, node(2, &[], 8, 8)];
        let e = explain_one(task(&[("gpu", "a100")], 1, 2), &nodes, &[]);
        assert_eq!(
            e.reasons,
            [
                Reason::Label {
                    label: "gpu=a100".into(),
                    nodes_filtered: 1
                },
                Reason::Gpus {
                    nodes_filtered: 1,
                    need: 2,
                    most_free: 1,
                    largest: 4
                },
            ]
        );
        assert_eq!(
            e.summary,
            "1 node with label gpu=a100 lacks free GPUs: need 2, most free 1 \
             (of 2 nodes: 1 lacks label gpu=a100, 1 lacks free GPUs)"
        );
    }

    #[test]
    fn cpu_and_memory_shortages_are_counted_apart() {
        let mut small = node(1, &[], 2, 0);
        small.memory_mb = 512;
        let mut full = node(2, &[], 16, 0);
        full.hold(14_000, 0, &[]);
        let nodes = [small, full, node(3, &[], 8, 0)];
        let mut t = task(&[], 4, 0);
        t.memory_mb = 20_000;
        let e = explain_one(t, &nodes, &[]);
        assert_eq!(
            e.reasons,
            [
                Reason::Cpu {
                    nodes_filtered: 2,
                    need: 4.0,
                    most_free: 2.0,
                    largest: 16.0
                },
                Reason::Memory {
                    nodes_filtered: 1,
                    need_mb: 20_000,
                    most_free_mb: 16_384,
                    largest_mb: 16_384
                },
            ]
        );
        assert_eq!(
            e.summary,
            "2 nodes lack free CPU: need 4, most free 2; \
             1 node lacks free memory: need 20000 MiB, most free 16384 MiB \
             (none of them has 20000 MiB at all) \
             (of 3 nodes: 2 lack free CPU, 1 lacks free memory)"
        );
    }

    #[test]
    fn no_nodes_at_all_and_no_usable_node_are_told_apart() {
        let e = explain_one(task(&[], 1, 0), &[], &[]);
        assert_eq!(e.reasons, [Reason::NoNodes]);
        assert_eq!(e.summary, "no node has joined");
        let drained = Unavailable {
            offline: false,
            labels: BTreeMap::new(),
        };
        let e = explain_one(task(&[], 1, 0), &[], &[drained, offline(&[])]);
        assert_eq!(
            e.reasons,
            [
                Reason::Offline {
                    nodes_filtered: 1,
                    with_labels: 1
                },
                Reason::Drained {
                    nodes_filtered: 1,
                    with_labels: 1
                },
            ]
        );
        assert_eq!(
            e.summary,
            "no node is online and undrained (of 2 nodes: 1 offline, 1 drained)"
        );
    }

    #[test]
    fn a_project_at_its_max_running_says_so_even_when_a_node_fits() {
        let nodes = [node(1, &[], 8, 0)];
        let running = HashMap::from([(Uuid::from_u128(100), 2)]);
        let quota = HashMap::from([(Uuid::from_u128(100), 2)]);
        let cluster = Cluster {
            nodes: &nodes,
            before: None,
            unavailable: &[],
            running: &running,
            quota: &quota,
        };
        let queue = [Waiting {
            task: task(&[], 1, 0),
            attempt: 0,
            not_before: None,
        }];
        let e = explain(&queue, &cluster, now()).remove(0).2;
        assert_eq!(
            e.reasons,
            [Reason::Quota {
                max_running: 2,
                running: 2
            }]
        );
        assert_eq!(
            e.summary,
            "the project is at its max_running: 2 of 2 running"
        );
    }

    #[test]
    fn a_retry_backoff_says_when_it_ends_and_an_ended_one_says_nothing() {
        let nodes = [node(1, &[], 8, 0)];
        let none = HashMap::new();
        let cluster = Cluster {
            nodes: &nodes,
            before: None,
            unavailable: &[],
            running: &none,
            quota: &none,
        };
        let until = now() + chrono::Duration::seconds(30);
        let queue = [
            Waiting {
                task: task(&[], 1, 0),
                attempt: 1,
                not_before: Some(until),
            },
            Waiting {
                task: Queued {
                    id: Uuid::from_u128(2),
                    ..task(&[], 1, 0)
                },
                attempt: 1,
                not_before: Some(now()),
            },
        ];
        let out = explain(&queue, &cluster, now());
        assert_eq!(out[0].1, 1, "the attempt it waits after");
        assert_eq!(out[0].2.reasons, [Reason::Backoff { until }]);
        assert_eq!(
            out[0].2.summary,
            "retry backoff ends at 2023-11-14 22:13:50 UTC"
        );
        assert_eq!(out[1].2.reasons, [Reason::InLine]);
        assert_eq!(out[1].2.summary, "it fits a node and waits for its turn");
    }

    #[test]
    fn a_task_whose_room_went_to_tasks_placed_ahead_of_it_says_so() {
        let free = node(1, &[("gpu", "a100")], 8, 2);
        let mut taken = free.clone();
        taken.hold(1000, 100, &[0, 1]);
        let none = HashMap::new();
        let cluster = Cluster {
            nodes: std::slice::from_ref(&taken),
            before: Some(std::slice::from_ref(&free)),
            unavailable: &[],
            running: &none,
            quota: &none,
        };
        let queue = [Waiting {
            task: task(&[("gpu", "a100")], 1, 1),
            attempt: 0,
            not_before: None,
        }];
        let e = explain(&queue, &cluster, now()).remove(0).2;
        assert_eq!(
            e.reasons,
            [
                Reason::Taken,
                Reason::Gpus {
                    nodes_filtered: 1,
                    need: 1,
                    most_free: 0,
                    largest: 2
                }
            ]
        );
        assert!(
            e.summary
                .starts_with("the room it fitted went to tasks placed ahead of it: 1 node"),
            "{}",
            e.summary
        );
    }

    #[test]
    fn the_explanation_agrees_with_placement() {
        // Whatever the cluster, a task placement would place is never
        // explained as held by the nodes, and one it would not place is.
        let mut gpu = node(1, &[("gpu", "a100")], 4, 2);
        gpu.hold(3000, 0, &[0]);
        let nodes = vec![gpu, node(2, &[], 2, 0)];
        let shapes = [
            task(&[("gpu", "a100")], 1, 1),
            task(&[("gpu", "a100")], 2, 1),
            task(&[("gpu", "a100")], 1, 2),
            task(&[], 2, 0),
            task(&[], 3, 0),
            task(&[("zone", "x")], 1, 0),
        ];
        for t in shapes {
            let placed = !super::super::placement::place(
                vec![t.clone()],
                &mut nodes.clone(),
                &mut HashMap::new(),
                &HashMap::new(),
            )
            .is_empty();
            let e = explain_one(t.clone(), &nodes, &[]);
            assert_eq!(e.reasons == [Reason::InLine], placed, "{t:?}: {e:?}");
        }
    }
}
