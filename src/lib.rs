//! neuronetz-gateway: a secure, multi-tenant front door to Ollama on Pingora.
//!
//! Module map (one concern each): `settings` (typed configuration), `routes` (normalisation,
//! route table, block list), `auth` (keys, Argon2, caches, throttle, client IP), `principal` and
//! `models` (tenant→key inheritance, allow-list), `body` (bounded request body, model
//! extraction), `listing` (filtered model listings), `upstream` (peers, header hygiene, probe),
//! `proxy` (the `ProxyHttp` phases), `errors` and `respond` (every gateway-made response),
//! `store` and `admin` (Postgres read path and operator changes), `cli` and `server`.

pub mod accounting;
pub mod admin;
pub mod audit;
pub mod auth;
pub mod body;
pub mod cli;
pub mod clock;
pub mod cors;
pub mod discovery;
pub mod drain;
pub mod errors;
pub mod fuzzing;
pub mod head;
pub mod limits;
pub mod listing;
pub mod log_sink;
pub mod log_throttle;
pub mod metrics;
pub mod model_report;
pub mod models;
pub mod policy;
pub mod principal;
pub mod proxy;
pub mod readiness;
pub mod redis_link;
pub mod redis_script;
pub mod request_id;
pub mod respond;
pub mod routes;
pub mod server;
pub mod settings;
pub mod store;
pub mod upstream;
pub mod usage;
