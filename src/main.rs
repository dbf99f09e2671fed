//! The `loraplex` binary: parse the command line, initialise logging, dispatch.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    loraplex::runtime::init_threads();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LORAPLEX_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = loraplex::cli::Cli::parse();
    loraplex::cli::run(cli)
}
