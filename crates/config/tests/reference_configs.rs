//! The guest configs of the Xen book chapter tern re-creates must parse.

use std::path::{Path, PathBuf};

use tern_config::{
    load_domain_config, parse_domain_config, Action, DiskBackend, DiskSpec, MacAddr, VifSpec,
};

mod common;

use common::{LVM_GUEST, NFS_GUEST};

fn book_vif() -> VifSpec {
    VifSpec {
        mac: Some(MacAddr([0x00, 0x16, 0x3e, 0x55, 0x9d, 0xb0])),
        bridge: Some("xenbr0".into()),
        ip: None,
        model: None,
    }
}

#[test]
fn lvm_guest() {
    let parsed = parse_domain_config(LVM_GUEST, None).unwrap();
    let c = &parsed.config;
    assert_eq!(c.name, "TestGuest");
    assert_eq!(
        c.uuid.unwrap().to_string(),
        "cc0029f5-10a1-e6d0-3c92-19b0ea021f21"
    );
    assert_eq!(c.memory_mib, 64);
    assert_eq!(c.vcpus, 1);
    assert_eq!(c.kernel, None);
    assert_eq!(c.cmdline, "");
    assert_eq!(
        c.disks,
        vec![DiskSpec {
            backend: DiskBackend::Phy("/dev/VolumeGroup0/TestGuest-volume".into()),
            vdev: "xvda".into(),
            writable: true,
        }]
    );
    assert_eq!(c.vifs, vec![book_vif()]);
    assert_eq!(c.on_poweroff, Action::Destroy);
    assert_eq!(c.on_reboot, Action::Restart);
    assert_eq!(c.on_crash, Action::Restart);
    assert_eq!(
        parsed.warnings,
        vec![
            "line 5: 'nographic' is not supported by tern and is ignored",
            "line 7: 'bootloader' is not supported by tern and is ignored",
        ]
    );
}

#[test]
fn nfs_guest() {
    let parsed = parse_domain_config(NFS_GUEST, None).unwrap();
    let c = &parsed.config;
    assert_eq!(c.name, "TestGuest");
    assert_eq!(c.memory_mib, 64);
    assert!(c.disks.is_empty());
    assert_eq!(c.vifs, vec![book_vif()]);
    assert_eq!(c.cmdline, "root=/dev/nfs");
    assert_eq!(c.on_crash, Action::Restart);
    assert_eq!(
        parsed.warnings,
        vec![
            "line 4: 'nographic' is not supported by tern and is ignored",
            "line 6: 'bootloader' is not supported by tern and is ignored",
            "line 9: 'nfs_server' is not supported by tern and is ignored",
            "line 10: 'nfs_root' is not supported by tern and is ignored",
        ]
    );
}

#[test]
fn reference_configs_round_trip_through_to_xl() {
    for text in [LVM_GUEST, NFS_GUEST] {
        let c = parse_domain_config(text, None).unwrap().config;
        let written = c.to_xl();
        let again = parse_domain_config(&written, None).unwrap();
        assert_eq!(again.config, c, "{written}");
        assert!(again.warnings.is_empty());
    }
}

#[test]
fn serde_round_trip() {
    let c = parse_domain_config(LVM_GUEST, None).unwrap().config;
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(
        serde_json::from_str::<tern_config::DomainConfig>(&json).unwrap(),
        c
    );
}

#[test]
fn load_resolves_against_the_file_directory_and_prefixes_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.cfg");
    std::fs::write(
        &path,
        "name = 'g'\nkernel = 'vmlinuz'\ndisk = ['file:root.img,xvda']\n",
    )
    .unwrap();
    let c = load_domain_config(&path).unwrap().config;
    assert_eq!(c.kernel, Some(dir.path().join("vmlinuz")));
    assert_eq!(
        c.disks[0].backend,
        DiskBackend::File(dir.path().join("root.img"))
    );

    std::fs::write(&path, "name = 'g'\nmemory 64\n").unwrap();
    let e = load_domain_config(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}: line 2: expected '=' after 'memory'", path.display())
    );
    assert_eq!(e.line(), Some(2));

    let missing: PathBuf = dir.path().join("missing.cfg");
    let e = load_domain_config(&missing).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: ", missing.display())), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn error_messages_from_the_brief() {
    let err = |text: &str| {
        parse_domain_config(text, Some(Path::new("/x")))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err("name = 'g'\nmemory = 8\n"),
        "line 2: memory must be between 16 and 1048576 MiB, got 8"
    );
    assert_eq!(
        err("name='g'\n\n\n\n\n\nvif = [ 'mac=00:16:3e:zz:9d:b0' ]"),
        "line 7: invalid MAC address '00:16:3e:zz:9d:b0'"
    );
    assert_eq!(err("# nothing\n"), "missing 'name'");
    assert_eq!(
        err("name = 'g'\nmemory = 64\non_reboot = 'reboot'"),
        "line 3: invalid on_reboot action 'reboot' (expected destroy, restart, preserve, rename-restart, coredump-destroy or coredump-restart)"
    );
}
