//! See `neuronetz_gateway::fuzzing::scanners` for the invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| neuronetz_gateway::fuzzing::scanners(data));
