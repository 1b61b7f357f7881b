//! `canaryd sim`: a stand-in model server exporting the model-server metric convention.

/// Options of `canaryd sim`.
#[derive(Clone, Debug, clap::Args)]
pub struct SimArgs {
    /// The `version` label this server reports.
    #[arg(long)]
    pub version: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9860")]
    pub listen: String,
}

/// Runs the simulated model server until interrupted.
pub fn run(args: &SimArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("the simulator is not built yet")
}
