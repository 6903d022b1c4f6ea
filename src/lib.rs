//! hl7edge: the engine of a hardened HL7 v2 edge gateway.
//!
//! Data flow: listeners (`listen`) deframe MLLP, parse the header (`hl7`), hand each message to the
//! group-commit writer (`store`), which encrypts it (`keys`) and fsyncs it in redb before the
//! listener sends the acknowledgement.

pub mod hl7;
