//! Value parsers shared by every rule syntax: ports, port ranges, protocols, prefixes, interface names and the
//! `--to` forms. Each error quotes the input it rejects.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use pfwd_common::maps::MAX_BACKENDS;

use super::error::RuleError;
use super::model::{Backend, PortRange, Proto};

/// `-p` value: like iptables, `all` means "no protocol filter".
pub(super) fn parse_proto_opt(s: &str) -> Result<Option<Proto>, RuleError> {
    if s.eq_ignore_ascii_case("all") { Ok(None) } else { s.parse().map(Some) }
}

/// Parses a port number 1-65535; returns the reason on failure so callers can name their own input.
pub(super) fn port_number(s: &str) -> Result<u16, &'static str> {
    // `u16::from_str` accepts a leading '+', which iptables does not.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a port number 1-65535");
    }
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 is not allowed (1-65535)"),
        Ok(p) => Ok(p),
        Err(_) => Err("out of range (1-65535)"),
    }
}

/// Parses a single port 1-65535 (`--to-port`, the port in `--to`).
pub fn parse_port(s: &str) -> Result<u16, RuleError> {
    port_number(s).map_err(|r| RuleError::BadPort { input: s.to_string(), reason: r.to_string() })
}

/// Checks an interface name the way the kernel does (`dev_valid_name`); whether it exists is checked at attach time.
pub fn validate_iface(name: &str) -> Result<(), RuleError> {
    let bad = |reason: &str| RuleError::BadIface { input: name.to_string(), reason: reason.to_string() };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() >= 16 {
        return Err(bad("longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(bad("not a valid name"));
    }
    if name.contains(['/', ':']) || name.chars().any(char::is_whitespace) {
        return Err(bad("must not contain '/', ':' or whitespace"));
    }
    // iptables' `eth+` means every eth*; the data path matches one ifindex, so say so instead of matching nothing.
    if name.ends_with('+') {
        return Err(bad("interface wildcards (eth+) are not supported; add one rule per interface"));
    }
    Ok(())
}

pub(super) fn parse_ipv4(s: &str) -> Result<Ipv4Addr, &'static str> {
    s.parse().map_err(|_| "not an IPv4 address (expected A.B.C.D; names are not resolved)")
}

/// An address of either family (IPv6 without brackets: callers take `[ADDR]:PORT` apart first).
pub(super) fn parse_ip(s: &str) -> Result<IpAddr, &'static str> {
    s.parse().map_err(|_| {
        if s.contains(':') {
            "not an IPv6 address (expected e.g. 2001:db8::1, and [2001:db8::1]:PORT with a port)"
        } else {
            "not an IP address (expected A.B.C.D or an IPv6 address such as 2001:db8::1; names are not resolved)"
        }
    })
}

pub(super) fn check_to_addr(addr: IpAddr) -> Result<(), &'static str> {
    match addr {
        IpAddr::V4(a) if a.is_unspecified() || a.is_broadcast() || a.is_multicast() => Err("not a unicast address"),
        IpAddr::V6(a) if a.is_unspecified() || a.is_multicast() => Err("not a unicast address"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            Err("an IPv4-mapped IPv6 address: write the IPv4 address (the rule is then an IPv4 rule)")
        }
        _ => Ok(()),
    }
}

/// `-s`/`-d` value: `A.B.C.D` (= /32), `A.B.C.D/LEN` or `A.B.C.D/M.M.M.M`, or an IPv6 address (= /128) or
/// `ADDR/LEN`. Host bits are cleared like iptables does.
pub fn parse_cidr(s: &str) -> Result<IpNet, RuleError> {
    let bad = |reason: &str| RuleError::BadCidr { input: s.to_string(), reason: reason.to_string() };
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    // An IPv4 address with a port (`10.0.0.1:80`) is a mistaken IPv4 prefix, not an IPv6 attempt.
    if addr.contains(':') && addr.split(':').next().is_none_or(|a| a.parse::<Ipv4Addr>().is_err()) {
        let addr = match parse_ip(addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(addr)) {
            Ok(IpAddr::V6(a)) => a,
            _ => return Err(bad("not an IPv6 address (expected e.g. 2001:db8::/32)")),
        };
        let len = match len {
            None => 128,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= 128 && l.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(bad("IPv6 prefix length must be 0-128")),
            },
        };
        return Ok(IpNet::V6(Ipv6Net::new(addr, len).map_err(|_| bad("IPv6 prefix length must be 0-128"))?.trunc()));
    }
    let addr = parse_ipv4(addr).map_err(bad)?;
    let len = match len {
        None => 32,
        Some(l) if l.contains('.') => {
            let m = u32::from(parse_ipv4(l).map_err(|_| bad("bad netmask"))?);
            // Only contiguous masks can be expressed as a prefix (and matched by the kernel's mask-and-compare).
            if m.leading_ones() + m.trailing_zeros() != 32 {
                return Err(bad("netmask is not contiguous"));
            }
            m.leading_ones() as u8
        }
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= 32 && l.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(bad("prefix length must be 0-32")),
        },
    };
    Ok(IpNet::V4(Ipv4Net::new(addr, len).map_err(|_| bad("prefix length must be 0-32"))?.trunc()))
}

/// Splits `ADDR[:PORTS]`: `A.B.C.D:80`, `[2001:db8::2]:80` (ip6tables' form), `[2001:db8::2]`, or a bare IPv6
/// address (which then has no port: with several colons, the last one cannot be told from the address's own).
fn split_addr_port<'a>(s: &'a str, bad: &dyn Fn(&str) -> RuleError) -> Result<(&'a str, Option<&'a str>), RuleError> {
    if let Some(rest) = s.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return Err(bad("missing ']' after the IPv6 address (expected [ADDR]:PORT)"));
        };
        return match after {
            "" => Ok((addr, None)),
            _ => match after.strip_prefix(':') {
                Some(ports) => Ok((addr, Some(ports))),
                None => Err(bad("expected [ADDR]:PORT")),
            },
        };
    }
    // `A.B.C.D:1000:2000` is an IPv4 address with a mistaken port part (iptables' LO:HI), not an IPv6 attempt:
    // its error is about the port.
    if s.matches(':').count() > 1 && s.split(':').next().is_none_or(|a| a.parse::<Ipv4Addr>().is_err()) {
        return Ok((s, None));
    }
    Ok(match s.split_once(':') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    })
}

/// The `ADDR[:PORTS]` of a `--to`: one unicast address, and the text after the colon. iptables also takes
/// `ADDR-ADDR` (DNAT load spreading, SNAT address pools); pfwd translates to exactly one address.
fn split_to<'a>(s: &'a str, bad: &dyn Fn(&str) -> RuleError) -> Result<(IpAddr, Option<&'a str>), RuleError> {
    let (addr, ports) = split_addr_port(s, bad)?;
    if addr.contains('-') {
        return Err(bad("address ranges are not supported"));
    }
    let addr = parse_ip(addr).map_err(bad)?;
    check_to_addr(addr).map_err(bad)?;
    Ok((addr, ports))
}

/// DNAT `--to` value: `ADDR` (keep the port) or `ADDR:PORT` (`[ADDR]:PORT` for IPv6).
pub fn parse_to(s: &str) -> Result<(IpAddr, Option<u16>), RuleError> {
    let bad = |reason: &str| RuleError::BadTo { input: s.to_string(), reason: reason.to_string() };
    let (addr, port) = split_to(s, &bad)?;
    let port = match port {
        None => None,
        Some(p) if p.contains('-') => return Err(bad("port ranges are not supported")),
        Some(p) => Some(port_number(p).map_err(bad)?),
    };
    Ok((addr, port))
}

const TOO_MANY: &str = "too many backends";

/// The addresses of an iptables address range `FIRST-LAST` (one family), at most `room`.
fn address_range(lo: IpAddr, hi: IpAddr, room: usize) -> Result<Vec<IpAddr>, &'static str> {
    let (lo, hi, v4) = match (lo, hi) {
        (IpAddr::V4(lo), IpAddr::V4(hi)) => (u128::from(u32::from(lo)), u128::from(u32::from(hi)), true),
        (IpAddr::V6(lo), IpAddr::V6(hi)) => (u128::from(lo), u128::from(hi), false),
        _ => return Err("the address range mixes IPv4 and IPv6"),
    };
    if lo > hi {
        return Err("the address range's first address is above its last");
    }
    if hi - lo >= room as u128 {
        return Err(TOO_MANY);
    }
    // The usual single address: no range to walk.
    if lo == hi {
        let a = if v4 { IpAddr::V4(Ipv4Addr::from(lo as u32)) } else { IpAddr::V6(Ipv6Addr::from(lo)) };
        return Ok(vec![a]);
    }
    Ok((lo..=hi)
        .map(|a| if v4 { IpAddr::V4(Ipv4Addr::from(a as u32)) } else { IpAddr::V6(Ipv6Addr::from(a)) })
        .collect())
}

/// DNAT `--to` value with any number of backends: comma-separated `ADDR[:PORT][@WEIGHT]`, where ADDR may be
/// iptables' address range `A.B.C.D-A.B.C.E` (every address of it, each with the port and weight given). One
/// backend without a weight is the plain `ADDR[:PORT]` of [`parse_to`]. IPv6 backends with a port are written
/// `[ADDR]:PORT` (and a range `[FIRST-LAST]:PORT`, as ip6tables does).
pub fn parse_dnat_to(s: &str) -> Result<Vec<Backend>, RuleError> {
    let bad = |reason: &str| RuleError::BadTo { input: s.to_string(), reason: reason.to_string() };
    let mut out = Vec::new();
    for item in s.split(',') {
        let (spec, weight) = match item.rsplit_once('@') {
            Some((spec, w)) => match w.parse::<u32>() {
                Ok(n) if n >= 1 && w.bytes().all(|b| b.is_ascii_digit()) => (spec, n),
                _ => return Err(bad(&format!("bad weight {w:?} (expected a number 1 or more)"))),
            },
            None => (item, 1),
        };
        let (addrs, port) = split_addr_port(spec, &bad)?;
        let port = match port {
            None => None,
            Some(p) if p.contains('-') => return Err(bad("port ranges are not supported")),
            Some(p) => Some(port_number(p).map_err(bad)?),
        };
        let (lo, hi) = match addrs.split_once('-') {
            Some((lo, hi)) => (parse_ip(lo).map_err(bad)?, parse_ip(hi).map_err(bad)?),
            None => {
                let a = parse_ip(addrs).map_err(bad)?;
                (a, a)
            }
        };
        let room = MAX_BACKENDS.saturating_sub(out.len());
        let range = address_range(lo, hi, room).map_err(|r| match r {
            TOO_MANY => bad(&format!("more than {MAX_BACKENDS} backends")),
            r => bad(r),
        })?;
        for addr in range {
            check_to_addr(addr).map_err(bad)?;
            out.push(Backend { addr, port, weight });
        }
    }
    Ok(out)
}

/// SNAT `--to` value: `ADDR`, `ADDR:PORT` or `ADDR:LO-HI` (`[ADDR]:LO-HI` for IPv6), the ports being the range
/// new source ports come from.
pub fn parse_snat_to(s: &str) -> Result<(IpAddr, Option<PortRange>), RuleError> {
    let bad = |reason: &str| RuleError::BadTo { input: s.to_string(), reason: reason.to_string() };
    let (addr, ports) = split_to(s, &bad)?;
    let ports = match ports {
        None => None,
        Some(p) => {
            let (lo, hi) = p.split_once('-').unwrap_or((p, p));
            let (lo, hi) = (port_number(lo).map_err(bad)?, port_number(hi).map_err(bad)?);
            if lo > hi {
                return Err(bad("the low port is above the high port"));
            }
            Some(PortRange { lo, hi })
        }
    };
    Ok((addr, ports))
}

#[cfg(test)]
mod tests {

    use crate::rules::tests::*;
    use crate::rules::*;

    #[test]
    fn cidr_parsing() {
        assert_eq!(parse_cidr("192.168.1.1").unwrap(), net("192.168.1.1/32"));
        assert_eq!(parse_cidr("192.168.1.0/24").unwrap(), net("192.168.1.0/24"));
        assert_eq!(parse_cidr("192.168.1.5/24").unwrap(), net("192.168.1.0/24"), "host bits cleared like iptables");
        assert_eq!(parse_cidr("10.1.2.3/255.255.0.0").unwrap(), net("10.1.0.0/16"));
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap(), net("0.0.0.0/0"));
        for (bad, why) in [
            ("10.0.0.300/24", "not an IPv4 address"),
            ("10.0.0.0/33", "0-32"),
            ("10.0.0.0/", "0-32"),
            ("10.0.0.0/+8", "0-32"),
            ("example.com", "names are not resolved"),
            ("10.0.0", "not an IPv4 address"),
            ("10.0.0.0/255.0.255.0", "not contiguous"),
            ("", "not an IPv4 address"),
            // Not read as an IPv6 attempt.
            ("10.0.0.1:80", "not an IPv4 address (expected A.B.C.D"),
            ("10.0.0.0:80/24", "not an IPv4 address (expected A.B.C.D"),
        ] {
            let e = parse_cidr(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad CIDR {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
        assert_eq!(
            parse_cidr("10.0.0.300/24").unwrap_err().to_string(),
            "bad CIDR \"10.0.0.300/24\": not an IPv4 address (expected A.B.C.D; names are not resolved)"
        );
    }

    #[test]
    fn to_parsing() {
        assert_eq!(parse_to("127.0.0.1:17355").unwrap(), (ip("127.0.0.1"), Some(17355)));
        assert_eq!(parse_to("10.0.0.2").unwrap(), (ip("10.0.0.2"), None));
        for (bad, why) in [
            ("10.0.0.2:0", "port 0"),
            ("10.0.0.2:65536", "out of range"),
            ("10.0.0.2:", "expected a port"),
            ("10.0.0.2:80-90", "port ranges"),
            ("10.0.0.2:80:90", "expected a port number"),
            ("10.0.0.1-10.0.0.5", "address ranges"),
            ("host:80", "not an IP address (expected A.B.C.D or an IPv6 address"),
            ("host:80", "names are not resolved"),
            ("0.0.0.0", "not a unicast"),
            ("224.0.0.1:80", "not a unicast"),
        ] {
            let e = parse_to(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad --to {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn iface_validation() {
        for good in ["eth0", "wg0", "veth-a.1", "123456789012345"] {
            validate_iface(good).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("1234567890123456", "15 bytes"),
            ("eth0/1", "'/'"),
            ("eth0:1", "':'"),
            ("et h0", "whitespace"),
            ("..", "not a valid"),
            ("eth+", "wildcards"),
        ] {
            let e = validate_iface(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad interface name {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn snat_to_parsing() {
        let r = |lo, hi| Some(PortRange { lo, hi });
        assert_eq!(parse_snat_to("203.0.113.5").unwrap(), (ip("203.0.113.5"), None));
        assert_eq!(parse_snat_to("203.0.113.5:20000-20099").unwrap(), (ip("203.0.113.5"), r(20000, 20099)));
        assert_eq!(parse_snat_to("203.0.113.5:1024").unwrap(), (ip("203.0.113.5"), r(1024, 1024)));
        for (bad, why) in [
            ("203.0.113.5:0", "port 0"),
            ("203.0.113.5:0-10", "port 0"),
            ("203.0.113.5:2000-1000", "low port is above"),
            // iptables' LO:HI is a --dport form; in --to the range is LO-HI (not an IPv6 address either).
            ("203.0.113.5:1000:2000", "expected a port"),
            ("203.0.113.5:1000-70000", "out of range"),
            ("203.0.113.5:", "expected a port"),
            ("203.0.113.5-203.0.113.9", "address ranges"),
            ("0.0.0.0", "not a unicast"),
            ("gw", "not an IP address"),
        ] {
            let e = parse_snat_to(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad --to {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn ipv6_cidr_parsing() {
        assert_eq!(parse_cidr("2001:db8::/32").unwrap(), net("2001:db8::/32"));
        assert_eq!(parse_cidr("2001:db8:1:2::5/32").unwrap(), net("2001:db8::/32"), "host bits cleared");
        assert_eq!(parse_cidr("2001:db8::1").unwrap(), net("2001:db8::1/128"), "a bare address is a /128");
        assert_eq!(parse_cidr("2001:db8::1/128").unwrap(), net("2001:db8::1/128"));
        assert_eq!(parse_cidr("::/0").unwrap(), net("::/0"));
        assert_eq!(parse_cidr("fe80::1%eth0/64").ok(), None, "no zone index");
        for (bad, why) in [
            ("2001:db8::/129", "IPv6 prefix length must be 0-128"),
            ("2001:db8::/", "0-128"),
            ("2001:db8::/+8", "0-128"),
            ("2001:db8::/ffff::", "0-128"),
            ("2001:db8:::1/64", "not an IPv6 address"),
            ("2001:db8::g/64", "not an IPv6 address"),
        ] {
            let e = parse_cidr(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad CIDR {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn ipv6_to_parsing() {
        assert_eq!(parse_to("[2001:db8::2]:8080").unwrap(), (ip("2001:db8::2"), Some(8080)));
        assert_eq!(parse_to("2001:db8::2").unwrap(), (ip("2001:db8::2"), None));
        assert_eq!(parse_to("[2001:db8::2]").unwrap(), (ip("2001:db8::2"), None));
        // ::1 is an address (whether a rule may DNAT to it is the rule's check, not the parser's).
        assert_eq!(parse_to("[::1]:80").unwrap(), (ip("::1"), Some(80)));
        for (bad, why) in [
            ("[2001:db8::2", "missing ']' after the IPv6 address (expected [ADDR]:PORT)"),
            ("[2001:db8::2]x", "expected [ADDR]:PORT"),
            ("[2001:db8::2]:", "expected a port"),
            ("[2001:db8::2]:0", "port 0"),
            ("[2001:db8::2]:80-90", "port ranges"),
            ("[2001:db8::zz]:80", "not an IPv6 address"),
            ("2001:db8::zz", "not an IPv6 address (expected e.g. 2001:db8::1, and [2001:db8::1]:PORT with a port)"),
            ("[2001:db8::2-2001:db8::4]:80", "address ranges"),
            ("ff02::1", "not a unicast address"),
            ("[ff02::1]:80", "not a unicast address"),
            ("::", "not a unicast address"),
            ("::ffff:10.0.0.1", "an IPv4-mapped IPv6 address: write the IPv4 address"),
        ] {
            let e = parse_to(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad --to {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
        let r = |lo, hi| Some(PortRange { lo, hi });
        assert_eq!(parse_snat_to("[2001:db8::1]:20000-20099").unwrap(), (ip("2001:db8::1"), r(20000, 20099)));
        assert_eq!(parse_snat_to("[2001:db8::1]:5000").unwrap(), (ip("2001:db8::1"), r(5000, 5000)));
        assert_eq!(parse_snat_to("2001:db8::1").unwrap(), (ip("2001:db8::1"), None));
        for (bad, why) in [
            ("[2001:db8::1]:2000-1000", "low port is above"),
            ("[2001:db8::1", "missing ']'"),
            ("2001:db8::1-2001:db8::9", "address ranges"),
            ("::ffff:203.0.113.5", "IPv4-mapped"),
        ] {
            let e = parse_snat_to(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad --to {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn ipv6_backends_parsing() {
        let b = |a: &str, port, weight| Backend { addr: ip(a), port, weight };
        assert_eq!(
            parse_dnat_to("[2001:db8::2]:80,[2001:db8::3]:80@2").unwrap(),
            [b("2001:db8::2", Some(80), 1), b("2001:db8::3", Some(80), 2)]
        );
        assert_eq!(
            parse_dnat_to("2001:db8::2,2001:db8::3@3").unwrap(),
            [b("2001:db8::2", None, 1), b("2001:db8::3", None, 3)]
        );
        // ip6tables' range form: [FIRST-LAST]:PORT, every address with the port.
        assert_eq!(
            parse_dnat_to("[2001:db8::2-2001:db8::4]:80").unwrap(),
            [b("2001:db8::2", Some(80), 1), b("2001:db8::3", Some(80), 1), b("2001:db8::4", Some(80), 1)]
        );
        assert_eq!(
            parse_dnat_to("2001:db8::ff-2001:db8::100@2").unwrap(),
            [b("2001:db8::ff", None, 2), b("2001:db8::100", None, 2)],
            "a range across a 16-bit group"
        );
        for (bad, why) in [
            ("10.0.0.1-2001:db8::4", "the address range mixes IPv4 and IPv6"),
            ("[2001:db8::2-10.0.0.4]:80", "the address range mixes IPv4 and IPv6"),
            ("[2001:db8::4-2001:db8::2]:80", "first address is above its last"),
            ("2001:db8::-2001:db8:0:0:1::", "more than 255 backends"),
            ("[2001:db8::2]:80,[2001:db8::3", "missing ']'"),
            ("[2001:db8::2]:80,ff02::1", "not a unicast"),
            ("[2001:db8::2]:80@0", "bad weight \"0\""),
        ] {
            let e = parse_dnat_to(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad --to {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
    }
}
