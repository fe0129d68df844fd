//! Entry point of the Ollama simulator; see `neuronetz_bench::sim`.

use std::process::ExitCode;

use clap::Parser;
use neuronetz_bench::sim::{Args, run};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ollama-sim: {e}");
            ExitCode::FAILURE
        }
    }
}
