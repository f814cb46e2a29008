//! Bridges and interface queries, in the calling thread's network namespace.
//!
//! These use ioctls rather than `/sys/class/net`: sysfs shows the network namespace of the
//! process that mounted it, which is right after `ip netns exec` (it remounts `/sys`) but wrong
//! after `unshare(CLONE_NEWNET)`, `nsenter --net` or `setns` alone.

use std::io;

use crate::name::validate_ifname;
use crate::sys::CtlSocket;
use crate::NetError;

/// The driver name bridges report through ethtool.
const BRIDGE_DRIVER: &str = "bridge";

/// True if an interface called `name` exists in this network namespace. An invalid name
/// cannot exist.
pub fn interface_exists(name: &str) -> bool {
    if validate_ifname(name).is_err() {
        return false;
    }
    CtlSocket::new(name).is_ok_and(|s| s.ifindex(name).is_ok())
}

/// True if `name` exists in this network namespace and is a Linux bridge.
pub fn bridge_exists(name: &str) -> bool {
    if validate_ifname(name).is_err() {
        return false;
    }
    CtlSocket::new(name).is_ok_and(|s| is_bridge(&s, name))
}

fn is_bridge(sock: &CtlSocket, name: &str) -> bool {
    sock.driver(name).is_ok_and(|d| d == BRIDGE_DRIVER)
}

/// Creates bridge `name` and sets it up. tern does not manage host bridges (they are the
/// host's configuration, as with Xen); this is for tests and lab set-ups.
pub fn create_bridge(name: &str) -> io::Result<()> {
    validate_ifname(name)?;
    let sock = CtlSocket::new(name)?;
    sock.bridge_ctl(name, true)
        .map_err(|e| NetError::os(name, "create bridge (SIOCBRADDBR)", e))?;
    sock.set_up(name, true)
        .map_err(|e| NetError::os(name, "set up (SIOCSIFFLAGS)", e))?;
    Ok(())
}

/// Sets bridge `name` down and deletes it (its ports are released, not deleted).
pub fn delete_bridge(name: &str) -> io::Result<()> {
    validate_ifname(name)?;
    let sock = CtlSocket::new(name)?;
    if !is_bridge(&sock, name) {
        return Err(NetError::os(
            name,
            "delete bridge",
            io::Error::new(io::ErrorKind::NotFound, "no such bridge"),
        )
        .into());
    }
    sock.set_up(name, false)
        .map_err(|e| NetError::os(name, "set down (SIOCSIFFLAGS)", e))?;
    sock.bridge_ctl(name, false)
        .map_err(|e| NetError::os(name, "delete bridge (SIOCBRDELBR)", e))?;
    Ok(())
}

/// Makes interface `port` a port of `bridge`.
pub(crate) fn add_port(bridge: &str, port: &str) -> io::Result<()> {
    validate_ifname(bridge)?;
    let sock = CtlSocket::new(port)?;
    if sock.ifindex(bridge).is_err() {
        return Err(NetError::NoSuchBridge {
            iface: port.to_string(),
            bridge: bridge.to_string(),
        }
        .into());
    }
    if !is_bridge(&sock, bridge) {
        return Err(NetError::NotABridge {
            iface: port.to_string(),
            bridge: bridge.to_string(),
        }
        .into());
    }
    let index = sock
        .ifindex(port)
        .map_err(|e| NetError::os(port, "SIOCGIFINDEX", e))?;
    sock.add_bridge_port(bridge, index)
        .map_err(|cause| NetError::AttachFailed {
            iface: port.to_string(),
            bridge: bridge.to_string(),
            cause: if cause.raw_os_error() == Some(libc::EBUSY) {
                io::Error::new(
                    cause.kind(),
                    format!("{cause}; is it a port of a bridge already?"),
                )
            } else {
                cause
            },
        })?;
    Ok(())
}
