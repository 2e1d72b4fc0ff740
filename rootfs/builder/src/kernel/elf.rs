//! A minimal check of the built `vmlinux`: a 64-bit little-endian x86-64 ELF that carries the
//! PVH entry note (`Xen` note of type `XEN_ELFNOTE_PHYS32_ENTRY`), which QEMU's microvm machine
//! and linux-loader's ELF loader need to boot it directly.

/// ELF note type of the 32-bit physical PVH entry point (xen/include/public/elfnote.h).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;

/// Why an image is not a bootable PVH vmlinux.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ElfProblem {
    #[error("it is not a 64-bit little-endian x86-64 ELF file")]
    NotElf64,
    #[error("its program headers lie outside the file")]
    Truncated,
    #[error("it has no PVH entry note (is CONFIG_PVH set?)")]
    NoPvhNote,
}

fn u16_at(data: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        data.get(offset..offset.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(data: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(offset..offset.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(data: &[u8], offset: usize) -> Option<usize> {
    let value = u64::from_le_bytes(data.get(offset..offset.checked_add(8)?)?.try_into().ok()?);
    usize::try_from(value).ok()
}

/// Checks that `image` is an x86-64 ELF with a PVH entry note.
pub fn check_pvh_vmlinux(image: &[u8]) -> Result<(), ElfProblem> {
    // e_ident: magic, ELFCLASS64 (2), ELFDATA2LSB (1); then e_machine.
    if image.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) || u16_at(image, 18) != Some(EM_X86_64)
    {
        return Err(ElfProblem::NotElf64);
    }
    let phoff = u64_at(image, 32).ok_or(ElfProblem::Truncated)?;
    let phentsize = usize::from(u16_at(image, 54).ok_or(ElfProblem::Truncated)?);
    let phnum = usize::from(u16_at(image, 56).ok_or(ElfProblem::Truncated)?);
    for index in 0..phnum {
        let header = index
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(ElfProblem::Truncated)?;
        if u32_at(image, header).ok_or(ElfProblem::Truncated)? != PT_NOTE {
            continue;
        }
        let offset = u64_at(image, header + 8).ok_or(ElfProblem::Truncated)?;
        let size = u64_at(image, header + 32).ok_or(ElfProblem::Truncated)?;
        let end = offset.checked_add(size).ok_or(ElfProblem::Truncated)?;
        let notes = image.get(offset..end).ok_or(ElfProblem::Truncated)?;
        if has_pvh_note(notes) {
            return Ok(());
        }
    }
    Err(ElfProblem::NoPvhNote)
}

/// Walks a note segment: (namesz, descsz, type, name padded to 4, desc padded to 4)*.
fn has_pvh_note(mut notes: &[u8]) -> bool {
    let pad4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    while let (Some(namesz), Some(descsz), Some(kind)) =
        (u32_at(notes, 0), u32_at(notes, 4), u32_at(notes, 8))
    {
        let (Ok(namesz), Ok(descsz)) = (usize::try_from(namesz), usize::try_from(descsz)) else {
            return false;
        };
        let name = notes.get(12..12 + namesz.min(notes.len()));
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == Some(b"Xen\0".as_slice()) {
            return true;
        }
        let next = pad4(namesz)
            .zip(pad4(descsz))
            .and_then(|(n, d)| n.checked_add(d))
            .and_then(|len| len.checked_add(12));
        match next.and_then(|next| notes.get(next..)) {
            Some(rest) if !rest.is_empty() => notes = rest,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF header with one PT_NOTE program header pointing at `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 64 + 56];
        image[..6].copy_from_slice(b"\x7fELF\x02\x01");
        image[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        image[32..40].copy_from_slice(&64u64.to_le_bytes());
        image[54..56].copy_from_slice(&56u16.to_le_bytes());
        image[56..58].copy_from_slice(&1u16.to_le_bytes());
        image[64..68].copy_from_slice(&PT_NOTE.to_le_bytes());
        image[72..80].copy_from_slice(&120u64.to_le_bytes());
        image[96..104].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        image.extend_from_slice(notes);
        image
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for len in [name.len(), desc.len()] {
            out.extend_from_slice(&u32::try_from(len).unwrap().to_le_bytes());
        }
        out.extend_from_slice(&kind.to_le_bytes());
        for part in [name, desc] {
            out.extend_from_slice(part);
            out.resize(out.len().next_multiple_of(4), 0);
        }
        out
    }

    #[test]
    fn finds_the_pvh_note_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0, 0, 0, 1]));
        assert_eq!(check_pvh_vmlinux(&elf_with_notes(&notes)), Ok(()));
    }

    #[test]
    fn rejects_images_without_the_note_or_not_elf() {
        let notes = note(b"Xen\0", 17, &[0; 8]);
        assert_eq!(
            check_pvh_vmlinux(&elf_with_notes(&notes)),
            Err(ElfProblem::NoPvhNote)
        );
        assert_eq!(
            check_pvh_vmlinux(b"MZ not an elf"),
            Err(ElfProblem::NotElf64)
        );
        let mut truncated = elf_with_notes(&notes);
        truncated.truncate(100);
        assert_eq!(check_pvh_vmlinux(&truncated), Err(ElfProblem::Truncated));
    }
}
