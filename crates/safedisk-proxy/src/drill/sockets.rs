//! Counting ESTABLISHED TCP connections by port, cheaply enough to sample
//! every 25 ms.
//!
//! `/proc/net/tcp` formats every socket of the network namespace as text,
//! `TIME_WAIT` ones included; after a few thousand short connections one
//! read costs tens of milliseconds of kernel time. The kernel's socket
//! diagnostics over netlink (`NETLINK_SOCK_DIAG`) return only the
//! ESTABLISHED IPv4 sockets, in binary. The drill's servers all listen on
//! `127.0.0.1`, so IPv4 is all there is to count. Where netlink is refused,
//! the count falls back to [`safedisk_testkit::probe::established`].

use std::collections::HashSet;

use safedisk_testkit::probe;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const TCP_ESTABLISHED: u32 = 1;
const HEADER: usize = 16;

/// One end of a connection: address and port as the kernel gives them.
type End = ([u8; 4], u16);

/// Distinct ESTABLISHED connections with one of `ports` at either end,
/// per port, in the order given. Both ends of a loopback connection live
/// in this process; each connection counts once.
pub fn connections(ports: &[u16]) -> Vec<usize> {
    let sockets = match established_ipv4() {
        Ok(sockets) => sockets,
        Err(_) => return ports.iter().map(|&p| from_proc(p)).collect(),
    };
    ports
        .iter()
        .map(|&port| {
            let pairs: HashSet<(End, End)> = sockets
                .iter()
                .filter(|(a, b)| a.1 == port || b.1 == port)
                .map(|&(a, b)| if a <= b { (a, b) } else { (b, a) })
                .collect();
            pairs.len()
        })
        .collect()
}

fn from_proc(port: u16) -> usize {
    let mut seen = HashSet::new();
    for line in probe::established(port) {
        if let Some((a, b)) = line.split_once(" -> ") {
            let pair = if a <= b { (a, b) } else { (b, a) };
            seen.insert((pair.0.to_owned(), pair.1.to_owned()));
        }
    }
    seen.len()
}

/// Every ESTABLISHED IPv4 TCP socket of the namespace, as (source,
/// destination).
fn established_ipv4() -> std::io::Result<Vec<(End, End)>> {
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);

    // nlmsghdr, then inet_diag_req_v2: family, protocol, ext, pad, states,
    // and a zeroed socket id (no filter).
    let mut request = Vec::with_capacity(72);
    request.extend_from_slice(&72u32.to_ne_bytes());
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    request.extend_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    request.resize(72, 0);
    // SAFETY: the buffer is valid for its length; the kernel is the peer.
    let sent = unsafe { libc::send(fd, request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }

    let mut found = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer is valid for writes of its length.
        let got = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if got < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut at = 0;
        let got = got as usize;
        while at + HEADER <= got {
            let len = u32::from_ne_bytes(buffer[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buffer[at + 4..at + 6].try_into().expect("2 bytes"));
            if kind == NLMSG_DONE {
                return Ok(found);
            }
            if kind == NLMSG_ERROR || len < HEADER || at + len > got {
                return Err(std::io::Error::other("sock_diag refused the dump"));
            }
            // inet_diag_msg: family, state, timer, retrans, then the id:
            // sport and dport (big endian), src and dst (16 bytes each).
            let msg = &buffer[at + HEADER..at + len];
            if msg.len() >= 4 + 4 + 32 {
                let sport = u16::from_be_bytes([msg[4], msg[5]]);
                let dport = u16::from_be_bytes([msg[6], msg[7]]);
                let src: [u8; 4] = msg[8..12].try_into().expect("4 bytes");
                let dst: [u8; 4] = msg[24..28].try_into().expect("4 bytes");
                found.push(((src, sport), (dst, dport)));
            }
            at += len.div_ceil(4) * 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_connection_counts_once_and_goes_away() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(connections(&[port]), vec![0]);

        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert_eq!(connections(&[port]), vec![1]);
        assert_eq!(connections(&[port]), vec![from_proc(port)]);

        drop(client);
        drop(server);
        assert_eq!(connections(&[port]), vec![0]);
    }
}
