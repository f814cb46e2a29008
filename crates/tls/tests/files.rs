//! Host identities and the trust store on disk.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tern_tls::{Fingerprint, Identity, TlsError, TrustStore};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn identity_is_created_private_and_reloads_with_the_same_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("state/tls");
    let (cert, key) = (tls.join("host.crt"), tls.join("host.key"));
    let made = Identity::load_or_create(&cert, &key, "host-a.example").unwrap();
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&cert), 0o644);
    assert_eq!(mode(&tls), 0o700);
    assert_eq!(mode(&dir.path().join("state")), 0o700);
    let pem = fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    // No temporary files are left behind.
    assert_eq!(fs::read_dir(&tls).unwrap().count(), 2);

    let again = Identity::load_or_create(&cert, &key, "ignored").unwrap();
    assert_eq!(again.fingerprint(), made.fingerprint());
    assert_eq!(
        Identity::load(&cert, &key).unwrap().fingerprint(),
        made.fingerprint()
    );
    assert_eq!(
        Fingerprint::of_certificate(&made.certificate_chain()[0]).unwrap(),
        made.fingerprint()
    );
}

#[test]
fn reissued_certificate_keeps_the_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("host.crt"), dir.path().join("host.key"));
    let original = Identity::load_or_create(&cert, &key, "old-name").unwrap();

    let key_pair = rcgen::KeyPair::from_pem(&fs::read_to_string(&key).unwrap()).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["new-name".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2030, 1, 1);
    let reissued = params.self_signed(&key_pair).unwrap();
    fs::write(&cert, reissued.pem()).unwrap();
    let reloaded = Identity::load(&cert, &key).unwrap();
    assert_eq!(reloaded.fingerprint(), original.fingerprint());
    assert_ne!(
        reloaded.certificate_chain()[0],
        original.certificate_chain()[0]
    );
}

#[test]
fn mismatched_key_and_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = (dir.path().join("a.crt"), dir.path().join("a.key"));
    let b = (dir.path().join("b.crt"), dir.path().join("b.key"));
    let a_id = Identity::load_or_create(&a.0, &a.1, "a").unwrap();
    Identity::load_or_create(&b.0, &b.1, "b").unwrap();
    let err = Identity::load(&a.0, &b.1).unwrap_err().to_string();
    assert!(
        err.contains("does not belong to the certificate")
            && err.contains(&a_id.fingerprint().to_string()),
        "{err}"
    );
    assert!(Identity::load_or_create(&a.0, &b.1, "a").is_err());
}

#[test]
fn a_lone_key_or_certificate_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("host.crt"), dir.path().join("host.key"));
    Identity::load_or_create(&cert, &key, "h").unwrap();
    fs::remove_file(&cert).unwrap();
    let err = Identity::load_or_create(&cert, &key, "h")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("host.crt: missing while") && err.contains("host.key exists"),
        "{err}"
    );
    assert!(
        !cert.exists(),
        "nothing may be made when one file is missing"
    );

    fs::write(&cert, "not pem").unwrap();
    let err = Identity::load(&cert, &key).unwrap_err().to_string();
    assert!(err.contains("holds no certificate"), "{err}");
}

#[test]
fn trust_store_add_list_remove_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon/trusted-hosts.json");
    let fp1 = Fingerprint::of_public_key(b"one");
    let fp2 = Fingerprint::of_public_key(b"two");
    let fp3 = Fingerprint::of_public_key(b"three");

    let mut store = TrustStore::open(&path).unwrap();
    assert!(store.hosts().is_empty());
    assert!(!path.exists(), "opening creates nothing");
    store.add(fp1, Some("node-1".into())).unwrap();
    store.add(fp2, None).unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(store.fingerprints(), [fp1, fp2]);
    assert!(store.hosts()[0].added_unix > 1_600_000_000);

    // Re-adding keeps the entry and renames it; no name keeps the old one.
    let added = store.hosts()[0].added_unix;
    store.add(fp1, Some("node-1.rack-2".into())).unwrap();
    store.add(fp1, None).unwrap();
    assert_eq!(store.hosts().len(), 2);
    assert_eq!(store.hosts()[0].name.as_deref(), Some("node-1.rack-2"));
    assert_eq!(store.hosts()[0].added_unix, added);

    // Names are unique and well formed.
    let err = store.add(fp3, Some("node-1.rack-2".into())).unwrap_err();
    assert!(matches!(err, TlsError::NameTaken { fingerprint, .. } if fingerprint == fp1));
    for bad in ["", "has space", "sha256:x", "ü", &"x".repeat(65)] {
        let err = store.add(fp3, Some(bad.into())).unwrap_err();
        assert!(matches!(err, TlsError::BadName { .. }), "{bad}: {err}");
    }
    store
        .add(fp3, Some(format!("{}_.-9", "x".repeat(60))))
        .unwrap();

    let reopened = TrustStore::open(&path).unwrap();
    assert_eq!(reopened.hosts(), store.hosts());

    // Remove by name and by fingerprint (any hex case); unknown ones are named.
    assert_eq!(store.remove("node-1.rack-2").unwrap().fingerprint, fp1);
    let upper = fp2.to_string().to_uppercase().replace("SHA256:", "sha256:");
    assert_eq!(store.remove(&upper).unwrap().fingerprint, fp2);
    let err = store.remove("node-1.rack-2").unwrap_err().to_string();
    assert!(err.contains("\"node-1.rack-2\""), "{err}");
    let err = store.remove(&fp1.to_string()).unwrap_err().to_string();
    assert!(err.contains(&fp1.to_string()), "{err}");
    assert!(matches!(
        store.remove("sha256:zz"),
        Err(TlsError::BadFingerprint { .. })
    ));
    assert_eq!(TrustStore::open(&path).unwrap().fingerprints(), [fp3]);
    assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
}

#[test]
fn damaged_trust_store_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trusted-hosts.json");
    fs::write(&path, "{\"hosts\": [{\"fingerprint\": \"md5:00\"").unwrap();
    let err = TrustStore::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("damaged trust store") && err.contains("fix or remove it"),
        "{err}"
    );
    let fp = Fingerprint::of_public_key(b"k");
    let twice = format!(
        "{{\"hosts\": [{{\"fingerprint\": \"{fp}\", \"name\": null, \"added_unix\": 1}}, {{\"fingerprint\": \"{fp}\", \"name\": null, \"added_unix\": 2}}]}}"
    );
    fs::write(&path, twice).unwrap();
    let err = TrustStore::open(&path).unwrap_err().to_string();
    assert!(err.contains("appears twice"), "{err}");
}
