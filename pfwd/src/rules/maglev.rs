//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) for DNAT rules with several backends: a lookup table of
//! [`MAGLEV_SIZE`] entries (a prime), each naming a backend. The kernel indexes it with
//! [`pfwd_common::flow_hash`] of a new flow's tuple modulo the size. Every backend walks its own permutation of the
//! table (an offset and a skip derived from its address and port) and takes its next free entry in turn, `weight`
//! entries per round, until the table is full: so each backend owns a share of the entries proportional to its
//! weight, and adding or removing a backend changes few entries besides the ones it takes or frees.
//!
//! The table depends only on the set of backends (they are walked sorted by address and port, not in the order the
//! rule lists them), so rewriting a rule with the same backends in another order moves no flow.

use pfwd_common::maps::{BackendEntry, MAGLEV_SIZE};

use super::model::Backend;

/// A 64-bit FNV-1a of `bytes` after `seed`, finished with SplitMix64's mixer: the permutation's offset and skip.
fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The Maglev table of `backends` (at least one, total weight at most the table size): entry `i` is the index in
/// `backends` of the backend that new flows with hash `i` go to.
pub fn table(backends: &[Backend]) -> Vec<u16> {
    let m = MAGLEV_SIZE as usize;
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| (backends[i].addr, backends[i].port));
    let perm: Vec<(usize, usize)> = order
        .iter()
        .map(|&i| {
            let b = &backends[i];
            let mut name = match b.addr {
                std::net::IpAddr::V4(a) => a.octets().to_vec(),
                std::net::IpAddr::V6(a) => a.octets().to_vec(),
            };
            name.extend_from_slice(&b.port.unwrap_or(0).to_be_bytes());
            let offset = (hash(1, &name) % m as u64) as usize;
            let skip = (hash(2, &name) % (m as u64 - 1) + 1) as usize;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; order.len()];
    let mut entry: Vec<Option<u16>> = vec![None; m];
    let mut filled = 0;
    // Each round, every backend takes `weight` entries: its next free ones along its permutation (which visits every
    // entry, the size being prime).
    while filled < m {
        for (k, &i) in order.iter().enumerate() {
            for _ in 0..backends[i].weight {
                let (offset, skip) = perm[k];
                let mut c = (offset + next[k] * skip) % m;
                while entry[c].is_some() {
                    next[k] += 1;
                    c = (offset + next[k] * skip) % m;
                }
                entry[c] = Some(i as u16);
                next[k] += 1;
                filled += 1;
                if filled == m {
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    entry.into_iter().map(|e| e.expect("the table is full")).collect()
}

/// The table as the kernel's map values: each entry's backend address (network order) and port (0 keeps the
/// original one).
pub fn entries(backends: &[Backend]) -> Vec<BackendEntry> {
    table(backends)
        .into_iter()
        .map(|i| {
            let b = &backends[i as usize];
            BackendEntry { addr: super::compile::wide(b.addr), port: b.port.unwrap_or(0), _pad: 0 }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use pfwd_common::{Tuple, flow_hash};

    use super::*;
    use crate::rules::tests::{Rng, ip};

    const FLOWS: usize = 100_000;

    fn backends(spec: &[(&str, u32)]) -> Vec<Backend> {
        spec.iter().map(|&(a, weight)| Backend { addr: ip(a), port: Some(80), weight }).collect()
    }

    /// Random client tuples to one service address, as a busy service sees them.
    fn tuples() -> Vec<Tuple> {
        let mut rng = Rng(7);
        (0..FLOWS)
            .map(|_| Tuple {
                saddr: rng.next() as u32,
                daddr: u32::from_ne_bytes([203, 0, 113, 10]),
                sport: (1024 + rng.below(64_000)) as u16,
                dport: 80,
                proto: 6,
                _pad: 0,
                _pad2: 0,
            })
            .collect()
    }

    /// The backend address each tuple goes to.
    fn assign(b: &[Backend], ts: &[Tuple]) -> Vec<std::net::IpAddr> {
        let t = table(b);
        ts.iter().map(|x| b[t[(flow_hash(x) % MAGLEV_SIZE) as usize] as usize].addr).collect()
    }

    fn share(of: std::net::IpAddr, a: &[std::net::IpAddr]) -> f64 {
        a.iter().filter(|&&x| x == of).count() as f64 / a.len() as f64
    }

    /// The spread and move figures of `cargo xtask bench` (issue 14): 100,000 flows over 3 backends land within 5% of
    /// even, and adding a fourth moves within 2 points of 25% of them (all to the new one).
    #[test]
    fn spread_and_moves() {
        let ts = tuples();
        let three = backends(&[("10.0.2.2", 1), ("10.0.2.3", 1), ("10.0.2.4", 1)]);
        let before = assign(&three, &ts);
        for b in &three {
            let s = share(b.addr, &before);
            assert!((s - 1.0 / 3.0).abs() <= 0.05 / 3.0, "{}: {s}", b.addr);
        }
        let mut four = three.clone();
        four.push(Backend { addr: ip("10.0.2.5"), port: Some(80), weight: 1 });
        let after = assign(&four, &ts);
        let moved: Vec<usize> = (0..FLOWS).filter(|&i| before[i] != after[i]).collect();
        let moved_share = moved.len() as f64 / FLOWS as f64;
        assert!((moved_share - 0.25).abs() <= 0.02, "moved {moved_share}");
        let to_new = moved.iter().filter(|&&i| after[i] == ip("10.0.2.5")).count();
        assert!(to_new as f64 >= 0.95 * moved.len() as f64, "{to_new} of {} moved to the new backend", moved.len());
        println!("spread over 3: {:?}", three.iter().map(|b| share(b.addr, &before)).collect::<Vec<_>>());
        println!("moved by adding a 4th: {moved_share}");
        // Removing one of four moves its flows and hardly any other.
        let removed = assign(&three, &ts);
        let others_moved = (0..FLOWS).filter(|&i| after[i] != ip("10.0.2.5") && after[i] != removed[i]).count();
        assert_eq!(removed, before, "the same set of backends gives the same table");
        assert!(others_moved as f64 <= 0.02 * FLOWS as f64, "{others_moved} flows of staying backends moved");
    }

    #[test]
    fn weights_and_order() {
        let ts = tuples();
        let b = backends(&[("10.0.2.2", 1), ("10.0.2.3", 2), ("10.0.2.4", 1)]);
        let a = assign(&b, &ts);
        for (addr, want) in [("10.0.2.2", 0.25), ("10.0.2.3", 0.5), ("10.0.2.4", 0.25)] {
            let s = share(ip(addr), &a);
            assert!((s - want).abs() <= 0.05 * want, "{addr}: {s}, want {want}");
        }
        // The table entries are shared by weight, to the entry.
        let t = table(&b);
        let count = |i: u16| t.iter().filter(|&&x| x == i).count() as i64;
        assert!((count(1) - 2 * count(0)).abs() <= 2 && (count(0) - count(2)).abs() <= 1);
        // The order the rule lists them in does not matter.
        let mut reversed = b.clone();
        reversed.reverse();
        assert_eq!(assign(&reversed, &ts), a);
        // The kernel's values: network-order address and the port.
        let e = entries(&b);
        assert_eq!(e.len(), MAGLEV_SIZE as usize);
        assert!(e.iter().all(|x| x.port == 80));
        assert!(e.iter().any(|x| x.addr == [u32::from_ne_bytes([10, 0, 2, 3]), 0, 0, 0]));
        // One backend owns the whole table; the most backends still each get entries.
        assert!(table(&backends(&[("10.0.0.1", 1)])).iter().all(|&x| x == 0));
        let many: Vec<Backend> =
            (1..=255u32).map(|i| Backend::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), None)).collect();
        let t = table(&many);
        assert!((0..255u16).all(|i| t.iter().filter(|&&x| x == i).count() >= 15));
    }
}
