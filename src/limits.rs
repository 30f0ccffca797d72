//! Limits on what user input may ask of memory, in one place: how much host memory a command
//! may plan to use, and checked products of user-given sizes. Every command checks what it
//! will allocate against these before allocating, and names the limit when it refuses
//! (README, "Reliability").

use crate::error::{Error, Result};

/// Largest number of layers in a layer table (residual blocks' inner layers included). The
/// paper's ResNet has 58; a GPU network keeps buffers and pipelines per layer, and tens of
/// thousands of them exhaust the process's memory maps before its memory.
pub const MAX_LAYERS: usize = 1024;

/// Largest number of images `prism sample` puts into one PNG grid (128 x 128 images); more
/// images go to `--folder` or `--raw`, which stream.
pub const MAX_GRID_IMAGES: usize = 16_384;

/// Largest image count one command generates (`sample -n`, `eval -n` are bounded further):
/// image indices are 32-bit latent counters.
pub const MAX_IMAGES: usize = 1 << 32;

/// The product of user-given sizes, or an error naming them: `what` says what is counted.
pub fn product(parts: &[(usize, &str)], what: &str) -> Result<usize> {
    parts
        .iter()
        .try_fold(1usize, |a, &(v, _)| a.checked_mul(v))
        .ok_or_else(|| {
            let named: Vec<String> = parts.iter().map(|(v, n)| format!("{n} {v}")).collect();
            Error::invalid(format!(
                "{what}: {} do not fit in 64 bits",
                named.join(" x ")
            ))
        })
}

/// How much memory this process may still take on the host, in bytes: the smallest of the
/// memory the system reports available, the process's address-space limit (`ulimit -v`) less
/// what it maps already, and its cgroup's limit less its usage. None where none of them can be
/// read (not Linux).
pub fn host_memory() -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut take = |v: Option<u64>| {
        if let Some(v) = v {
            best = Some(best.map_or(v, |b| b.min(v)));
        }
    };
    take(meminfo_available());
    take(address_space_left());
    take(cgroup_left());
    best
}

fn meminfo_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// RLIMIT_AS less the process's current virtual size (/proc/self/status VmSize).
fn address_space_left() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft = line
        .trim_start_matches("Max address space")
        .split_whitespace()
        .next()?;
    let limit: u64 = soft.parse().ok()?; // "unlimited" does not parse: no limit
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let vm = status.lines().find(|l| l.starts_with("VmSize:"))?;
    let used_kb: u64 = vm.split_whitespace().nth(1)?.parse().ok()?;
    Some(limit.saturating_sub(used_kb * 1024))
}

/// cgroup v2 memory.max less memory.current, for the process's own cgroup.
fn cgroup_left() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let max: u64 = std::fs::read_to_string(dir.join("memory.max"))
        .ok()?
        .trim()
        .parse()
        .ok()?; // "max": no limit
    let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(max.saturating_sub(current))
}

/// Refuses a plan that needs `bytes` of host memory when less is available; `what` names
/// the plan and `advice` says what to change, given the bytes this process may still take.
pub fn check_host(bytes: u64, what: &str, advice: &dyn Fn(u64) -> String) -> Result<()> {
    match host_memory() {
        Some(left) if bytes > left => Err(Error::invalid(format!(
            "{what} needs {} of memory, and this process may take {} more \
             (the least of available memory, ulimit -v and its cgroup's limit); {}",
            human_bytes(bytes),
            human_bytes(left),
            advice(left)
        ))),
        _ => Ok(()),
    }
}

/// Bytes in binary units for messages ("3.2 GiB").
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Refuses a file larger than `max` bytes before it is read: `what` names its kind.
pub fn check_file_size(path: &std::path::Path, max: u64, what: &str) -> Result<()> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > max {
        return Err(Error::format(
            path.display().to_string(),
            format!(
                "{} is larger than any {what} can be ({} at most); not reading it",
                human_bytes(len),
                human_bytes(max)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_of_user_sizes_never_wrap() {
        assert_eq!(product(&[(3, "a"), (4, "b")], "x").unwrap(), 12);
        let e = product(&[(usize::MAX, "count"), (2, "per image")], "images")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("count 18446744073709551615 x per image 2"),
            "{e}"
        );
    }

    #[test]
    fn host_memory_is_read_on_linux_and_checks_refuse_the_impossible() {
        if cfg!(target_os = "linux") {
            let m = host_memory().expect("Linux reports MemAvailable");
            assert!(m > 1 << 20, "{m}");
            let e = check_host(u64::MAX, "a plan", &|_| "ask for less".into())
                .unwrap_err()
                .to_string();
            assert!(e.contains("a plan needs 16777216.0 TiB of memory"), "{e}");
            assert!(e.contains("ask for less"), "{e}");
        }
        assert!(check_host(1, "a byte", &|_| String::new()).is_ok());
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12), "12 B");
    }
}
