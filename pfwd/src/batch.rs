//! Batched map writes and array reads: `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+), which aya
//! 0.14 does not wrap.
//! One syscall writes thousands of entries, where one `bpf_map_update_elem` each made installing 100,000 rules take
//! seconds. A kernel without them (`EINVAL`, `ENOTSUPP`) gets the entries one at a time instead.
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use anyhow::{Context, Result};
use aya::Pod;
use aya::maps::MapData;

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Linux's ENOTSUPP (not in libc: it is kernel-internal, yet the batch commands return it).
const ENOTSUPP: i32 = 524;
/// Entries per syscall: bounded so one call never holds the map's locks long.
const CHUNK: usize = 8192;

/// `union bpf_attr` for the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` for the one-element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid, fully initialised prefix of bpf_attr for `cmd`; the pointers in it point at live
    // slices of the sizes the map expects (checked by the callers against the map's key and value sizes).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// A pinned map opened for batched writes.
pub struct Batch {
    map: MapData,
    name: String,
}

impl Batch {
    pub fn open(path: &Path) -> Result<Batch> {
        let map = MapData::from_pin(path).with_context(|| format!("opening pinned map {}", path.display()))?;
        Ok(Batch { map, name: path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()) })
    }

    fn fd(&self) -> u32 {
        self.map.fd().as_fd().as_raw_fd() as u32
    }

    /// Checks the map's key and value sizes (a value size of 0 checks the key only).
    fn check<K, V>(&self) -> Result<()> {
        let info = self.map.info()?;
        anyhow::ensure!(
            info.key_size() as usize == size_of::<K>()
                && (size_of::<V>() == 0 || info.value_size() as usize == size_of::<V>()),
            "map {} has key/value sizes {}/{}, not {}/{}",
            self.name,
            info.key_size(),
            info.value_size(),
            size_of::<K>(),
            size_of::<V>()
        );
        Ok(())
    }

    /// Writes every `(key, value)` (insert or replace).
    pub fn update<K: Pod, V: Pod>(&self, entries: &[(K, V)]) -> Result<()> {
        self.check::<K, V>()?;
        for chunk in entries.chunks(CHUNK) {
            let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
            let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
            let mut attr = BatchAttr {
                keys: keys.as_ptr() as u64,
                values: values.as_ptr() as u64,
                count: chunk.len() as u32,
                map_fd: self.fd(),
                ..Default::default()
            };
            match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(ENOTSUPP)) => {
                    for (k, v) in chunk {
                        let mut one = ElemAttr {
                            map_fd: self.fd(),
                            key: k as *const K as u64,
                            value: v as *const V as u64,
                            ..Default::default()
                        };
                        bpf(BPF_MAP_UPDATE_ELEM, &mut one).with_context(|| format!("writing map {}", self.name))?;
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("writing {} entries of map {}", chunk.len(), self.name));
                }
            }
        }
        Ok(())
    }

    /// Up to `count` entries `(index, value)` of an array map from index `from` on (fewer at the array's end).
    pub fn read_array<V: Pod>(&self, from: u32, count: u32) -> Result<Vec<(u32, V)>> {
        self.check::<u32, V>()?;
        let mut keys = vec![0u32; count as usize];
        // SAFETY: Pod values are valid for any bytes, zeroes included.
        let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; count as usize];
        // The kernel starts after the key `in_batch` names (none: from the first).
        let (after, mut next) = (from.wrapping_sub(1), 0u32);
        let mut attr = BatchAttr {
            in_batch: if from == 0 { 0 } else { &after as *const u32 as u64 },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count,
            map_fd: self.fd(),
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(()) => {}
            // The end of the array: `count` says how many it read.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e).with_context(|| format!("reading map {}", self.name)),
        }
        let n = attr.count as usize;
        Ok(keys.into_iter().zip(values).take(n).collect())
    }

    /// Deletes `keys`; keys that are not there are skipped.
    pub fn delete<K: Pod>(&self, keys: &[K]) -> Result<()> {
        self.check::<K, ()>()?;
        for k in keys {
            // BPF_MAP_DELETE_BATCH stops at the first missing key: one at a time (deletes are few per change).
            let mut one = ElemAttr { map_fd: self.fd(), key: k as *const K as u64, ..Default::default() };
            match bpf(BPF_MAP_DELETE_ELEM, &mut one) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).with_context(|| format!("deleting from map {}", self.name)),
            }
        }
        Ok(())
    }
}
