//! CRIU's tasks by their pid in the tree's own pid namespace, as CRIU's images name
//! them, and by the host's, as the kernel's reads, pidfds and /proc need. While the
//! plugin runs (the dump's end, the resume hook) the tree's processes are exactly the
//! ones CRIU has ptrace-seized, and CRIU is the process the plugin runs in: each has
//! this process as its TracerPid, and its NSpid ends with its pid in the tree's
//! namespace (one field when the tree is in the host's).

use std::collections::HashMap;

/// The tree's processes: pid in the tree's namespace -> host pid.
#[derive(Debug, Default)]
pub struct Tasks {
    by_virt: HashMap<i32, u32>,
    /// Nothing is traced by this process (outside CRIU: the bench's driver): pids are
    /// taken as they are.
    outside_criu: bool,
}

/// (pid in the tree's namespace, host pid) of a process whose status says `tracer`
/// and `nspid`, if `me` traces it.
pub fn pair(me: i32, tracer: i32, nspid: &[i32]) -> Option<(i32, u32)> {
    let (&host, &virt) = (nspid.first()?, nspid.last()?);
    (tracer == me && host > 0).then_some((virt, host as u32))
}

/// TracerPid and NSpid of `/proc/PID/status` (or of a thread's, `task` set). Read by
/// hand, not with procfs, whose Status parses every line of the file: this runs for
/// every process of the tree inside CRIU's frozen window (2.3 ms more at 100
/// processes with procfs, measured).
fn tracer_and_nspid(pid: i32, task: Option<i32>) -> Option<(i32, Vec<i32>)> {
    let path = match task {
        Some(tid) => format!("/proc/{pid}/task/{tid}/status"),
        None => format!("/proc/{pid}/status"),
    };
    parse_status(&std::fs::read_to_string(path).ok()?)
}

fn parse_status(text: &str) -> Option<(i32, Vec<i32>)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let tracer = field("TracerPid:")?.parse().ok()?;
    // Absent before Linux 4.1: the host's pid only.
    let nspid = field("NSpid:").map_or_else(Vec::new, |v| {
        v.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    });
    Some((tracer, nspid))
}

impl Tasks {
    /// The processes this one traces. `virt` are the pids the images name: when each
    /// is a process traced here under that same host pid (no pid namespace), /proc is
    /// not scanned.
    pub fn traced_here(virt: &[i32]) -> Tasks {
        let me = std::process::id() as i32;
        let mine = |p: i32| {
            tracer_and_nspid(p, None)
                .is_some_and(|(tracer, nspid)| tracer == me && nspid.len() <= 1)
        };
        if !virt.is_empty() && virt.iter().all(|&p| mine(p)) {
            return Tasks {
                by_virt: virt.iter().map(|&p| (p, p as u32)).collect(),
                outside_criu: false,
            };
        }
        let by_virt: HashMap<i32, u32> = procfs::process::all_processes()
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|p| {
                let (tracer, nspid) = tracer_and_nspid(p.pid, None)?;
                let nspid = if nspid.is_empty() { vec![p.pid] } else { nspid };
                pair(me, tracer, &nspid)
            })
            .collect();
        let outside_criu = by_virt.is_empty();
        Tasks {
            by_virt,
            outside_criu,
        }
    }

    /// The host pid of the tree's process `virt`.
    pub fn host(&self, virt: i32) -> Option<u32> {
        if self.outside_criu {
            return u32::try_from(virt).ok();
        }
        self.by_virt.get(&virt).copied()
    }

    /// The tree's pid of host process `host`.
    pub fn virt(&self, host: u32) -> Option<i32> {
        if self.outside_criu {
            return i32::try_from(host).ok();
        }
        self.by_virt
            .iter()
            .find(|(_, &h)| h == host)
            .map(|(&v, _)| v)
    }

    /// The host thread id of the tree's thread `virt_tid` of process `virt_pid`.
    pub fn host_tid(&self, virt_pid: i32, virt_tid: i32) -> Option<u32> {
        if self.outside_criu {
            return u32::try_from(virt_tid).ok();
        }
        let host = self.host(virt_pid)?;
        if virt_tid == virt_pid {
            return Some(host);
        }
        std::fs::read_dir(format!("/proc/{host}/task"))
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|&t| {
                tracer_and_nspid(host as i32, Some(t))
                    .is_some_and(|(_, nspid)| nspid.last() == Some(&virt_tid))
            })
            .and_then(|t| u32::try_from(t).ok())
    }

    pub fn hosts(&self) -> Vec<u32> {
        self.by_virt.values().copied().collect()
    }

    /// Thread `tid` (host) of host process `pid`, in the tree's namespace.
    pub fn virt_tid(&self, pid: u32, tid: u32) -> Option<i32> {
        if self.outside_criu {
            return i32::try_from(tid).ok();
        }
        tracer_and_nspid(pid as i32, Some(tid as i32))?
            .1
            .last()
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_gives_its_tracer_and_its_pids_in_each_namespace() {
        let text = "Name:\tlocker\nTgid:\t4321\nPid:\t4321\nTracerPid:\t10\nNSpid:\t4321\t1\n";
        assert_eq!(parse_status(text), Some((10, vec![4321, 1])));
        assert_eq!(parse_status("TracerPid:\t0\n"), Some((0, vec![])));
        assert_eq!(parse_status("Name:\tx\n"), None);
        assert_eq!(parse_status("TracerPid:\tx\n"), None);
    }

    #[test]
    fn a_traced_process_pairs_its_innermost_pid_with_the_hosts() {
        assert_eq!(pair(10, 10, &[4321, 1]), Some((1, 4321)));
        assert_eq!(pair(10, 10, &[77]), Some((77, 77)));
        assert_eq!(pair(10, 11, &[77]), None, "traced by another");
        assert_eq!(pair(10, 10, &[]), None);
        let t = Tasks {
            by_virt: [(1, 4321)].into(),
            outside_criu: false,
        };
        assert_eq!(
            (t.host(1), t.host(2), t.virt(4321)),
            (Some(4321), None, Some(1))
        );
        let outside = Tasks {
            outside_criu: true,
            ..Tasks::default()
        };
        assert_eq!(outside.host(5), Some(5));
    }
}
