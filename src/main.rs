//! canaryd's entry point: parse the command line, set up logging, run the command, map
//! failures to exit codes (0 ok, 1 a check or command failed, 2 usage or startup error).

mod cli;

use clap::Parser;
use cli::{Cli, Command};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check(&args),
        Command::Bench(args) => exit(canaryd::bench::run(&args)),
        Command::Sim(args) => exit(canaryd::sim::run(&args)),
    }
}

/// Prints a command's error as a chain and maps it to exit code 2.
fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Policy files named on the command line; directories stand for their YAML files.
fn policy_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|f| is_policy_file(f))
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    out
}

fn is_policy_file(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

fn check(args: &cli::CheckArgs) -> ExitCode {
    let mut ok = true;
    for file in policy_files(&args.policies) {
        match canaryd::policy::load_file(&file) {
            Ok(_) => println!("{}: ok", file.display()),
            Err(e) => {
                ok = false;
                println!("{e}");
            }
        }
    }
    if args.live {
        eprintln!("error: --live is not available in this build");
        return ExitCode::from(2);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
