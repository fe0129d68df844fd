use clap::Parser;

// The system allocator (glibc) on purpose: mimalloc measured equal in CPU per request but used
// 194 KiB per idle stream against 85 (BENCHMARKS.md, "What profiling changed").

fn main() -> std::process::ExitCode {
    let cli = neuronetz_gateway::cli::Cli::parse();
    match neuronetz_gateway::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
