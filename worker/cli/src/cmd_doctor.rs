//! `roost doctor`: what this host can and cannot do for Roost, with a fix for each gap.

use std::path::PathBuf;

use roost_worker::host_check::{Check, HostProbe, Status};

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Print the findings as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs every host check and prints the findings. Always exits 0: the report is the result.
pub fn run(args: DoctorArgs) -> anyhow::Result<i32> {
    let data_dir = roost_images::Cache::from_env()
        .map(|c| c.root().to_owned())
        .unwrap_or_else(|_| PathBuf::from("/"));
    let checks = HostProbe::system().all(&data_dir);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        print!("{}", render(&checks));
    }
    Ok(0)
}

fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        let mark = match check.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("[{mark}] {:<14} {}\n", check.name, check.finding));
        out.push_str(&format!("       {:<14} → {}\n", "", check.recommendation));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_status_finding_and_recommendation() {
        let checks = [Check {
            name: "kvm",
            status: Status::Fail,
            finding: "no /dev/kvm".into(),
            recommendation: "use the host VM".into(),
        }];
        let text = render(&checks);
        assert!(text.starts_with("[FAIL] kvm"), "{text}");
        assert!(text.contains("→ use the host VM"), "{text}");
    }
}
