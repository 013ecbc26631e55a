//! Where queued tasks go: a pure function of the queue, the nodes and what
//! they already hold, so its rules are tested without a database.
//!
//! Rules: a task goes only to an online, undrained node whose labels (the
//! ones an admin set, never the agent's own) include all of the task's and
//! whose free CPU, memory and GPUs (what it declared, at most its maximum,
//! minus what tasks holding the node reserve) fit it; never past its project's
//! `max_running`. Higher priority first; within a priority, projects take
//! turns (round robin) and each project's oldest task goes first. Among
//! fitting nodes, one that already holds the task's image, then its code
//! commit, wins; then the least loaded.
//!
//! GPUs are devices, not a count: a placement names the node's device
//! indices the attempt gets (the lowest free ones), and a device held by an
//! attempt is never handed to another until that attempt lets the node go.
//!
//! A node may hold more than it has: its maximum was lowered, or its agent
//! came back declaring less, while tasks ran. Nothing is stopped; the node
//! takes no new task needing a resource it holds too much of until that
//! fits again (every task needs CPU and memory; a GPU device held outside
//! the node's current devices still counts against their number).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use uuid::Uuid;

/// A queued task as the placer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    /// The task.
    pub id: Uuid,
    /// Its project.
    pub project: Uuid,
    /// Its priority.
    pub priority: i32,
    /// Its CPU in thousandths.
    pub millicpus: u64,
    /// Its memory in MiB.
    pub memory_mb: u64,
    /// Its GPUs.
    pub gpus: u32,
    /// Labels a node must have.
    pub labels: BTreeMap<String, String>,
    /// The image tag its environment builds to.
    pub image: String,
    /// Its code commit.
    pub code_commit: String,
}

/// A node that can take work, with what it has left.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The node.
    pub id: Uuid,
    /// Its name, for the reason text.
    pub name: String,
    /// Its labels, as an admin set them.
    pub labels: BTreeMap<String, String>,
    /// CPU in thousandths it may be given: declared, at most its maximum.
    pub millicpus: u64,
    /// Memory in MiB it may be given.
    pub memory_mb: u64,
    /// GPU device indices it may be given.
    pub gpus: BTreeSet<u32>,
    /// CPU reserved by tasks holding it.
    pub used_millicpus: u64,
    /// Memory reserved.
    pub used_memory_mb: u64,
    /// GPU device indices held by attempts on it.
    pub used_gpus: BTreeSet<u32>,
    /// Image tags it holds.
    pub images: HashSet<String>,
    /// Commits it holds.
    pub commits: HashSet<String>,
}

/// The first rule a node breaks for a task, in the order they are checked:
/// what keeps the task off that node. Placement and the queue's
/// explanation ([`super::explain`]) both decide by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misfit<'a> {
    /// The node lacks the task's label `key=value`.
    Label(&'a str, &'a str),
    /// Its free CPU is less than the task needs.
    Cpu,
    /// Its free memory is less than the task needs.
    Memory,
    /// It has fewer free GPUs than the task needs.
    Gpus,
}

impl Candidate {
    fn fits(&self, t: &Queued) -> bool {
        self.misfit(t).is_none()
    }

    /// The first rule of placement this node breaks for `t`, or `None`
    /// when `t` fits it.
    pub fn misfit<'t>(&self, t: &'t Queued) -> Option<Misfit<'t>> {
        if let Some((k, v)) = t
            .labels
            .iter()
            .find(|(k, v)| self.labels.get(*k) != Some(v))
        {
            Some(Misfit::Label(k, v))
        } else if self.used_millicpus + t.millicpus > self.millicpus {
            Some(Misfit::Cpu)
        } else if self.used_memory_mb + t.memory_mb > self.memory_mb {
            Some(Misfit::Memory)
        } else if self.free_gpus().count() < t.gpus as usize {
            Some(Misfit::Gpus)
        } else {
            None
        }
    }

    /// Free CPU in thousandths, free memory in MiB and free GPUs.
    pub fn free(&self) -> (u64, u64, u32) {
        (
            self.millicpus.saturating_sub(self.used_millicpus),
            self.memory_mb.saturating_sub(self.used_memory_mb),
            self.free_gpus().count() as u32,
        )
    }

    /// Devices no attempt holds, lowest index first, and no more than
    /// the node's number of devices minus those held (some held devices
    /// may be outside its current set).
    fn free_gpus(&self) -> impl Iterator<Item = u32> + '_ {
        let room = self.gpus.len().saturating_sub(self.used_gpus.len());
        self.gpus.difference(&self.used_gpus).copied().take(room)
    }

    /// Counts resources held by an attempt already on the node, `devices`
    /// being the GPU indices it was given.
    pub fn hold(&mut self, millicpus: u64, memory_mb: u64, devices: &[u32]) {
        self.used_millicpus += millicpus;
        self.used_memory_mb += memory_mb;
        self.used_gpus.extend(devices.iter().copied());
    }

    /// The larger of its CPU and memory use, as a fraction.
    fn load(&self) -> f64 {
        let cpu = self.used_millicpus as f64 / self.millicpus.max(1) as f64;
        let mem = self.used_memory_mb as f64 / self.memory_mb.max(1) as f64;
        cpu.max(mem)
    }

    /// Reserves what `t` needs and returns the GPU devices it gets.
    fn reserve(&mut self, t: &Queued) -> Vec<u32> {
        let devices: Vec<u32> = self.free_gpus().take(t.gpus as usize).collect();
        self.hold(t.millicpus, t.memory_mb, &devices);
        devices
    }
}

/// One decision: put `task` on `node`, because `reason`.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// The task.
    pub task: Uuid,
    /// The node.
    pub node: Uuid,
    /// The node's GPU device indices the attempt gets.
    pub gpus: Vec<u32>,
    /// Why, for the timeline.
    pub reason: String,
}

/// Places as many of `queue` as fit. `running` counts each project's tasks
/// holding nodes; `quota` holds the projects' limits. Both `nodes` and
/// `running` are updated with the placements made.
pub fn place(
    queue: Vec<Queued>,
    nodes: &mut [Candidate],
    running: &mut HashMap<Uuid, u32>,
    quota: &HashMap<Uuid, u32>,
) -> Vec<Placement> {
    // Per priority level (highest first), per project, oldest first: the
    // queue arrives sorted by (priority desc, age), so order is kept.
    let mut levels: BTreeMap<std::cmp::Reverse<i32>, Vec<(Uuid, VecDeque<Queued>)>> =
        BTreeMap::new();
    for t in queue {
        let level = levels.entry(std::cmp::Reverse(t.priority)).or_default();
        match level.iter_mut().find(|(p, _)| *p == t.project) {
            Some((_, q)) => q.push_back(t),
            None => level.push((t.project, VecDeque::from([t]))),
        }
    }
    let mut out = Vec::new();
    for (_, mut projects) in levels {
        // Round robin: each turn, every project with work left places its
        // oldest task that fits somewhere.
        while !projects.is_empty() {
            let mut next = Vec::with_capacity(projects.len());
            for (project, mut q) in projects {
                let limit = quota.get(&project).copied();
                let used = running.get(&project).copied().unwrap_or(0);
                if limit.is_some_and(|l| used >= l) {
                    continue;
                }
                // The project's first task that fits any node.
                let Some(pos) = q.iter().position(|t| nodes.iter().any(|n| n.fits(t))) else {
                    continue;
                };
                let t = q
                    .remove(pos)
                    .unwrap_or_else(|| unreachable!("position is in range"));
                let candidates = nodes.iter().filter(|n| n.fits(&t)).count();
                let best = nodes
                    .iter_mut()
                    .filter(|n| n.fits(&t))
                    .min_by(|a, b| {
                        let key = |n: &Candidate| {
                            (
                                !n.images.contains(&t.image),
                                !n.commits.contains(&t.code_commit),
                            )
                        };
                        key(a)
                            .cmp(&key(b))
                            .then(a.load().total_cmp(&b.load()))
                            .then(a.name.cmp(&b.name))
                    })
                    .unwrap_or_else(|| unreachable!("a node fits"));
                let reason = reason(best, &t, candidates);
                let gpus = best.reserve(&t);
                out.push(Placement {
                    task: t.id,
                    node: best.id,
                    gpus,
                    reason,
                });
                *running.entry(project).or_default() += 1;
                if !q.is_empty() {
                    next.push((project, q));
                }
            }
            projects = next;
        }
    }
    out
}

fn reason(n: &Candidate, t: &Queued, candidates: usize) -> String {
    let mut r = format!(
        "{:.1} CPU, {} MiB, {} GPU free of {:.1} CPU, {} MiB, {} GPU",
        n.millicpus.saturating_sub(n.used_millicpus) as f64 / 1000.0,
        n.memory_mb.saturating_sub(n.used_memory_mb),
        n.free_gpus().count(),
        n.millicpus as f64 / 1000.0,
        n.memory_mb,
        n.gpus.len()
    );
    if n.images.contains(&t.image) {
        r.push_str(", image cached");
    }
    if n.commits.contains(&t.code_commit) {
        r.push_str(", code cached");
    }
    if candidates > 1 {
        r.push_str(&format!(", best of {candidates} fitting nodes"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(n: u128, project: u128, priority: i32, cpus: u64) -> Queued {
        Queued {
            id: Uuid::from_u128(n),
            project: Uuid::from_u128(project),
            priority,
            millicpus: cpus * 1000,
            memory_mb: 100,
            gpus: 0,
            labels: BTreeMap::new(),
            image: "img".into(),
            code_commit: "c".into(),
        }
    }

    fn node(n: u128, cpus: u64) -> Candidate {
        Candidate {
            id: Uuid::from_u128(1000 + n),
            name: format!("n{n}"),
            labels: BTreeMap::new(),
            millicpus: cpus * 1000,
            memory_mb: 10_000,
            gpus: BTreeSet::new(),
            used_millicpus: 0,
            used_memory_mb: 0,
            used_gpus: BTreeSet::new(),
            images: HashSet::new(),
            commits: HashSet::new(),
        }
    }

    fn placed(p: &[Placement]) -> Vec<u128> {
        p.iter().map(|p| p.task.as_u128()).collect()
    }

    #[test]
    fn never_beyond_a_nodes_free_resources() {
        let mut nodes = vec![node(1, 4)];
        nodes[0].used_millicpus = 1000;
        let queue = vec![task(1, 1, 0, 2), task(2, 1, 0, 2), task(3, 1, 0, 1)];
        let p = place(queue, &mut nodes, &mut HashMap::new(), &HashMap::new());
        assert_eq!(placed(&p), [1, 3]);
        assert_eq!(nodes[0].used_millicpus, 4000);
    }

    #[test]
    fn never_to_a_node_lacking_the_tasks_labels() {
        let mut gpu = node(1, 8);
        gpu.labels.insert("gpu".into(), "a100".into());
        let mut nodes = vec![node(2, 8), gpu];
        let mut t = task(1, 1, 0, 1);
        t.labels.insert("gpu".into(), "a100".into());
        let mut other = task(2, 1, 0, 1);
        other.labels.insert("gpu".into(), "h100".into());
        let p = place(
            vec![t, other],
            &mut nodes,
            &mut HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].node, Uuid::from_u128(1001));
    }

    fn gpu_task(n: u128, gpus: u32) -> Queued {
        Queued {
            gpus,
            ..task(n, 1, 0, 1)
        }
    }

    #[test]
    fn gpu_devices_are_never_handed_out_twice() {
        let mut n = node(1, 64);
        n.gpus = BTreeSet::from([0, 1, 2, 3]);
        // Device 1 is held by an attempt already running there.
        n.hold(1000, 100, &[1]);
        let mut nodes = vec![n];
        let queue = vec![gpu_task(1, 2), gpu_task(2, 1), gpu_task(3, 1)];
        let p = place(queue, &mut nodes, &mut HashMap::new(), &HashMap::new());
        assert_eq!(placed(&p), [1, 2]);
        assert_eq!(p[0].gpus, [0, 2]);
        assert_eq!(p[1].gpus, [3]);
        assert!(p[0].reason.contains("3 GPU free of"), "{}", p[0].reason);
        assert_eq!(nodes[0].used_gpus, BTreeSet::from([0, 1, 2, 3]));
        // Task 3 waits until a device is let go.
        nodes[0].used_gpus.remove(&2);
        let p = place(
            vec![gpu_task(3, 1)],
            &mut nodes,
            &mut HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(p[0].gpus, [2]);
    }

    #[test]
    fn a_task_without_gpus_gets_no_devices() {
        let mut n = node(1, 64);
        n.gpus = BTreeSet::from([0]);
        let mut nodes = vec![n];
        let p = place(
            vec![gpu_task(1, 0)],
            &mut nodes,
            &mut HashMap::new(),
            &HashMap::new(),
        );
        assert!(p[0].gpus.is_empty());
        assert!(nodes[0].used_gpus.is_empty());
    }

    #[test]
    fn never_past_a_projects_max_running() {
        let mut nodes = vec![node(1, 64)];
        let project = Uuid::from_u128(1);
        let mut running = HashMap::from([(project, 1)]);
        let quota = HashMap::from([(project, 2)]);
        let queue = vec![task(1, 1, 0, 1), task(2, 1, 0, 1), task(3, 2, 0, 1)];
        let p = place(queue, &mut nodes, &mut running, &quota);
        assert_eq!(placed(&p), [1, 3]);
        assert_eq!(running[&project], 2);
    }

    #[test]
    fn projects_take_turns_within_a_priority_and_priority_goes_first() {
        let mut nodes = vec![node(1, 5)];
        let queue = vec![
            task(9, 3, 10, 1),
            task(1, 1, 0, 1),
            task(2, 1, 0, 1),
            task(3, 1, 0, 1),
            task(4, 2, 0, 1),
            task(5, 2, 0, 1),
        ];
        let p = place(queue, &mut nodes, &mut HashMap::new(), &HashMap::new());
        assert_eq!(placed(&p), [9, 1, 4, 2, 5]);
    }

    #[test]
    fn a_node_holding_the_image_wins_then_the_least_loaded() {
        let mut busy = node(1, 8);
        busy.used_millicpus = 4000;
        let idle = node(2, 8);
        let mut cached = node(3, 8);
        cached.used_millicpus = 6000;
        cached.images.insert("img".into());
        let mut nodes = vec![busy, idle, cached];
        let p = place(
            vec![task(1, 1, 0, 1)],
            &mut nodes,
            &mut HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(p[0].node, Uuid::from_u128(1003));
        assert!(p[0].reason.contains("image cached"), "{}", p[0].reason);
        nodes[2].images.clear();
        let p = place(
            vec![task(2, 1, 0, 1)],
            &mut nodes,
            &mut HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(p[0].node, Uuid::from_u128(1002));
    }

    #[test]
    fn a_node_holding_more_cpu_than_its_lowered_maximum_takes_nothing_until_it_fits() {
        // Its maximum went from 4 CPUs to 2 while a 3-CPU task ran.
        let mut n = node(1, 2);
        n.hold(3000, 100, &[]);
        let mut nodes = vec![n];
        let p = place(
            vec![task(1, 1, 0, 1)],
            &mut nodes,
            &mut HashMap::new(),
            &HashMap::new(),
        );
        assert!(p.is_empty(), "{p:?}");
        // Once the task ends, the node takes work within its maximum.
        nodes[0].used_millicpus = 0;
        let p = place(
            vec![task(2, 1, 0, 3), task(3, 1, 0, 2)],
            &mut nodes,
            &mut HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(placed(&p), [3]);
    }

    #[test]
    fn a_device_held_outside_a_lowered_gpu_maximum_still_counts() {
        // Devices {0, 1, 2} became {0} while an attempt held device 2: the
        // node has room for no more GPUs, though device 0 is idle, but
        // still for work without GPUs.
        let mut n = node(1, 8);
        n.gpus = BTreeSet::from([0]);
        n.hold(1000, 100, &[2]);
        let mut nodes = vec![n];
        let p = place(
            vec![gpu_task(1, 1), gpu_task(2, 0)],
            &mut nodes,
            &mut HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(placed(&p), [2]);
        nodes[0].used_gpus.clear();
        let p = place(
            vec![gpu_task(1, 1)],
            &mut nodes,
            &mut HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(p[0].gpus, [0]);
    }

    #[test]
    fn a_task_too_big_for_every_node_waits_without_blocking_others() {
        let mut nodes = vec![node(1, 4)];
        let p = place(
            vec![task(1, 1, 0, 8), task(2, 1, 0, 1)],
            &mut nodes,
            &mut HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(placed(&p), [2]);
    }
}
