//! The transport rules every outbound URL and inbound address setting follows: `https://` unless
//! the host is a loopback address or the section says `allow_insecure_http = true`, an optional
//! `ca_file` of PEM certificates for internal CAs, and the CIDRs of trusted proxies.

use std::net::IpAddr;
use std::path::Path;

use url::{Host, Url};

use super::ConfigError;

/// Parses an outbound URL of section `section` (`octopus`, `auth`, `webhooks[0]`): `https://`,
/// or `http://` to a loopback host, or `http://` anywhere with `allow_insecure_http`.
pub(super) fn outbound_url(
    key: &str,
    text: &str,
    section: &str,
    allow_insecure_http: bool,
) -> Result<Url, ConfigError> {
    let url = Url::parse(text.trim()).map_err(|_| ConfigError::at(key, "is not a URL"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http || is_loopback(&url) => {}
        "http" => {
            return Err(ConfigError::at(
                key,
                format!(
                    "must be an https:// URL: over http:// the credential or the payload crosses the network in \
                     clear. Use https (with {section}.ca_file for an internal CA), or set \
                     {section}.allow_insecure_http = true if the network is trusted"
                ),
            ));
        }
        _ => return Err(ConfigError::at(key, "must be an https:// URL")),
    }
    if url.host().is_none() {
        return Err(ConfigError::at(key, "must name a host"));
    }
    Ok(url)
}

/// `localhost`, 127.0.0.0/8 and `::1`: traffic that never leaves the machine.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Reads `ca_file`: one or more PEM certificates, trusted in addition to the public roots.
pub(super) fn ca_certificates(
    key: &str,
    file: Option<&Path>,
    base: &Path,
) -> Result<Vec<reqwest::Certificate>, ConfigError> {
    let Some(file) = file else { return Ok(Vec::new()) };
    let path = base.join(file);
    let pem = std::fs::read(&path).map_err(|e| ConfigError::at(key, format!("cannot read {}: {e}", path.display())))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|_| ConfigError::at(key, format!("{} is not a PEM certificate bundle", path.display())))?;
    if certificates.is_empty() {
        return Err(ConfigError::at(key, format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certificates)
}

/// `server.trusted_proxies`: CIDRs such as `10.0.0.0/8` or single addresses.
pub(super) fn trusted_proxies(raw: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, text)| {
            let text = text.trim();
            text.parse::<ipnet::IpNet>().or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from)).map_err(|_| {
                ConfigError::at(
                    format!("server.trusted_proxies[{i}]"),
                    format!("`{text}` is not a CIDR such as 10.0.0.0/8 or an address"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_only_for_loopback_or_when_allowed() {
        for ok in [
            "https://octopus.example.com",
            "http://127.0.0.1:8065",
            "http://127.8.0.1",
            "http://[::1]:80",
            "http://localhost:1",
        ] {
            assert!(outbound_url("octopus.url", ok, "octopus", false).is_ok(), "{ok}");
        }
        for refused in ["http://octopus.example.com", "http://10.0.0.5", "http://localhost.example.com", "ftp://x"] {
            let err = outbound_url("octopus.url", refused, "octopus", false).unwrap_err().to_string();
            assert!(err.starts_with("octopus.url: must be an https:// URL"), "{refused}: {err}");
        }
        let err = outbound_url("octopus.url", "http://octopus.example.com", "octopus", false).unwrap_err().to_string();
        assert!(err.contains("octopus.allow_insecure_http = true") && err.contains("octopus.ca_file"), "{err}");
        assert!(outbound_url("octopus.url", "http://octopus.example.com", "octopus", true).is_ok());
    }

    #[test]
    fn trusted_proxies_are_cidrs_or_addresses() {
        let nets = trusted_proxies(&["10.0.0.0/8".to_owned(), "::1".to_owned(), " 192.168.1.7 ".to_owned()]).unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets[0].contains(&"10.2.3.4".parse::<IpAddr>().unwrap()));
        assert!(nets[2].contains(&"192.168.1.7".parse::<IpAddr>().unwrap()));
        let err = trusted_proxies(&["10.0.0.0/33".to_owned()]).unwrap_err().to_string();
        assert!(err.starts_with("server.trusted_proxies[0]"), "{err}");
    }
}
