//! The clock of the eBPF programs, as userspace reads it: conntrack ages and timeouts compare against it.
//!
//! With `Config::tick_ns` set (every instance this pfwd loads), the programs' clock is `jiffies * tick_ns`
//! (`bpf_jiffies64`, inlined by the verifier). Userspace reads the same jiffies through `times(2)`, which returns
//! them in USER_HZ units (10 ms here): a reading is at most one such unit behind the programs', which
//! `CtEntry::expired` treats as "just seen". Without `tick_ns` (an instance loaded by an older pfwd) the programs
//! use CLOCK_MONOTONIC_COARSE, and so does this.
use pfwd_common::Config;

/// The kernel's tick in ns: the resolution of CLOCK_MONOTONIC_COARSE, which is one jiffy (1e9 / HZ).
pub fn tick_ns() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } == 0;
    if ok && ts.tv_sec == 0 && ts.tv_nsec > 0 { ts.tv_nsec as u32 } else { 0 }
}

/// Now on the programs' clock of an instance configured with `cfg`, in ns.
pub fn now_ns(cfg: &Config) -> u64 {
    if cfg.tick_ns != 0 {
        // SAFETY: times(2) accepts a null buffer and returns jiffies in clock ticks (USER_HZ) since boot.
        let ticks = unsafe { libc::times(std::ptr::null_mut()) } as u64;
        // SAFETY: sysconf has no memory arguments.
        let user_hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        return ticks * (1_000_000_000 / user_hz);
    }
    monotonic_coarse_ns()
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock of `bpf_ktime_get_coarse_ns`.
pub fn monotonic_coarse_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC_COARSE)
}

/// CLOCK_MONOTONIC in ns.
pub fn monotonic_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Userspace's reading of the jiffies clock runs at the rate of the monotonic clock, and the tick is a whole
    /// number of microseconds for the usual HZ (100, 250, 300, 1000).
    #[test]
    fn the_jiffies_clock_advances_with_time() {
        let tick = tick_ns();
        assert!((1_000_000..=10_000_000).contains(&tick), "tick {tick} ns");
        let cfg = Config { tick_ns: tick, ..Default::default() };
        let (j0, m0) = (now_ns(&cfg), monotonic_coarse_ns());
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (j1, m1) = (now_ns(&cfg), monotonic_coarse_ns());
        let (dj, dm) = (j1 - j0, m1 - m0);
        assert!(dj.abs_diff(dm) <= 25_000_000, "jiffies advanced {dj} ns while the monotonic clock advanced {dm} ns");
    }
}
