//! Host NUMA nodes as the VMM sees them: which have memory, which CPUs each has, and
//! pinning a thread to a CPU or to a node's CPUs.

use std::sync::Arc;

/// Parses a kernel CPU or node list ("0-3,8,10-11").
fn parse_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<usize>().ok()?..=b.parse::<usize>().ok()?),
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// The host's NUMA nodes with memory (`/sys/devices/system/node/has_memory`); `None`
/// where the host does not say.
pub fn host_memory_nodes() -> Option<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/node/has_memory").ok()?;
    parse_list(&s).map(|v| v.len())
}

/// The CPUs of host NUMA node `node` (`/sys/devices/system/node/nodeN/cpulist`); `None`
/// if the host does not say or the node has none.
pub fn host_node_cpus(node: u32) -> Option<Arc<[usize]>> {
    let s = std::fs::read_to_string(format!("/sys/devices/system/node/node{node}/cpulist")).ok()?;
    parse_list(&s).filter(|v| !v.is_empty()).map(Arc::from)
}

/// Where a VM's threads run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Pin {
    /// Wherever the scheduler puts them.
    #[default]
    Anywhere,
    /// On this CPU (`--cpu`).
    Cpu(usize),
    /// On the CPUs of the VM's home node (a pool node bound to a host NUMA node).
    Cpus(Arc<[usize]>),
}

impl Pin {
    /// Pins the calling thread (best effort: a failure leaves it where it was).
    pub fn apply(&self) {
        let cpus: &[usize] = match self {
            Pin::Anywhere => return,
            Pin::Cpu(c) => std::slice::from_ref(c),
            Pin::Cpus(c) => c,
        };
        // SAFETY: cpu_set_t is plain data; CPU_SET stays inside it for cpu < CPU_SETSIZE,
        // and sched_setaffinity(0) only affects this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_as_the_kernel_writes_them() {
        assert_eq!(
            parse_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_list("0"), Some(vec![0]));
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("x"), None);
    }

    #[test]
    fn a_thread_pinned_to_node_0s_cpus_runs_only_there() {
        let Some(cpus) = host_node_cpus(0) else {
            eprintln!("the host does not list node 0's CPUs");
            return;
        };
        let seen = std::thread::spawn(move || {
            Pin::Cpus(cpus.clone()).apply();
            // SAFETY: as above; sched_getaffinity fills the set for this thread.
            let set = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
                set
            };
            let on: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                // SAFETY: `set` is a valid cpu_set_t and `c` is inside it.
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect();
            (on, cpus)
        })
        .join()
        .unwrap();
        assert_eq!(seen.0, seen.1.to_vec());
    }
}
