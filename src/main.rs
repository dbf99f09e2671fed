//! The `loraplex` binary: parse the command line, initialise logging, dispatch.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    loraplex::runtime::init_process();
    let cli = loraplex::cli::Cli::parse();
    loraplex::cli::run(cli)
}
