//! ESTABLISHED TCP sockets of the network namespace.
//!
//! The kernel's socket diagnostics over netlink (`NETLINK_SOCK_DIAG`)
//! return only ESTABLISHED sockets, in binary, and stay cheap after
//! thousands of short connections. `/proc/net/tcp` formats every socket
//! as text, `TIME_WAIT` ones included, and then costs tens of
//! milliseconds per read; it is the fallback where netlink is refused.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A socket as (local, remote).
pub(super) type Pair = (SocketAddr, SocketAddr);

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const TCP_ESTABLISHED: u32 = 1;
/// `struct nlmsghdr`.
const HEADER: usize = 16;
/// `struct nlmsghdr` and `struct inet_diag_req_v2`.
const REQUEST: usize = HEADER + 56;

/// Every ESTABLISHED TCP socket, IPv4 and IPv6: from netlink, else from
/// `/proc`; empty where neither can be read.
pub(super) fn established() -> Vec<Pair> {
    let dumped = dump(libc::AF_INET).and_then(|mut v4| {
        v4.extend(dump(libc::AF_INET6)?);
        Ok(v4)
    });
    dumped.unwrap_or_else(|_| from_proc())
}

/// One `SOCK_DIAG_BY_FAMILY` dump of ESTABLISHED TCP sockets of `family`.
fn dump(family: libc::c_int) -> io::Result<Vec<Pair>> {
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);

    // nlmsghdr (length, type, flags, sequence, port id), then
    // inet_diag_req_v2 (family, protocol, ext, pad, state mask) with a
    // zeroed socket id: no filter.
    let mut request = Vec::with_capacity(REQUEST);
    request.extend_from_slice(&(REQUEST as u32).to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    request.extend_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    request.resize(REQUEST, 0);
    // SAFETY: the buffer is valid for its length; the kernel is the peer.
    let sent = unsafe { libc::send(fd, request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut found = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer is valid for writes of its length.
        let got = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = got as usize;
        let mut at = 0;
        while at + HEADER <= got {
            let len = u32::from_ne_bytes(buffer[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buffer[at + 4..at + 6].try_into().expect("2 bytes"));
            if kind == NLMSG_DONE {
                return Ok(found);
            }
            if kind == NLMSG_ERROR || len < HEADER || at + len > got {
                return Err(io::Error::other("sock_diag refused the dump"));
            }
            found.extend(diag_msg(family, &buffer[at + HEADER..at + len]));
            at += len.div_ceil(4) * 4;
        }
        if got == 0 {
            return Err(io::Error::other("sock_diag ended without DONE"));
        }
    }
}

/// The ends of one `inet_diag_msg`: family, state, timer, retrans, then
/// the socket id: source and destination ports (big endian), source and
/// destination addresses (16 bytes each; IPv4 in the first 4).
fn diag_msg(family: libc::c_int, msg: &[u8]) -> Option<Pair> {
    let id = msg.get(4..40)?;
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    let addr = |at: usize| -> IpAddr {
        if family == libc::AF_INET {
            let octets: [u8; 4] = id[at..at + 4].try_into().expect("4 bytes");
            Ipv4Addr::from(octets).into()
        } else {
            let octets: [u8; 16] = id[at..at + 16].try_into().expect("16 bytes");
            Ipv6Addr::from(octets).into()
        }
    };
    Some((
        SocketAddr::new(addr(4), port(0)),
        SocketAddr::new(addr(20), port(2)),
    ))
}

fn from_proc() -> Vec<Pair> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            found.extend(text.lines().skip(1).filter_map(proc_row));
        }
    }
    found
}

/// One row of `/proc/net/tcp` or `tcp6`: `sl local remote state ...`,
/// addresses as `HEXIP:HEXPORT`, state `01` for ESTABLISHED. The ends
/// when the row is ESTABLISHED.
pub(super) fn proc_row(line: &str) -> Option<Pair> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [_, local, remote, "01", ..] = fields[..] else {
        return None;
    };
    Some((proc_addr(local)?, proc_addr(remote)?))
}

/// `HEXIP:HEXPORT`. The address is printed as 32-bit words in host byte
/// order, so each word's native bytes are the address's bytes.
fn proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut octets = Vec::with_capacity(16);
    for word in ip.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        octets.extend_from_slice(&word.to_ne_bytes());
    }
    let ip: IpAddr = match octets.len() {
        4 => Ipv4Addr::from(<[u8; 4]>::try_from(octets).ok()?).into(),
        16 => Ipv6Addr::from(<[u8; 16]>::try_from(octets).ok()?).into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_rows_are_parsed() {
        let row =
            "   0: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000 0 0 1";
        let (local, remote) = proc_row(row).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(local, "127.0.0.1:8080".parse().unwrap());
            assert_eq!(remote, "127.0.0.1:50000".parse().unwrap());
        }
        let listening = row.replace(" 01 ", " 0A ");
        assert!(proc_row(&listening).is_none());

        let v6 = "   0: 00000000000000000000000001000000:1F90 \
                  00000000000000000000000001000000:C350 01 0 0 0 0 0 1";
        let (local, _) = proc_row(v6).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(local, "[::1]:8080".parse().unwrap());
        }
    }

    #[test]
    fn netlink_and_proc_see_the_same_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let ends = (client.local_addr().unwrap(), client.peer_addr().unwrap());

        let Ok(dumped) = dump(libc::AF_INET) else {
            // Straight to stderr, past the test harness's capture.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP netlink_and_proc_see_the_same_connection: sock_diag refused here"
            );
            return;
        };
        assert!(dumped.contains(&ends), "netlink: {dumped:?}");
        assert!(dumped.contains(&(ends.1, ends.0)), "netlink: {dumped:?}");
        let listed = from_proc();
        assert!(listed.contains(&ends), "/proc: {listed:?}");
    }
}
