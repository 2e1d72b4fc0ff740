//! Local APIC set-up: LINT0 delivers ExtINT (the PIC, for virtual-wire mode) and LINT1 NMI, as
//! a PC BIOS leaves them.

use kvm_bindings::kvm_lapic_state;

/// Offset of LVT LINT0 in the APIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of LVT LINT1.
pub const APIC_LVT1: usize = 0x360;
/// Delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// Delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;

/// Reads a 32-bit APIC register.
pub fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i].to_ne_bytes()[0]);
    u32::from_le_bytes(bytes)
}

/// Writes a 32-bit APIC register.
pub fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = std::ffi::c_char::from_ne_bytes([byte]);
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Configures LINT0/LINT1 in `lapic`.
pub fn set_boot_lints(lapic: &mut kvm_lapic_state) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    set_reg(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lints_get_extint_and_nmi_keeping_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        set_reg(&mut lapic, APIC_LVT0, 0x0001_0000 | 0x300);
        set_boot_lints(&mut lapic);
        assert_eq!(get_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_reg(&lapic, APIC_LVT1), 0x400);
    }
}
