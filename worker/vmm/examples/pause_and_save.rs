//! Boots a VM, waits for roost-agent's ready line, pauses it and saves its KVM state, resumes
//! it, saves again, stops it, and prints a JSON summary on stdout. Used by the host-VM test
//! `tests/state_in_host_vm.rs` (needs a usable /dev/kvm).
//!
//! Usage: pause_and_save KERNEL ROOTFS VCPUS

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use roost_vmm::config::{DriveConfig, SerialConfig};
use roost_vmm::state::MachineState;
use roost_vmm::{Privileges, VmConfig, VmExit};

fn summary(state: &MachineState) -> serde_json::Value {
    let vcpus: Vec<serde_json::Value> = state
        .vcpus
        .iter()
        .map(|v| {
            let leaf1 = v.cpuid.iter().find(|e| e.function == 1);
            serde_json::json!({
                "index": v.index,
                "rip": v.regs.rip,
                "msrs": v.msrs.len(),
                "xsave_words": v.xsave.len(),
                "apic_id": leaf1.map(|e| e.ebx >> 24),
                "hypervisor_bit": leaf1.map(|e| e.ecx >> 31 == 1),
                "efer_lma": v.sregs.efer & 0x400 != 0,
            })
        })
        .collect();
    serde_json::json!({
        "vcpus": vcpus,
        "clock": state.vm.clock.clock,
        "ioapic_chip": state.vm.ioapic.chip_id,
        "json_bytes": serde_json::to_vec(state).map(|v| v.len()).unwrap_or(0),
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, kernel, rootfs, vcpus] = args.as_slice() else {
        bail!("usage: pause_and_save KERNEL ROOTFS VCPUS");
    };
    let log = std::env::temp_dir().join(format!("pause_and_save-{}.log", std::process::id()));
    let mut config = VmConfig::new(
        kernel,
        "console=ttyS0 reboot=t panic=-1 root=/dev/vda ro rootfstype=ext4 quiet",
    );
    config.vcpus = vcpus.parse().context("VCPUS")?;
    config.rootfs = Some(DriveConfig {
        path: PathBuf::from(rootfs),
        read_only: true,
        overlay: None,
    });
    config.serial = SerialConfig {
        log_path: Some(log.clone()),
        to_stdout: false,
    };
    let vm = roost_vmm::build(&config)?.start(Privileges::Drop)?;
    let deadline = Instant::now() + Duration::from_secs(180);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("roost-agent: ready")
    {
        if Instant::now() > deadline {
            bail!("no ready line within 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = vm.save_state().context("first save")?;
    vm.resume();
    std::thread::sleep(Duration::from_millis(300));
    let second = vm.save_state().context("second save")?;
    vm.resume();
    vm.stopper().request(VmExit::Stopped);
    let exit = vm.wait();
    let _ = std::fs::remove_file(&log);
    println!(
        "{}",
        serde_json::json!({
            "first": summary(&first),
            "second": summary(&second),
            "exit": exit.to_string(),
        })
    );
    Ok(())
}
