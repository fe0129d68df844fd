//! Test and benchmark tooling for neuronetz-gateway.

pub mod sim;
