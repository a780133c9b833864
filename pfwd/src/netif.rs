//! Network interface facts: index by name, primary IPv4 address, local addresses.
use std::net::Ipv4Addr;

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

/// The first IPv4 address of `name` (the one iptables' REDIRECT uses), if any.
pub fn primary_ipv4(name: &str) -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        (a.interface_name == name).then_some(())?;
        a.address?.as_sockaddr_in().map(|s| s.ip())
    })
}

/// Every IPv4 address assigned in this namespace.
pub fn local_addrs() -> Vec<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .map(|it| it.filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip())).collect())
        .unwrap_or_default()
}
