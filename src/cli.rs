//! The command line, as clap definitions.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "canaryd",
    version,
    about = "Metrics-driven rollouts for machine-learning models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate policy files; exits 0 only when all are valid.
    Check(CheckArgs),
    /// Run the judging benchmark in virtual time.
    Bench(canaryd::bench::BenchArgs),
    /// Run a stand-in model server (or a load generator) for demos and tests.
    Sim(canaryd::sim::SimArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy files (or directories of them).
    #[arg(required = true)]
    pub policies: Vec<PathBuf>,
    /// Also run every query once against Prometheus and report what returns no data.
    #[arg(long)]
    pub live: bool,
    /// Prometheus for --live.
    #[arg(
        long,
        env = "CANARYD_PROMETHEUS",
        default_value = "http://127.0.0.1:9090"
    )]
    pub prometheus: String,
}
