//! `canaryd bench`: the judging benchmark in virtual time (see ../shared/bench/README.md).

/// Options of `canaryd bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Scenario file in the format of shared/bench/scenarios.json.
    #[arg(long)]
    pub scenarios: std::path::PathBuf,
    /// Policy whose step schedule and bounds the benchmark follows.
    #[arg(long)]
    pub policy: Option<std::path::PathBuf>,
    /// Judges to compare (sequential, threshold, mann-whitney); all three by default.
    #[arg(long = "judge")]
    pub judges: Vec<String>,
    /// Repetitions per scenario and judge.
    #[arg(long, default_value_t = 1000)]
    pub reps: u32,
    /// Random seed; the same seed gives the same figures.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark and prints its results.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("the benchmark is not built yet")
}
