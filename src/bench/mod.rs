//! `canaryd bench`: the judging benchmark in virtual time (see ../shared/bench/README.md).
//!
//! Every repetition runs the real [`decide`](crate::rollout::decide) against a simulated
//! Prometheus ([`world`]), with the policy's step schedule, from the first tick to promotion,
//! rollback or the horizon. Results depend only on the seed: each repetition draws from its
//! own generator, whichever thread runs it.

pub mod random;
pub mod report;
pub mod run;
pub mod scenario;
pub mod world;

use crate::policy::{Method, Policy};
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// The policy used without `--policy`: policies/bench.yaml, built in.
pub const DEFAULT_POLICY: &str = include_str!("../../policies/bench.yaml");

/// Repetitions per unit of work handed to a thread.
const CHUNK: u32 = 50;

fn parse_method(name: &str) -> anyhow::Result<Method> {
    Ok(match name {
        "sequential" => Method::Sequential,
        "threshold" => Method::Threshold,
        "mann-whitney" => Method::MannWhitney,
        other => {
            anyhow::bail!("unknown judge {other:?}: expected sequential, threshold or mann-whitney")
        }
    })
}

/// Loads the benchmark's policy and checks that the benchmark can simulate its metrics.
pub fn load_policy(path: Option<&std::path::Path>) -> anyhow::Result<Policy> {
    let policy = match path {
        Some(p) => crate::policy::load_file(p).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => crate::policy::load_str("policies/bench.yaml (built in)", DEFAULT_POLICY)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    if let Some(m) = policy
        .metrics
        .iter()
        .find(|m| matches!(m.kind, crate::policy::MetricKind::Query { .. }))
    {
        anyhow::bail!(
            "metric {:?} is a raw query; the benchmark simulates only error_rate, latency and accuracy",
            m.name
        );
    }
    Ok(policy)
}

/// Everything the benchmark computed.
pub struct Results {
    pub rows: Vec<report::Summary>,
    pub judges: Vec<String>,
}

/// Runs the benchmark without printing results (progress goes to stderr when asked).
pub fn compute(args: &BenchArgs, progress: bool) -> anyhow::Result<Results> {
    let scenarios = scenario::load(&args.scenarios)?;
    let base = load_policy(args.policy.as_deref())?;
    let judges: Vec<String> = if args.judges.is_empty() {
        vec![
            "sequential".into(),
            "threshold".into(),
            "mann-whitney".into(),
        ]
    } else {
        args.judges.clone()
    };
    let methods: Vec<Method> = judges
        .iter()
        .map(|j| parse_method(j))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(args.reps > 0, "--reps must be at least 1");

    // Units of work: (scenario, judge, first rep, reps).
    let mut units = Vec::new();
    for si in 0..scenarios.len() {
        for ji in 0..methods.len() {
            let mut first = 0;
            while first < args.reps {
                let n = CHUNK.min(args.reps - first);
                units.push((si, ji, first, n));
                first += n;
            }
        }
    }
    let policies: Vec<Vec<Policy>> = scenarios
        .iter()
        .map(|sc| {
            methods
                .iter()
                .map(|m| run::policy_for(&base, sc, *m))
                .collect()
        })
        .collect();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let runs_done = AtomicUsize::new(0);
    let runs = scenarios.len() * methods.len() * args.reps as usize;
    let results: Mutex<Vec<Option<Vec<run::RepResult>>>> = Mutex::new(vec![None; units.len()]);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(si, ji, first, n)) = units.get(i) else {
                        break;
                    };
                    let sc = &scenarios[si];
                    let policy = &policies[si][ji];
                    let reps: Vec<run::RepResult> = (first..first + n)
                        .map(|rep| {
                            let mut rng = random::generator(args.seed, si, rep);
                            run::run_rep(policy, sc, &mut rng)
                        })
                        .collect();
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(reps);
                    }
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    let r = runs_done.fetch_add(n as usize, Ordering::Relaxed) + n as usize;
                    if progress && (d.is_multiple_of(10) || d == units.len()) {
                        let _ = writeln!(
                            std::io::stderr(),
                            "bench: {r} of {runs} simulated rollouts (scenarios × judges × repetitions)"
                        );
                    }
                }
            });
        }
    });
    let results = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?;
    let mut rows = Vec::new();
    for (si, sc) in scenarios.iter().enumerate() {
        for (ji, judge) in judges.iter().enumerate() {
            let reps: Vec<run::RepResult> = units
                .iter()
                .zip(results.iter())
                .filter(|((s, j, _, _), _)| *s == si && *j == ji)
                .flat_map(|(_, r)| r.clone().unwrap_or_default())
                .collect();
            rows.push(report::summarise(&policies[si][ji], sc, judge, &reps));
        }
    }
    Ok(Results { rows, judges })
}

/// Wall-clock seconds since `start`, for the benchmark's own run time only; the decision
/// core never reads the clock.
#[allow(clippy::disallowed_methods)]
fn stopwatch() -> impl Fn() -> f64 {
    let start = std::time::Instant::now();
    move || start.elapsed().as_secs_f64()
}

/// Runs the benchmark and prints its results.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let elapsed = stopwatch();
    // Every error names its own file (the scenarios' or the policy's).
    let results = compute(args, true)?;
    let wall = elapsed();
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&results.rows)?)?;
    } else {
        write!(out, "{}", report::table(&results.rows))?;
        writeln!(out)?;
        let baseline = results
            .judges
            .iter()
            .any(|j| j == "threshold")
            .then_some("threshold");
        for judge in &results.judges {
            if judge == "threshold" {
                continue;
            }
            writeln!(out, "goals for {judge}:")?;
            for (what, ok) in report::goals(&results.rows, judge, baseline) {
                let status = match ok {
                    Some(true) => "pass",
                    Some(false) => "FAIL",
                    None => "too few repetitions to tell",
                };
                writeln!(out, "  [{status}] {what}")?;
            }
            for note in report::notes(&results.rows, judge) {
                writeln!(out, "  [info] {note}")?;
            }
        }
        writeln!(
            out,
            "\nwall time {wall:.1} s, {} repetitions per scenario and judge, seed {}",
            args.reps, args.seed
        )?;
    }
    let _ = writeln!(std::io::stderr(), "bench: finished in {wall:.1} s");
    Ok(())
}
