//! One virtio-blk request: parse the header from the descriptor chain, check it against the
//! disk, do the I/O, write the status byte. Every length and sector comes from the guest and
//! is checked with overflow-safe arithmetic before touching the file. Data moves through the
//! device's bounce buffer (allocated once, so steady-state I/O does not allocate).

use std::io::{Read, Write};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::device::{Disk, SECTOR_SIZE};
use crate::devices::virtio::ratelimit::guest_warn;

/// Size of the request header (`struct virtio_blk_outhdr`: type, ioprio, sector).
const HEADER_LEN: usize = 16;
/// Bounce-buffer size for copying between the file and guest memory.
pub const CHUNK: usize = 64 * 1024;
/// Length of a GET_ID answer.
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Outcome of a request that reached the status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    IoErr,
    Unsupported,
}

impl Status {
    fn byte(self) -> u8 {
        let code = match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupported => VIRTIO_BLK_S_UNSUPP,
        };
        u8::try_from(code).unwrap_or(u8::MAX)
    }
}

/// Executes the request in `chain`; returns the number of bytes written to the guest (data and
/// status), the length for the used ring. A malformed chain without a status byte gets 0.
pub fn execute(
    disk: &mut Disk,
    bounce: &mut [u8],
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
        (Ok(reader), Ok(writer)) => (reader, writer),
        (Err(err), _) | (_, Err(err)) => {
            guest_warn!(%err, "virtio-blk: invalid descriptor chain");
            return 0;
        }
    };
    let Some(status_offset) = writer.available_bytes().checked_sub(1) else {
        guest_warn!("virtio-blk: request without a status byte");
        return 0;
    };
    let mut status_writer = match writer.split_at(status_offset) {
        Ok(status_writer) => status_writer,
        Err(err) => {
            guest_warn!(%err, "virtio-blk: cannot address the status byte");
            return 0;
        }
    };
    let status = serve(disk, bounce, &mut reader, &mut writer);
    let data_written = writer.bytes_written();
    if let Err(err) = status_writer.write_all(&[status.byte()]) {
        guest_warn!(%err, "virtio-blk: cannot write the status byte");
        return 0;
    }
    u32::try_from(data_written.saturating_add(1)).unwrap_or(u32::MAX)
}

fn serve(
    disk: &mut Disk,
    bounce: &mut [u8],
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
) -> Status {
    let mut header = [0u8; HEADER_LEN];
    if reader.read_exact(&mut header).is_err() {
        guest_warn!("virtio-blk: request header too short");
        return Status::IoErr;
    }
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    match request_type {
        VIRTIO_BLK_T_IN => read_sectors(disk, bounce, sector, writer),
        VIRTIO_BLK_T_OUT => write_sectors(disk, bounce, sector, reader),
        VIRTIO_BLK_T_FLUSH => flush(disk),
        VIRTIO_BLK_T_GET_ID => write_id(disk, writer),
        other => {
            guest_warn!(request_type = other, "virtio-blk: unsupported request type");
            Status::Unsupported
        }
    }
}

/// Byte offset of `sector` if `[sector, sector + len)` lies on the disk and `len` is whole
/// sectors.
fn checked_range(disk: &Disk, sector: u64, len: usize) -> Option<u64> {
    let len = u64::try_from(len).ok()?;
    if len % SECTOR_SIZE != 0 {
        guest_warn!(len, "virtio-blk: transfer is not a whole number of sectors");
        return None;
    }
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    if end > disk.capacity_bytes() {
        guest_warn!(
            sector,
            len,
            "virtio-blk: transfer beyond the end of the disk"
        );
        return None;
    }
    Some(offset)
}

fn read_sectors(disk: &Disk, buf: &mut [u8], sector: u64, writer: &mut Writer<'_>) -> Status {
    let len = writer.available_bytes();
    let Some(mut offset) = checked_range(disk, sector, len) else {
        return Status::IoErr;
    };
    let mut remaining = len;
    while remaining > 0 {
        let n = remaining.min(buf.len());
        if let Err(err) = disk.backend().read_at(&mut buf[..n], offset) {
            tracing::error!(%err, offset, "virtio-blk: image read failed");
            return Status::IoErr;
        }
        if let Err(err) = writer.write_all(&buf[..n]) {
            guest_warn!(%err, "virtio-blk: cannot write to guest memory");
            return Status::IoErr;
        }
        remaining -= n;
        offset += n as u64;
    }
    Status::Ok
}

fn write_sectors(disk: &mut Disk, buf: &mut [u8], sector: u64, reader: &mut Reader<'_>) -> Status {
    if disk.read_only() {
        guest_warn!("virtio-blk: write to a read-only disk refused");
        return Status::IoErr;
    }
    let len = reader.available_bytes();
    let Some(mut offset) = checked_range(disk, sector, len) else {
        return Status::IoErr;
    };
    let mut remaining = len;
    while remaining > 0 {
        let n = remaining.min(buf.len());
        if let Err(err) = reader.read_exact(&mut buf[..n]) {
            guest_warn!(%err, "virtio-blk: cannot read guest memory");
            return Status::IoErr;
        }
        if let Err(err) = disk.backend_mut().write_at(&buf[..n], offset) {
            tracing::error!(%err, offset, "virtio-blk: image write failed");
            return Status::IoErr;
        }
        remaining -= n;
        offset += n as u64;
    }
    Status::Ok
}

fn flush(disk: &mut Disk) -> Status {
    if disk.read_only() {
        return Status::Ok;
    }
    match disk.backend_mut().flush() {
        Ok(()) => Status::Ok,
        Err(err) => {
            tracing::error!(%err, "virtio-blk: image flush failed");
            Status::IoErr
        }
    }
}

fn write_id(disk: &Disk, writer: &mut Writer<'_>) -> Status {
    let n = writer.available_bytes().min(ID_LEN);
    match writer.write_all(&disk.id()[..n]) {
        Ok(()) => Status::Ok,
        Err(err) => {
            guest_warn!(%err, "virtio-blk: cannot write the disk id");
            Status::IoErr
        }
    }
}
