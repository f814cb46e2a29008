//! The host side of a guest's network interfaces.
//!
//! Each guest NIC is backed by a TAP device owned by the guest process (`tern vmm`): the
//! process creates it with [`Tap::create`], the virtio-net device reads and writes one frame per
//! call on it (each frame prefixed by its 12-byte `virtio_net_hdr_v1`), and because the TAP is
//! not persistent it disappears with the process's last descriptor, even on `kill -9`. The TAP
//! is made a port of a host bridge with [`Tap::attach_to_bridge`] so the guest sits on the
//! host's layer-2 segment.
//!
//! After a restore or an incoming migration the guest's MAC address appears behind a new switch
//! port; [`announce`] sends QEMU-style RARP "self-announce" frames (and optionally a gratuitous
//! ARP) into the TAP as if the guest had sent them, so switches learn the new port at once
//! instead of when the guest next speaks.
//!
//! Everything here works on the network namespace of the calling thread: interface queries use
//! ioctls on a socket created by that thread, never `/sys`, which shows the namespace of
//! whoever mounted it. Errors are `io::Error`s whose inner error is a [`NetError`] naming the
//! interface and the operation.

mod announce;
mod bridge;
mod error;
mod name;
mod sys;
mod tap;

#[cfg(test)]
mod testns;

pub use announce::{
    announce, announce_with, gratuitous_arp_frame, rarp_frame, send_announcements, AnnounceHandle,
    AnnounceSchedule, Announcement, ANNOUNCE_FRAME_LEN, ETH_P_ARP, ETH_P_RARP,
};
pub use bridge::{bridge_exists, create_bridge, delete_bridge, interface_exists};
pub use error::NetError;
pub use name::{default_vif_name, validate_ifname, IFNAMSIZ};
pub use tap::{Tap, VNET_HDR_LEN};
