//! Pausing a running VM and saving its KVM state, on real KVM inside the host VM: the
//! `pause_and_save` example boots the base image with 2 vCPUs to the ready line, saves twice
//! around a resume, and stops the VM. Needs qemu-system-x86 and the `kernel` and `rootfs-base`
//! artefacts; fails with a message without them.

use std::path::PathBuf;
use std::time::Duration;

use roost_hostvm::HostVm;
use roost_images::{ArtefactIndex, Cache};

/// The example binary built by `cargo test` next to this test's profile directory.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let path = profile_dir.join("examples/pause_and_save");
    assert!(
        path.exists(),
        "{} is missing: run this test through `cargo test -p roost-vmm`, which builds examples",
        path.display()
    );
    path
}

#[test]
fn pause_and_save_state_in_host_vm() {
    let index = ArtefactIndex::new(&Cache::from_env().expect("a cache directory"));
    for name in ["kernel", "rootfs-base"] {
        if let Err(e) = index.lookup(name) {
            panic!("this test needs the `{name}` artefact (run `roost images build`): {e}");
        }
    }
    let script = "K=$(sed -n 's/.*\"path\": \"\\(.*\\)\".*/\\1/p' $ROOST_CACHE_DIR/index/kernel.json)\n\
                  R=$(sed -n 's/.*\"path\": \"\\(.*\\)\".*/\\1/p' $ROOST_CACHE_DIR/index/rootfs-base.json)\n\
                  timeout 300 /opt/test/pause_and_save \"$K\" \"$R\" 2";
    let outcome = HostVm::builder()
        .timeout(Duration::from_secs(540))
        .capture_output()
        .file("/opt/test/pause_and_save", example())
        .run(["sh", "-c", script])
        .expect("host VM run");
    let stdout = String::from_utf8_lossy(&outcome.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&outcome.stderr).into_owned();
    assert_eq!(outcome.exit_code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary; stdout:\n{stdout}\nstderr:\n{stderr}"));
    let report: serde_json::Value = serde_json::from_str(line).unwrap();
    for save in ["first", "second"] {
        let vcpus = report[save]["vcpus"].as_array().expect("vcpus");
        assert_eq!(vcpus.len(), 2, "{report}");
        for (i, vcpu) in vcpus.iter().enumerate() {
            assert_eq!(vcpu["index"], i, "{report}");
            assert_eq!(
                vcpu["apic_id"], i,
                "normalised CPUID carries the APIC id: {report}"
            );
            assert_eq!(vcpu["hypervisor_bit"], true, "{report}");
            assert_eq!(
                vcpu["efer_lma"], true,
                "the guest runs in long mode: {report}"
            );
            assert!(vcpu["msrs"].as_u64().unwrap() > 20, "{report}");
            assert_eq!(vcpu["xsave_words"], 1024, "{report}");
        }
        assert_eq!(report[save]["ioapic_chip"], 2, "{report}");
    }
    let (c1, c2) = (
        report["first"]["clock"].as_u64().unwrap(),
        report["second"]["clock"].as_u64().unwrap(),
    );
    assert!(c2 > c1, "the guest clock advanced while resumed: {report}");
    assert_eq!(report["exit"], "VM stopped by the host", "{report}");
}
