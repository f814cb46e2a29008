//! Finding the virtio devices and bringing up the network and the disk workload on them.

use crate::cmdline::{self, Params};
use crate::disk::{self, Disk};
use crate::net::{self, Net};
use crate::virtio::{self, Slot, Transport};
use crate::{blk, hw, kernel, println};

/// The first net device and the first block device found.
pub struct Found {
    pub net: Option<Transport>,
    pub blk: Option<Transport>,
}

/// Probes the windows the command line names (or tern's fixed layout) in order.
pub fn find(cmdline: &[u8]) -> Found {
    let mut slots = [Slot {
        base: 0,
        size: 0,
        irq: 0,
    }; virtio::MAX_SLOTS];
    let n = virtio::slots(cmdline, &mut slots);
    let mut found = Found {
        net: None,
        blk: None,
    };
    for &slot in &slots[..n] {
        let Some((t, id)) = Transport::probe(slot) else {
            continue;
        };
        match id {
            virtio::DEVICE_NET if found.net.is_none() => found.net = Some(t),
            virtio::DEVICE_BLOCK if found.blk.is_none() => found.blk = Some(t),
            _ => {}
        }
    }
    found
}

fn route(slot: &Slot, cpu: usize) -> bool {
    let (Ok(vector), Ok(apic_id)) = (u8::try_from(kernel::VECTOR_WAKE + cpu), u8::try_from(cpu))
    else {
        return false;
    };
    hw::ioapic_route(slot.irq, vector, apic_id)
}

struct Ip([u8; 4]);

impl core::fmt::Display for Ip {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// The network on `t` as the command line configures it, or None (with a line saying why).
pub fn setup_net(t: Option<Transport>, p: &Params, now: u64) -> Option<Net> {
    let Some(t) = t else {
        if p.ip.is_some() {
            println!("net: ip= given but there is no virtio-net device");
        }
        return None;
    };
    let base = t.slot.base;
    let Some((ip, prefix)) = p.ip else {
        if p.ip_invalid {
            println!(
                "net: virtio-net at {base:#x}: cannot parse ip= (want A.B.C.D/NN); network off"
            );
        } else {
            println!("net: virtio-net at {base:#x}: no ip= on the command line; network off");
        }
        return None;
    };
    let settings = net::Settings {
        ip,
        prefix,
        gw: p.gw,
        http_port: p.http_port,
        echo_port: p.echo_port,
    };
    let mut n = match Net::new(t, &settings, now) {
        Ok(n) => n,
        Err(e) => {
            println!("net: virtio-net at {base:#x}: {e}; network off");
            return None;
        }
    };
    let irq = route(&t.slot, 0);
    n.set_irq(irq);
    let m = n.mac();
    let (rxq, txq) = n.queue_sizes();
    let gw = match p.gw {
        Some(g) => Ip(g),
        None => Ip([0; 4]),
    };
    println!(
        "net: virtio-net at {base:#x} irq={} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={}/{prefix} gw={gw} http_port={} echo_port={} queues={rxq}/{txq} interrupts={}",
        t.slot.irq, m[0], m[1], m[2], m[3], m[4], m[5], Ip(ip), p.http_port, p.echo_port,
        if irq { "on" } else { "off" }
    );
    Some(n)
}

/// The disk workload on `t`, run by `cpu`, or None (with a line saying why).
pub fn setup_disk(t: Option<Transport>, p: &Params, cpu: usize, now: u64) -> Option<Disk> {
    let t = t?;
    let base = t.slot.base;
    if p.disk_mib == Some(0) {
        println!("disk: virtio-blk at {base:#x}: disk_mib=0; disk workload off");
        return None;
    }
    let b = match blk::VirtioBlk::new(t) {
        Ok(b) => b,
        Err(e) => {
            println!("disk: virtio-blk at {base:#x}: {e}; disk workload off");
            return None;
        }
    };
    let mib = p.disk_mib.unwrap_or(cmdline::DISK_DEFAULT_MAX_MIB);
    let blocks = Disk::area_blocks(&b, mib);
    if p.disk_mib.is_some_and(|m| blocks * disk::BLOCK < m << 20) {
        println!(
            "disk: warning: area reduced to {} KiB (disk size or the {} MiB limit)",
            blocks * disk::BLOCK / 1024,
            (disk::MAX_BLOCKS as u64 * disk::BLOCK) >> 20
        );
    }
    let (read_only, can_flush, capacity) = (b.read_only, b.can_flush, b.capacity);
    let max_bytes = b.max_bytes;
    let settings = disk::Settings {
        blocks,
        kibps: p.disk_kibps,
        verify_ms: p.disk_verify_ms,
    };
    let mut d = Disk::new(b, &settings, now);
    let irq = route(&t.slot, cpu);
    d.set_irq(irq);
    println!(
        "disk: virtio-blk at {base:#x} irq={} capacity={} sectors area_kib={} disk_kibps={} disk_verify_ms={} cpu={cpu} flush={} read_only={} max_request={} interrupts={}",
        t.slot.irq,
        capacity,
        blocks * disk::BLOCK / 1024,
        if read_only { 0 } else { p.disk_kibps },
        p.disk_verify_ms,
        if can_flush { "yes" } else { "no" },
        if read_only { "yes" } else { "no" },
        max_bytes,
        if irq { "on" } else { "off" }
    );
    Some(d)
}
