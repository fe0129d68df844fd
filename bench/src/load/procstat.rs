//! CPU time and memory of a local process (Linux only): a target's CPU time from its process
//! CPU clock (`clock_getcpuclockid`, nanoseconds), other processes' utime+stime from `/proc` in
//! clock ticks (`sysconf(_SC_CLK_TCK)`), `VmRSS` and `VmHWM` in KiB.

use serde::Serialize;

#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    pub ticks: u64,
}

/// CPU time of a whole process (all its threads, including those that exited), in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct ProcessCpu {
    pub nanos: u64,
}

/// `pid`'s CPU time from its process CPU clock. `/proc/<pid>/stat` rounds utime and stime to
/// 10 ms ticks, a few per cent of a 5 s round at 400 req/s; the clock reads the scheduler's
/// own nanosecond sum.
pub fn process_cpu(pid: u32) -> Option<ProcessCpu> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls write only into the owned values passed by pointer; an unknown or
    // foreign pid is reported as an error code, not undefined behaviour.
    unsafe {
        if libc::clock_getcpuclockid(pid, &mut clock) != 0 {
            return None;
        }
        if libc::clock_gettime(clock, &mut ts) != 0 {
            return None;
        }
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(ProcessCpu {
        nanos: secs * 1_000_000_000 + nanos,
    })
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// The numeric fields of `/proc/<pid>/stat` from field 3 (state) on, for `f(fields)`.
fn with_stat<T>(pid: u32, f: impl FnOnce(&[&str]) -> Option<T>) -> Option<T> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    f(&fields)
}

/// Field `n` of stat(5) (1-based, as the manual numbers them) as a number.
fn stat_field(fields: &[&str], n: usize) -> Option<u64> {
    fields.get(n - 3)?.parse().ok()
}

/// utime + stime of `pid` (all its threads), in clock ticks.
pub fn cpu(pid: u32) -> Option<CpuSample> {
    with_stat(pid, |f| {
        Some(CpuSample {
            ticks: stat_field(f, 14)? + stat_field(f, 15)?,
        })
    })
}

/// The parent of `pid`.
pub fn parent(pid: u32) -> Option<u32> {
    with_stat(pid, |f| u32::try_from(stat_field(f, 4)?).ok())
}

/// CPU of a server that forks a process per connection (Postgres): `root`'s own utime+stime,
/// what its children that already exited spent (cutime+cstime), and the utime+stime of the
/// children running now.
pub fn tree_cpu(root: u32) -> Option<CpuSample> {
    let own = with_stat(root, |f| {
        Some(stat_field(f, 14)? + stat_field(f, 15)? + stat_field(f, 16)? + stat_field(f, 17)?)
    })?;
    let children: u64 = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| parent(pid) == Some(root))
        .filter_map(|pid| cpu(pid).map(|c| c.ticks))
        .sum();
    Some(CpuSample {
        ticks: own + children,
    })
}

pub fn ticks_to_secs(ticks: u64) -> f64 {
    ticks as f64 / clock_ticks_per_sec() as f64
}

/// Busy clock ticks of the whole machine (all CPUs), from the first line of `/proc/stat`:
/// everything except idle and iowait.
pub fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
    let total: u64 = v.iter().take(8).sum();
    Some(total - v.get(3)? - v.get(4)?)
}

/// Where the machine's CPU went during a measured window.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct MachineDelta {
    /// Busy CPU seconds of the whole machine.
    pub busy_cpu_s: f64,
    /// CPU seconds of this load generator.
    pub loadgen_cpu_s: f64,
    /// Busy minus the load generator minus the target process: simulator, stores and any
    /// other load on the machine.
    pub rest_cpu_s: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct MachineSample {
    busy: u64,
    own: u64,
}

pub fn machine_sample() -> Option<MachineSample> {
    Some(MachineSample {
        busy: machine_busy_ticks()?,
        own: cpu(std::process::id())?.ticks,
    })
}

pub fn machine_delta(before: MachineSample, target_cpu_s: f64) -> Option<MachineDelta> {
    let after = machine_sample()?;
    let hz = clock_ticks_per_sec() as f64;
    let busy = after.busy.saturating_sub(before.busy) as f64 / hz;
    let own = after.own.saturating_sub(before.own) as f64 / hz;
    Some(MachineDelta {
        busy_cpu_s: busy,
        loadgen_cpu_s: own,
        rest_cpu_s: (busy - own - target_cpu_s).max(0.0),
    })
}

/// `(VmRSS, VmHWM)` of `pid` in KiB.
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// What a process spent during a measured window.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct ProcessDelta {
    pub pid: u32,
    pub cpu_seconds: f64,
    /// CPU seconds per 1 000 measured requests.
    pub cpu_s_per_1000_req: f64,
    /// Peak RSS of the process since it started (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// RSS at the end of the window, KiB.
    pub rss_kib: u64,
}

pub fn delta(pid: u32, before: ProcessCpu, requests: u64) -> Option<ProcessDelta> {
    let after = process_cpu(pid)?;
    let (rss, hwm) = memory(pid)?;
    let secs = after.nanos.saturating_sub(before.nanos) as f64 / 1e9;
    Some(ProcessDelta {
        pid,
        cpu_seconds: secs,
        cpu_s_per_1000_req: if requests > 0 {
            secs * 1000.0 / requests as f64
        } else {
            0.0
        },
        peak_rss_kib: hwm,
        rss_kib: rss,
    })
}

/// Raises this process's open-file limit to its hard limit (children inherit it). Returns the
/// new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(cpu(me).is_some());
        assert!(parent(me).is_some_and(|p| p > 0));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(parent(child.id()), Some(me));
        // Own ticks first: other test threads keep running, so a later read only grows.
        let own = cpu(me).unwrap().ticks;
        assert!(tree_cpu(me).unwrap().ticks >= own);
        // The child's clock is readable from here and counts what it ran.
        let child_cpu = process_cpu(child.id()).unwrap();
        assert!(child_cpu.nanos < 5_000_000_000);
        let a = process_cpu(me).unwrap();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let b = process_cpu(me).unwrap();
        assert!(b.nanos > a.nanos, "{x}: the busy loop ran on the clock");
        child.kill().unwrap();
        child.wait().unwrap();
        let (rss, hwm) = memory(me).unwrap();
        assert!(rss > 0 && hwm >= rss);
    }
}
