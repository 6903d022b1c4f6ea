//! hl7edge: the engine of a hardened HL7 v2 edge gateway.
//!
//! Data flow: listeners (`listen`) deframe MLLP, parse the header (`hl7`), hand each message to the
//! group-commit writer (`store`), which encrypts it (`keys`) and fsyncs it in redb before the
//! listener sends the acknowledgement.

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
pub mod route;
pub mod store;
pub mod telemetry;

/// Process hardening done first thing: no core dumps (they would hold PHI and keys, promise 3).
pub fn harden_process() {
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    let _ = nix::sys::prctl::set_dumpable(false);
}

/// Locks every current and future page in RAM (mlockall(MCL_CURRENT | MCL_FUTURE)), so key
/// material is never swapped out. Needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK; the
/// caller warns when it is not permitted.
pub fn lock_memory() -> Result<(), nix::Error> {
    use nix::sys::mman::{mlockall, MlockAllFlags};
    mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE)
}
