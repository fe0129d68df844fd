//! Test and benchmark tooling for neuronetz-gateway: the Ollama simulator ([`sim`]), the load
//! generator ([`load`], binary `nz-bench`) and the bare Pingora baseline ([`passthrough`],
//! binary `nz-passthrough`).

pub mod load;
pub mod passthrough;
pub mod sim;
