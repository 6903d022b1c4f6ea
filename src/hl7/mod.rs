//! HL7 v2 (stub, being written).
