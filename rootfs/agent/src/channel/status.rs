//! The agent's hello (who it is) and health (how the guest is doing), read from `/proc`.

use roost_proto::agent::{Health, Hello, MIN_PROTOCOL_VERSION, MemoryInfo, PROTOCOL_VERSION};

pub fn hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        min_protocol_version: MIN_PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// Missing or unreadable `/proc` files give zeros rather than an error: health answers what it
/// can.
pub fn health() -> Health {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let (load, tasks) = parse_loadavg(&read("/proc/loadavg"));
    Health {
        uptime_secs: parse_uptime(&read("/proc/uptime")),
        load,
        memory: parse_meminfo(&read("/proc/meminfo")),
        tasks,
    }
}

fn parse_uptime(text: &str) -> f64 {
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

/// `0.12 0.34 0.56 2/345 6789`: three load averages, then running/total tasks.
fn parse_loadavg(text: &str) -> ([f64; 3], u32) {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let load = |i: usize| fields.get(i).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let tasks = fields
        .get(3)
        .and_then(|s| s.split_once('/'))
        .and_then(|(_, total)| total.parse().ok())
        .unwrap_or(0);
    ([load(0), load(1), load(2)], tasks)
}

fn parse_meminfo(text: &str) -> MemoryInfo {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    MemoryInfo {
        total_kib: field("MemTotal"),
        available_kib: field("MemAvailable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(parse_uptime("12.34 56.78\n"), 12.34);
        assert_eq!(
            parse_loadavg("0.12 0.34 0.56 2/345 6789\n"),
            ([0.12, 0.34, 0.56], 345)
        );
        let meminfo = "MemTotal:        2000 kB\nMemFree:  10 kB\nMemAvailable:    1500 kB\n";
        assert_eq!(
            parse_meminfo(meminfo),
            MemoryInfo {
                total_kib: 2000,
                available_kib: 1500
            }
        );
    }

    #[test]
    fn garbage_gives_zeros_not_panics() {
        assert_eq!(parse_uptime(""), 0.0);
        assert_eq!(parse_loadavg("x y"), ([0.0; 3], 0));
        assert_eq!(parse_meminfo("MemTotal: lots").total_kib, 0);
    }

    #[test]
    fn this_machine_reports_memory_and_tasks() {
        let health = health();
        assert!(
            health.memory.total_kib > 0 && health.tasks > 0,
            "{health:?}"
        );
        assert!(health.uptime_secs > 0.0);
    }
}
