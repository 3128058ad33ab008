//! `--metrics ADDR`: where the endpoint listens, and the listening socket, opened before
//! anything is attached so that a port in use stops leaktrace with one line and no probe.

use std::{
    fmt,
    io::ErrorKind,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    str::FromStr,
};

use anyhow::anyhow;

/// An IP address and port, or a port alone (`:9464`) for every interface, as Prometheus's own
/// exporters take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Socket(SocketAddr),
    EveryInterface(u16),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let malformed = || {
            format!(
                "`{s}` is not an address to listen on: give IP:PORT (127.0.0.1:9464, [::1]:9464) or :PORT for every interface (:9464)"
            )
        };
        if let Some(port) = s.strip_prefix(':') {
            return port
                .parse()
                .map(Self::EveryInterface)
                .map_err(|_| malformed());
        }
        s.parse().map(Self::Socket).map_err(|_| malformed())
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Socket(addr) => write!(f, "{addr}"),
            Self::EveryInterface(port) => write!(f, ":{port}"),
        }
    }
}

impl ListenAddr {
    /// A non-blocking listening socket, or one line that says what to do.
    pub fn bind(self) -> anyhow::Result<TcpListener> {
        let bound = match self {
            Self::Socket(addr) => TcpListener::bind(addr),
            // `[::]` takes IPv4 connections too (unless the host set bindv6only); a host
            // without IPv6 gets every IPv4 interface.
            Self::EveryInterface(port) => {
                TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).or_else(|err| match err.kind() {
                    ErrorKind::AddrNotAvailable | ErrorKind::Unsupported => {
                        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                    }
                    _ if err.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                    }
                    _ => Err(err),
                })
            }
        };
        let listener = bound.map_err(|err| {
            let hint = match err.kind() {
                ErrorKind::AddrInUse => "another process listens there: pick another port",
                ErrorKind::AddrNotAvailable => {
                    "no interface of this host has that address: give one it has, or :PORT"
                }
                ErrorKind::PermissionDenied => "ports below 1024 need root: pick another port",
                _ => "give another address",
            };
            anyhow!("--metrics {self}: cannot listen there ({err}): {hint}")
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|err| anyhow!("--metrics {self}: {err}"))?;
        Ok(listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_and_port_or_a_port_alone() {
        assert_eq!(
            "127.0.0.1:9464".parse(),
            Ok(ListenAddr::Socket(SocketAddr::from(([127, 0, 0, 1], 9464))))
        );
        assert_eq!(
            "[::1]:9464".parse(),
            Ok(ListenAddr::Socket(SocketAddr::from((
                Ipv6Addr::LOCALHOST,
                9464
            ))))
        );
        assert_eq!(":9464".parse(), Ok(ListenAddr::EveryInterface(9464)));
        assert_eq!(":0".parse(), Ok(ListenAddr::EveryInterface(0)));
        assert_eq!(ListenAddr::EveryInterface(9464).to_string(), ":9464");
        assert_eq!(
            "[::1]:80".parse::<ListenAddr>().unwrap().to_string(),
            "[::1]:80"
        );
    }

    #[test]
    fn anything_else_is_one_line_that_shows_the_forms() {
        for bad in [
            "",
            ":",
            "9464",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:99999",
            ":-1",
            "localhost:9464",
            "::1:9464",
            "http://127.0.0.1:9464",
            "127.0.0.1:9464/metrics",
            " :9464",
        ] {
            let err = bad.parse::<ListenAddr>().unwrap_err();
            assert_eq!(
                err,
                format!(
                    "`{bad}` is not an address to listen on: give IP:PORT (127.0.0.1:9464, [::1]:9464) or :PORT for every interface (:9464)"
                )
            );
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn a_port_in_use_says_so_in_one_line() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = ListenAddr::Socket(taken.local_addr().unwrap());
        let err = format!("{:#}", addr.bind().unwrap_err());
        assert!(
            err.starts_with(&format!("--metrics {addr}: cannot listen there (")),
            "{err}"
        );
        assert!(
            err.ends_with("another process listens there: pick another port"),
            "{err}"
        );
        assert!(!err.contains('\n'));
        // Port 0: the kernel picks a free one.
        let free = "127.0.0.1:0".parse::<ListenAddr>().unwrap().bind().unwrap();
        assert_ne!(free.local_addr().unwrap().port(), 0);
    }
}
