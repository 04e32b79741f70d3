//! The `cairn` binary: parse arguments, set up tracing, dispatch.

use clap::Parser;

use cairn_node::cli::{self, Cli, NodeCmd, Top};
use cairn_node::config::Config;

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Top::Node(NodeCmd::Run(args)) => {
            let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_target(false)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            // A panic ends the daemon, not just the thread (see Cargo.toml).
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                tracing::error!("{info}");
                report(info);
                std::process::abort();
            }));
            match Config::resolve(*args).and_then(cairn_node::daemon::run) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    1
                }
            }
        }
        Top::FuseHolder {
            socket,
            mountpoint,
            standby,
        } => cairn_node::frontend::fuse::holder::run(&socket, &mountpoint, standby),
        other => cli::run_client(&cli.api, cli.output, other),
    };
    std::process::exit(code);
}
