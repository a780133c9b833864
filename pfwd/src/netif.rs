//! Network interface facts: index by name, primary IPv4 address, local addresses.
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};

pub fn ifindex(name: &str) -> Result<u32> {
    match nix::net::if_::if_nametoindex(name) {
        Ok(i) => Ok(i),
        Err(_) => {
            let known: Vec<String> = nix::net::if_::if_nameindex()
                .map(|l| l.iter().map(|i| i.name().to_string_lossy().into()).collect())
                .unwrap_or_default();
            bail!("unknown interface {name:?} in this network namespace (interfaces here: {})", known.join(", "))
        }
    }
}

/// The link-layer (MAC) address of an Ethernet-type interface `name`, if it has one.
pub fn mac(name: &str) -> Option<[u8; 6]> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        (a.interface_name == name).then_some(())?;
        a.address?.as_link_addr()?.addr()
    })
}

/// The first IPv4 address of `name` (the one iptables' REDIRECT uses), if any.
pub fn primary_ipv4(name: &str) -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        (a.interface_name == name).then_some(())?;
        a.address?.as_sockaddr_in().map(|s| s.ip())
    })
}

/// The first global IPv6 address of `name` (not link-local), if any: the one a REDIRECT of a packet to a global
/// address uses.
pub fn primary_ipv6(name: &str) -> Option<std::net::Ipv6Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        (a.interface_name == name).then_some(())?;
        let ip = a.address?.as_sockaddr_in6()?.ip();
        // fe80::/10 is link-local.
        (ip.segments()[0] & 0xffc0 != 0xfe80).then_some(ip)
    })
}

/// Every IPv4 address assigned in this namespace.
pub fn local_ipv4_addrs() -> Vec<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .map(|it| it.filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip())).collect())
        .unwrap_or_default()
}

/// Every address of either family assigned in this namespace.
pub fn local_addrs() -> Vec<IpAddr> {
    let Ok(it) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    it.filter_map(|a| {
        let a = a.address?;
        a.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())).or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
    })
    .collect()
}

/// How the tc programs see an interface's packets, from its link type (ARPHRD_*) and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Packets start with a 14-byte Ethernet header (Ethernet, veth, bridges, VLANs, tap, loopback...).
    Ethernet,
    /// Packets start at the IP header, at ingress and egress alike (tun, WireGuard, PPP, raw-IP modems).
    Layer3,
}

impl Framing {
    /// The offset of the IP header in the packet data (the programs' `PFWD_L2_LEN`).
    pub fn l2_len(self) -> u32 {
        match self {
            Framing::Ethernet => 14,
            Framing::Layer3 => 0,
        }
    }
}

/// An interface's link type: the kernel's ARPHRD number (`/sys/class/net/IFACE/type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkType {
    pub arphrd: u16,
}

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_PPP: u16 = 512;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_TUNNEL: u16 = 768;
const ARPHRD_TUNNEL6: u16 = 769;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_SIT: u16 = 776;
const ARPHRD_IPGRE: u16 = 778;
const ARPHRD_IP6GRE: u16 = 823;
const ARPHRD_NONE: u16 = 0xfffe;

impl LinkType {
    /// The name `ip link` shows for the type (`link/<name>`), or its number.
    pub fn name(&self) -> String {
        match self.arphrd {
            ARPHRD_ETHER => "ether".into(),
            ARPHRD_PPP => "ppp".into(),
            ARPHRD_RAWIP => "rawip".into(),
            ARPHRD_TUNNEL => "ipip".into(),
            ARPHRD_TUNNEL6 => "tunnel6".into(),
            ARPHRD_LOOPBACK => "loopback".into(),
            ARPHRD_SIT => "sit".into(),
            ARPHRD_IPGRE => "gre".into(),
            ARPHRD_IP6GRE => "ip6gre".into(),
            ARPHRD_NONE => "none".into(),
            n => format!("ARPHRD {n}"),
        }
    }

    /// How the eBPF programs must read the packets of this type, or why they cannot.
    ///
    /// Layer-3 types are accepted where the kernel resets the MAC header to the IP header on receive, so tc ingress
    /// starts at the inner IP header as egress does: tun (`tun_get_user`), WireGuard (`wg_reset_packet`), PPP
    /// (`ppp_receive_nonmp_frame`), raw-IP. The kernel's IP-in-IP tunnels (ipip, sit, gre, ip6tnl, ip6gre) are not:
    /// ip_gre and sit leave the MAC header on the outer IP header, so tc ingress would see the outer headers first
    /// (and GRE without a fixed remote builds the outer header before tc egress); pfwd could not test them here.
    pub fn framing(&self) -> Result<Framing, String> {
        match self.arphrd {
            ARPHRD_ETHER | ARPHRD_LOOPBACK => Ok(Framing::Ethernet),
            ARPHRD_NONE | ARPHRD_PPP | ARPHRD_RAWIP => Ok(Framing::Layer3),
            ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT | ARPHRD_IPGRE | ARPHRD_IP6GRE => Err(format!(
                "the eBPF data path does not support kernel IP tunnels (link/{}): tc on them sees the outer tunnel \
                 headers before the packet; use `--mode iptables` (`pfwd detach` first if pfwd is attached here in \
                 eBPF mode), or a WireGuard or tun tunnel",
                self.name()
            )),
            _ => Err(format!(
                "the eBPF data path handles Ethernet-type and layer-3 (tun, WireGuard, PPP) interfaces, not link/{}; \
                 use `--mode iptables` (`pfwd detach` first if pfwd is attached here in eBPF mode)",
                self.name()
            )),
        }
    }
}

/// The mode of the XDP program attached to `name`, as the kernel reports it (`ip -details -json link`): None
/// without one.
pub fn xdp_attached(name: &str) -> Result<Option<crate::loader::XdpRun>> {
    use crate::loader::XdpRun;
    let out = std::process::Command::new("ip")
        .args(["-details", "-json", "link", "show", "dev", name])
        .output()
        .map_err(|e| anyhow::anyhow!("running `ip link show dev {name}`: {e}"))?;
    if !out.status.success() {
        bail!("`ip link show dev {name}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // IFLA_XDP_ATTACHED: 1 driver, 2 generic (skb), 3 offloaded, 4 several.
    Ok(match links[0]["xdp"]["mode"].as_u64() {
        None | Some(0) => None,
        Some(2) => Some(XdpRun::Generic),
        Some(_) => Some(XdpRun::Native),
    })
}

/// The link type of `name`, from the kernel (SIOCGIFHWADDR's address family is the ARPHRD type).
pub fn link_type(name: &str) -> Result<LinkType> {
    use std::os::fd::AsRawFd;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: zeroed plain-old-data request block.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        bail!("interface name {name:?} is too long");
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: a valid socket and request block; the kernel writes only inside it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        bail!("reading the link type of {name}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled the hardware-address member of the union.
    Ok(LinkType { arphrd: unsafe { req.ifr_ifru.ifru_hwaddr.sa_family } })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(arphrd: u16) -> LinkType {
        LinkType { arphrd }
    }

    #[test]
    fn framing_by_link_type() {
        assert_eq!(t(ARPHRD_ETHER).framing(), Ok(Framing::Ethernet));
        assert_eq!(t(ARPHRD_LOOPBACK).framing(), Ok(Framing::Ethernet));
        for l3 in [ARPHRD_NONE, ARPHRD_PPP, ARPHRD_RAWIP] {
            assert_eq!(t(l3).framing(), Ok(Framing::Layer3), "{}", t(l3).name());
        }
        for refused in [ARPHRD_TUNNEL, ARPHRD_TUNNEL6, ARPHRD_SIT, ARPHRD_IPGRE, ARPHRD_IP6GRE, 32, 280, 801] {
            let e = t(refused).framing().unwrap_err();
            assert!(e.contains(&format!("link/{}", t(refused).name())) && e.contains("--mode iptables"), "{e}");
        }
        assert_eq!(t(280).name(), "ARPHRD 280");
    }

    #[test]
    fn loopback_is_read_from_the_kernel() {
        let lo = link_type("lo").expect("lo exists in every namespace");
        assert_eq!((lo.arphrd, lo.name()), (ARPHRD_LOOPBACK, "loopback".to_string()));
        assert!(link_type("pfwd-no-such-if0").is_err());
    }
}
