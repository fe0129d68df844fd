//! `nz-passthrough --listen ADDR --upstream HOST:PORT [-c pingora.yaml]`: a bare Pingora
//! reverse proxy, the baseline `nz-bench compare` measures the gateway against.

use anyhow::Context;
use clap::Parser;
use neuronetz_bench::passthrough::Passthrough;
use pingora::server::configuration::Opt;
use pingora::server::{RunArgs, Server};

#[derive(Parser)]
#[command(
    name = "nz-passthrough",
    version,
    about = "Bare Pingora passthrough proxy (benchmark baseline)"
)]
struct Cli {
    /// Pingora options (-c/--conf for the same YAML the gateway uses: threads, pools).
    #[command(flatten)]
    pingora: Opt,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: String,
    /// Upstream `host:port` (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:11434")]
    upstream: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Resolve once at start: Pingora's peer would otherwise fail per request on a bad name.
    let upstream = std::net::ToSocketAddrs::to_socket_addrs(&cli.upstream)
        .with_context(|| format!("resolving --upstream {}", cli.upstream))?
        .next()
        .with_context(|| format!("--upstream {} resolves to nothing", cli.upstream))?;
    let mut server =
        Server::new(Some(cli.pingora)).map_err(|e| anyhow::anyhow!("pingora conf: {e}"))?;
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Passthrough::new(upstream),
        "nz-passthrough",
    );
    proxy.add_tcp(&cli.listen);
    server.add_service(proxy);
    println!("listening on {} -> {upstream}", cli.listen);
    server.run(RunArgs::default());
    Ok(())
}
