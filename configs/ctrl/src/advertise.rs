//! The address a gateway reports to the control service (`ip_addr`).

use std::net::IpAddr;

/// Kratos' default for `ADVERTISE_DEVICE`.
const DEFAULT_DEVICE: &str = "eth0";

/// The advertised address: `addr` (`ADVERTISE_ADDR`) when set; else the first non-loopback
/// IPv4 address of the interface `device` (`ADVERTISE_DEVICE`, default `eth0`, as Kratos);
/// else (an extension: Kratos sends an empty address) the first non-loopback IPv4 address
/// of any interface, then the first non-loopback IPv6 one; else "".
pub fn advertise_addr(addr: Option<&str>, device: Option<&str>) -> String {
    if let Some(addr) = addr.map(str::trim).filter(|a| !a.is_empty()) {
        return addr.to_owned();
    }
    let interfaces = match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces
            .into_iter()
            .map(|interface| (interface.name.clone(), interface.ip()))
            .collect(),
        Err(error) => {
            tracing::warn!(%error, "cannot list the network interfaces");
            Vec::new()
        }
    };
    match pick_address(device, &interfaces) {
        Some(ip) => ip.to_string(),
        None => {
            tracing::warn!(
                "no non-loopback address found; ip_addr is sent empty (set ADVERTISE_ADDR)"
            );
            String::new()
        }
    }
}

/// The choice of [`advertise_addr`] among `(interface name, address)` pairs.
fn pick_address(device: Option<&str>, interfaces: &[(String, IpAddr)]) -> Option<IpAddr> {
    let device = device
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .unwrap_or(DEFAULT_DEVICE);
    let usable = |ip: &IpAddr| !ip.is_loopback() && !ip.is_unspecified();
    let on_device = interfaces
        .iter()
        .find(|(name, ip)| name == device && ip.is_ipv4() && usable(ip));
    if let Some((_, ip)) = on_device {
        return Some(*ip);
    }
    tracing::debug!(
        device,
        "no IPv4 address on the advertise device; taking the first non-loopback one"
    );
    interfaces
        .iter()
        .find(|(_, ip)| ip.is_ipv4() && usable(ip))
        .or_else(|| interfaces.iter().find(|(_, ip)| usable(ip)))
        .map(|(_, ip)| *ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interfaces() -> Vec<(String, IpAddr)> {
        [
            ("lo", "127.0.0.1"),
            ("eth1", "fe80::1"),
            ("eth1", "10.0.0.2"),
            ("eth0", "::1"),
            ("eth0", "192.168.1.5"),
        ]
        .iter()
        .map(|(name, ip)| (name.to_string(), ip.parse().unwrap()))
        .collect()
    }

    #[test]
    fn the_address_wins_over_every_interface() {
        assert_eq!(advertise_addr(Some("10.9.9.9"), Some("eth1")), "10.9.9.9");
    }

    #[test]
    fn the_device_gives_its_first_non_loopback_ipv4() {
        let list = interfaces();
        assert_eq!(pick_address(Some("eth1"), &list), "10.0.0.2".parse().ok());
        assert_eq!(pick_address(None, &list), "192.168.1.5".parse().ok());
        assert_eq!(pick_address(Some(""), &list), "192.168.1.5".parse().ok());
    }

    #[test]
    fn a_missing_device_falls_back_to_the_first_non_loopback_address() {
        let list = interfaces();
        assert_eq!(pick_address(Some("wlan0"), &list), "10.0.0.2".parse().ok());
        let only_v6 = vec![
            ("lo".to_owned(), "::1".parse().unwrap()),
            ("ens3".to_owned(), "2001:db8::5".parse().unwrap()),
        ];
        assert_eq!(pick_address(None, &only_v6), "2001:db8::5".parse().ok());
        let only_loopback = vec![("lo".to_owned(), "127.0.0.1".parse().unwrap())];
        assert_eq!(pick_address(None, &only_loopback), None);
    }
}
