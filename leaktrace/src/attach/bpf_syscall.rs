//! The `bpf(2)` commands that aya 0.14 does not wrap, on descriptors it created: the
//! uprobe_multi links' loads (`multi`) and the batched writes of the unwinding rows.

use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

/// Size of `union bpf_attr` passed: the kernel takes any size up to its own, zeroes the rest.
pub const ATTR_BYTES: usize = 128;

/// `BPF_MAP_UPDATE_BATCH` (include/uapi/linux/bpf.h, Linux 5.6+).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// A command that returns a new descriptor.
pub fn bpf(command: libc::c_long, attr: &mut [u8; ATTR_BYTES]) -> std::io::Result<OwnedFd> {
    let fd = bpf_status(command, attr)?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A command that returns a number (0, or a descriptor).
pub fn bpf_status(command: libc::c_long, attr: &mut [u8; ATTR_BYTES]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a bpf_attr of the size passed, whose pointers point to live buffers
    // for the duration of the call (the caller's promise, kept by every caller here).
    let status = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), ATTR_BYTES) };
    if status < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(status)
}

/// Writes `bytes` at `at` of a bpf_attr.
pub fn put<const N: usize>(attr: &mut [u8; ATTR_BYTES], at: usize, bytes: [u8; N]) {
    attr[at..at + N].copy_from_slice(&bytes);
}

/// Writes `values[i]` at `keys[i]` of the map `map` in one `BPF_MAP_UPDATE_BATCH` command:
/// one system call for the lot, where an update per element costs a system call each
/// (docs/BENCHMARKS.md). Err when the kernel has no batches for the map
/// (before 5.6: `EINVAL`) or an element could not be written; elements before it are written.
///
/// `K` and `V` must be the map's key and value types, plain data without padding.
pub fn update_batch<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> std::io::Result<()> {
    if keys.len() != values.len() {
        // The kernel would read `count` values past the end of the shorter slice.
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a batch needs a value per key",
        ));
    }
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = [0u8; ATTR_BYTES];
    // struct { in_batch, out_batch, keys, values: u64; count, map_fd: u32; elem_flags, flags }
    put(&mut attr, 16, (keys.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 24, (values.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 32, (keys.len() as u32).to_ne_bytes());
    put(&mut attr, 36, (map.as_raw_fd() as u32).to_ne_bytes());
    bpf_status(BPF_MAP_UPDATE_BATCH, &mut attr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[test]
    fn a_batch_without_a_value_per_key_is_refused_before_the_kernel_sees_it() {
        let stdin = std::io::stdin();
        let err = update_batch(stdin.as_fd(), &[1u32, 2], &[7u64]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        // An empty batch writes nothing and asks nothing of the kernel (stdin is no map).
        update_batch::<u32, u64>(stdin.as_fd(), &[], &[]).unwrap();
    }
}
