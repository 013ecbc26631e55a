//! What this machine offers: CPUs, memory and GPUs.
//!
//! Detection is best effort and never fails: a value that cannot be read is
//! reported as zero (or no GPUs) with a warning, and every value can be set
//! by a flag instead.

use std::process::Command;

use protocol::{Gpu, Resources};

/// Detects the machine's resources.
///
/// CPUs come from [`std::thread::available_parallelism`], which already
/// honours cgroup CPU quotas and affinity masks; memory is `MemTotal` from
/// `/proc/meminfo`, lowered to the cgroup v2 `memory.max` when that is set;
/// GPUs come from `nvidia-smi` when it is installed.
pub fn detect() -> Resources {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not count CPUs; declaring 0 (use --cpus)");
            0.0
        });
    Resources {
        cpus,
        memory_mb: detect_memory_mb(),
        gpus: detect_gpus(),
    }
}

/// Memory in MiB: `MemTotal`, or the cgroup limit when it is lower.
fn detect_memory_mb() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total_kib(&text))
        .map(|kib| kib / 1024);
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map(|bytes| bytes / (1024 * 1024));
    match (total, limit) {
        (Some(t), Some(l)) => t.min(l),
        (Some(t), None) => t,
        (None, Some(l)) => l,
        (None, None) => {
            tracing::warn!("could not read the memory size; declaring 0 (use --memory-mb)");
            0
        }
    }
}

/// Reads `MemTotal:  16318712 kB` out of `/proc/meminfo`.
pub fn parse_meminfo_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// Asks `nvidia-smi` for the GPUs; none when it is not installed or fails.
fn detect_gpus() -> Vec<Gpu> {
    let output = Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output();
    match output {
        Ok(out) if out.status.success() => parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout)),
        Ok(out) => {
            tracing::warn!(status = %out.status, "nvidia-smi failed; declaring no GPUs");
            Vec::new()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "could not run nvidia-smi; declaring no GPUs");
            Vec::new()
        }
    }
}

/// Parses `nvidia-smi --query-gpu=index,name,memory.total
/// --format=csv,noheader,nounits` output, one GPU a line; lines that do not
/// parse are skipped.
pub fn parse_nvidia_smi(csv: &str) -> Vec<Gpu> {
    csv.lines()
        .filter_map(|line| {
            let mut fields = line.split(',').map(str::trim);
            let index = fields.next()?.parse().ok()?;
            let name = fields.next()?.to_owned();
            let memory_mb = fields.next()?.parse().ok()?;
            Some(Gpu {
                index,
                name,
                memory_mb,
            })
        })
        .collect()
}

/// Applies a `--gpus N` override: keeps the first `n` detected GPUs and, if
/// fewer were detected, declares the rest by index with an unknown model.
pub fn override_gpu_count(detected: Vec<Gpu>, n: u32) -> Vec<Gpu> {
    let mut gpus: Vec<Gpu> = detected.into_iter().take(n as usize).collect();
    let mut next = gpus.iter().map(|g| g.index + 1).max().unwrap_or(0);
    while gpus.len() < n as usize {
        gpus.push(Gpu {
            index: next,
            name: "unknown".into(),
            memory_mb: 0,
        });
        next += 1;
    }
    gpus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_total_is_read_in_kib() {
        let text = "MemTotal:       16318712 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_meminfo_total_kib(text), Some(16_318_712));
        assert_eq!(parse_meminfo_total_kib("nothing"), None);
    }

    #[test]
    fn nvidia_smi_lines_become_gpus() {
        let gpus = parse_nvidia_smi("0, NVIDIA A100-SXM4-40GB, 40960\n1, Tesla T4, 15360\nbad\n");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].index, 1);
        assert_eq!(gpus[1].name, "Tesla T4");
        assert_eq!(gpus[0].memory_mb, 40960);
    }

    #[test]
    fn a_gpu_count_override_truncates_or_pads() {
        let detected = parse_nvidia_smi("0, A, 1\n1, B, 2\n");
        assert_eq!(override_gpu_count(detected.clone(), 1).len(), 1);
        let padded = override_gpu_count(detected, 3);
        assert_eq!(padded.len(), 3);
        assert_eq!(padded[2].index, 2);
        assert!(override_gpu_count(Vec::new(), 0).is_empty());
    }
}
