//! Sample configs shared by the integration tests.

// Each test crate uses only some of these.
#![allow(dead_code)]

/// The guest booted from a logical volume with pygrub.
pub const LVM_GUEST: &str = r#"name = "TestGuest"
memory = "64"
disk = [ 'phy:/dev/VolumeGroup0/TestGuest-volume,xvda,w' ]
vif = [ 'mac=00:16:3e:55:9d:b0, bridge=xenbr0' ]
nographic=1
uuid = "cc0029f5-10a1-e6d0-3c92-19b0ea021f21"
bootloader="/usr/bin/pygrub"
vcpus=1
on_reboot = 'restart'
on_crash = 'restart'
"#;

/// The same guest with its root file system on NFS.
pub const NFS_GUEST: &str = r#"name = "TestGuest"
memory = "64"
vif = [ 'mac=00:16:3e:55:9d:b0, bridge=xenbr0' ]
nographic = 1
uuid = "cc0029f5-10a1-e6d0-3c92-19b0ea021f21"
bootloader = "/usr/bin/pygrub"
vcpus = 1
root = "/dev/nfs"
nfs_server = '10.0.0.40' # Address of our NFS server
nfs_root = '/XenGuestRoots/TestGuest' # Path on server of TestGuest's root
on_reboot = 'restart'
on_crash = 'restart'
"#;

/// A daemon config using every key.
pub const DAEMON: &str = r#"state_dir = "/var/lib/tern"
socket = "/run/tern/ternd.sock"

[relocation]
server = true
address = ""
port = 8002
hosts_allow = ['^localhost$', '^192\.0\.2\.[0-9]+$']
"#;

/// A guest config using every key tern reads and both disk forms.
pub const FULL_GUEST: &str = r#"# every key tern reads
name = "full-1"; uuid = 'cc0029f5-10a1-e6d0-3c92-19b0ea021f21'
memory = 0x200
vcpus = "2"
kernel = "/boot/vmlinuz"
ramdisk = "/boot/initrd.img"
root = "/dev/xvda1"
extra = "console=hvc0 \"quiet\""
disk = [
    'phy:/dev/vg/full,xvda,w',
    "tap:aio:/img/data.img,xvdb,r",
    'nbd:192.0.2.7:10809:exportname=scratch,xvdc',
    'format=raw, vdev=xvdd, access=ro, target=/img/a,b.img',
]
vif = [ 'mac=00:16:3e:00:00:01, bridge=xenbr0, model=virtio-net', 'ip=192.0.2.50' ]
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "preserve"
"#;
