//! `roost doctor` on the real machine: its KVM verdict must match what the kernel shows.

use std::path::Path;
use std::process::Command;

fn doctor_json() -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(["doctor", "--json"])
        .output()
        .expect("run roost doctor");
    assert!(output.status.success(), "roost doctor failed: {output:?}");
    serde_json::from_slice(&output.stdout).expect("doctor --json prints JSON")
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report
        .as_array()
        .expect("a list of checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no `{name}` check in {report}"))
}

#[test]
fn kvm_verdict_matches_the_loaded_kvm_module() {
    let report = doctor_json();
    let kvm = check(&report, "kvm");
    let pvm = Path::new("/sys/module/kvm_pvm").is_dir();
    let real = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).is_dir());
    if pvm || !Path::new("/dev/kvm").exists() {
        // These development machines: a PVM-backed /dev/kvm must be declared unusable and the
        // host VM recommended.
        assert_eq!(kvm["status"], "fail", "{kvm}");
        assert!(
            kvm["finding"].as_str().unwrap().contains("not usable"),
            "{kvm}"
        );
        assert!(
            kvm["recommendation"]
                .as_str()
                .unwrap()
                .contains("roost hostvm run"),
            "{kvm}"
        );
    } else if real {
        assert_eq!(kvm["status"], "ok", "{kvm}");
    } else {
        assert_eq!(kvm["status"], "warn", "{kvm}");
    }
}

#[test]
fn every_area_is_checked_with_a_recommendation() {
    let report = doctor_json();
    for name in [
        "kvm",
        "userfaultfd",
        "tun",
        "device-mapper",
        "cgroup-v2",
        "cgroup-favordynmods",
        "kvm-nx-huge-pages",
        "disk",
    ] {
        let c = check(&report, name);
        assert!(!c["recommendation"].as_str().unwrap().is_empty(), "{c}");
    }
}

#[test]
fn table_output_names_each_check() {
    let output = Command::new(env!("CARGO_BIN_EXE_roost"))
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    for name in [
        "kvm",
        "userfaultfd",
        "tun",
        "device-mapper",
        "cgroup-v2",
        "cgroup-favordynmods",
        "kvm-nx-huge-pages",
        "disk",
    ] {
        assert!(text.contains(name), "{text}");
    }
}
