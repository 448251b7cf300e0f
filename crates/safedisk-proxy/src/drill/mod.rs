//! The drill (being built).

use std::process::ExitCode;

/// Drill options.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {}

/// Runs the drill.
pub async fn run(_args: DrillArgs) -> ExitCode {
    eprintln!("the drill is not built yet");
    ExitCode::FAILURE
}
