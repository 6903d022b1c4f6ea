//! hl7edge: the engine of a hardened HL7 v2 edge gateway.
//!
//! Data flow: listeners (`listen`) deframe MLLP, parse the header (`hl7`), hand each message to the
//! group-commit writer (`store`), which encrypts it (`keys`) and fsyncs it in redb before the
//! listener sends the acknowledgement.

pub mod audit;
pub mod bench;
pub mod client;
pub mod config;
pub mod control;
pub mod demo;
pub mod devpki;
pub mod engine;
pub mod forward;
pub mod hl7;
pub mod keys;
pub mod listen;
pub mod metrics;
pub mod reload;
pub mod route;
pub mod store;
pub mod telemetry;
pub mod wipe;

/// Stack size of every thread the engine starts (the runtime's workers and blocking threads,
/// the store's writer, applier and log-segment threads). With memory locked (below) a thread's
/// whole stack is resident, so the default 2 MiB each cost 14 MB of RSS; the deepest use
/// measured under full load, TLS handshakes included, was 56 KiB.
pub const THREAD_STACK: usize = 512 * 1024;

/// Process hardening done first thing: no core dumps (they would hold PHI and keys, promise 3).
pub fn harden_process() {
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    let _ = nix::sys::prctl::set_dumpable(false);
}

/// Locks every current and future page in RAM (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)),
/// so key material is never swapped out. Only with CAP_IPC_LOCK or an unlimited RLIMIT_MEMLOCK:
/// under a finite limit MCL_FUTURE would make every allocation past it fail, a crash waiting to
/// happen. The caller warns when memory is not locked.
///
/// MCL_ONFAULT (Linux 4.4) locks a page when it is first touched instead of faulting every mapped
/// page in at once: every page that ever held a key or PHI is still locked, but code of the
/// binary and its libraries that never runs, and the untouched rest of each thread's stack and of
/// each malloc arena, take no RAM. Without it the whole 14 MB binary and every library was
/// resident from the start. A kernel that refuses the flag gets the plain lock.
pub fn lock_memory() -> Result<(), String> {
    use nix::sys::mman::{mlockall, MlockAllFlags};
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let unlimited =
        getrlimit(Resource::RLIMIT_MEMLOCK).is_ok_and(|(soft, _)| soft == RLIM_INFINITY);
    if !unlimited && !has_cap_ipc_lock() {
        return Err("RLIMIT_MEMLOCK is finite and CAP_IPC_LOCK is absent".into());
    }
    let flags = MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE;
    mlockall(flags | MlockAllFlags::from_bits_retain(nix::libc::MCL_ONFAULT))
        .or_else(|_| mlockall(flags))
        .map_err(|e| e.to_string())
}

/// Whether CAP_IPC_LOCK (bit 14) is in this process's effective capability set.
fn has_cap_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 14) != 0)
}
