//! `canaryd bench`: the judging benchmark in virtual time (see ../shared/bench/README.md).
//!
//! Every repetition runs the real [`decide`](crate::rollout::decide) against a simulated
//! Prometheus ([`world`]), with the policy's step schedule, from the first tick to promotion,
//! rollback or the horizon. Results depend only on the seed: each repetition draws from its
//! own generator, keyed by the scenario's name and the repetition's number, whichever thread
//! runs it and whichever other scenarios the file has.

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
    /// Repetitions per scenario and judge (at most 1,000,000).
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

/// The most repetitions per scenario and judge `--reps` accepts: every repetition's result is
/// kept until the figures are computed.
pub const MAX_REPS: u32 = 1_000_000;

/// Progress goes to stderr at least this often (seconds of wall time), and at every tenth of
/// the work.
const PROGRESS_SECS: f64 = 2.0;

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

/// The judges to run: the three by default, else the ones given, each once, in the order first
/// given.
pub fn judge_names(given: &[String]) -> Vec<String> {
    if given.is_empty() {
        return vec![
            "sequential".into(),
            "threshold".into(),
            "mann-whitney".into(),
        ];
    }
    let mut out: Vec<String> = Vec::new();
    for j in given {
        if !out.contains(j) {
            out.push(j.clone());
        }
    }
    out
}

/// Loads the benchmark's policy and checks that the benchmark can simulate its metrics. Every
/// error names the policy's file once (the loader's own errors already do).
pub fn load_policy(path: Option<&std::path::Path>) -> anyhow::Result<Policy> {
    const BUILT_IN: &str = "policies/bench.yaml (built in)";
    let (file, policy) = match path {
        Some(p) => (
            crate::policy::display_path(p),
            crate::policy::load_file(p).map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        None => (
            BUILT_IN.to_owned(),
            crate::policy::load_str(BUILT_IN, DEFAULT_POLICY)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
    };
    if let Some(m) = policy
        .metrics
        .iter()
        .find(|m| matches!(m.kind, crate::policy::MetricKind::Query { .. }))
    {
        anyhow::bail!(
            "{file}: metric {:?} is a raw query; the benchmark simulates only error_rate, latency and accuracy",
            m.name
        );
    }
    Ok(policy)
}

/// Whether progress is due: at the end, at each new tenth of the work, or when
/// [`PROGRESS_SECS`] have passed since the last report (`last_at`, seconds; `last_done`, the
/// rollouts it reported). Reports never go backwards.
pub fn progress_due(done: usize, total: usize, now: f64, last_at: f64, last_done: usize) -> bool {
    if done <= last_done || total == 0 {
        return false;
    }
    done >= total || done * 10 / total > last_done * 10 / total || now - last_at >= PROGRESS_SECS
}

/// Progress on stderr, shared by the benchmark's threads.
struct Progress<C> {
    on: bool,
    total: usize,
    clock: C,
    /// When the last report was printed and how many rollouts it reported.
    last: Mutex<(f64, usize)>,
}

impl<C: Fn() -> f64> Progress<C> {
    fn tick(&self, done: usize) {
        if !self.on {
            return;
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let now = (self.clock)();
        if progress_due(done, self.total, now, last.0, last.1) {
            *last = (now, done);
            // Rounded down: 100 % only at the end.
            let pct = done * 100 / self.total;
            let _ = writeln!(
                std::io::stderr(),
                "bench: {done} of {} simulated rollouts ({pct} %)",
                self.total
            );
        }
    }
}

/// Everything the benchmark computed.
pub struct Results {
    pub rows: Vec<report::Summary>,
    pub judges: Vec<String>,
}

/// Runs the benchmark without printing results (progress goes to stderr when asked).
pub fn compute(args: &BenchArgs, progress: bool) -> anyhow::Result<Results> {
    // Before anything is read or allocated.
    anyhow::ensure!(args.reps > 0, "--reps must be at least 1");
    anyhow::ensure!(
        args.reps <= MAX_REPS,
        "--reps {} is too many: at most {MAX_REPS} repetitions per scenario and judge",
        args.reps
    );
    let judges = judge_names(&args.judges);
    let methods: Vec<Method> = judges
        .iter()
        .map(|j| parse_method(j))
        .collect::<anyhow::Result<_>>()?;
    let scenarios = scenario::load(&args.scenarios)?;
    let base = load_policy(args.policy.as_deref())?;

    // Units of work: (scenario, judge, first rep, reps), each scenario's and judge's together.
    let chunks = args.reps.div_ceil(CHUNK) as usize;
    let mut units = Vec::with_capacity(scenarios.len() * methods.len() * chunks);
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
    let keys: Vec<u64> = scenarios
        .iter()
        .map(|sc| random::name_key(&sc.name))
        .collect();
    let next = AtomicUsize::new(0);
    let runs_done = AtomicUsize::new(0);
    let report = Progress {
        on: progress,
        total: scenarios.len() * methods.len() * args.reps as usize,
        clock: stopwatch(),
        last: Mutex::new((0.0, 0)),
    };
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
                            let mut rng = random::generator(args.seed, keys[si], rep);
                            let r = run::run_rep(policy, sc, &mut rng);
                            report.tick(runs_done.fetch_add(1, Ordering::Relaxed) + 1);
                            r
                        })
                        .collect();
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(reps);
                    }
                }
            });
        }
    });
    let results = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?;
    // The units of one scenario and judge are consecutive, in that order.
    let mut chunk_results = results.into_iter();
    let mut rows = Vec::new();
    for (si, sc) in scenarios.iter().enumerate() {
        for (ji, judge) in judges.iter().enumerate() {
            let reps: Vec<run::RepResult> = chunk_results
                .by_ref()
                .take(chunks)
                .flat_map(Option::unwrap_or_default)
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
        // The wall time goes to stderr only, so that a seed gives the same stdout every time.
        writeln!(
            out,
            "\n{} repetitions per scenario and judge, seed {}",
            args.reps, args.seed
        )?;
    }
    let _ = writeln!(
        std::io::stderr(),
        "bench: finished in {wall:.1} s (wall time)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(reps: u32, judges: &[&str]) -> BenchArgs {
        BenchArgs {
            scenarios: "/nonexistent/scenarios.json".into(),
            policy: None,
            judges: judges.iter().map(|j| (*j).to_owned()).collect(),
            reps,
            seed: 1,
            json: false,
        }
    }

    #[test]
    fn judges_given_twice_run_once_in_the_order_first_given() {
        let given: Vec<String> = ["threshold", "sequential", "threshold", "sequential"]
            .iter()
            .map(|j| (*j).to_owned())
            .collect();
        assert_eq!(judge_names(&given), ["threshold", "sequential"]);
        assert_eq!(
            judge_names(&[]),
            ["sequential", "threshold", "mann-whitney"]
        );
    }

    #[test]
    fn absurd_repetitions_are_refused_before_anything_is_read() {
        let Err(e) = compute(&args(4_000_000_000, &[]), false) else {
            panic!("4e9 repetitions accepted");
        };
        assert_eq!(
            e.to_string(),
            "--reps 4000000000 is too many: at most 1000000 repetitions per scenario and judge"
        );
        let Err(e) = compute(&args(MAX_REPS, &[]), false) else {
            panic!("a missing file accepted");
        };
        assert!(
            e.to_string()
                .starts_with("/nonexistent/scenarios.json: cannot read the file"),
            "{e}"
        );
    }

    #[test]
    fn progress_is_due_every_tenth_or_every_two_seconds() {
        let total = 1000;
        // Nothing new, or going backwards: never.
        assert!(!progress_due(50, total, 10.0, 0.0, 50));
        assert!(!progress_due(40, total, 10.0, 0.0, 50));
        // Within a tenth and within two seconds: not yet.
        assert!(!progress_due(99, total, 1.9, 0.0, 0));
        // A new tenth, however soon.
        assert!(progress_due(100, total, 0.1, 0.0, 0));
        assert!(progress_due(230, total, 0.1, 0.05, 150));
        // Two seconds, however little was done (a slow run).
        assert!(progress_due(1, total, 2.0, 0.0, 0));
        assert!(progress_due(101, total, 4.5, 2.5, 100));
        // The end, always.
        assert!(progress_due(total, total, 0.0, 0.0, 999));
        assert!(!progress_due(1, 0, 9.0, 0.0, 0));
    }
}
