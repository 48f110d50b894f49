#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Store behaviour through its public API, on real sled files in temp dirs.

use std::os::unix::fs::PermissionsExt;

use store::{
    AddressPool, Backend, ChangeKind, Error, KeyPair, Sandbox, SandboxStatus, Store, TlsMode,
};

fn sandbox(name: &str, domain: &str) -> Sandbox {
    Sandbox {
        name: name.into(),
        domain: domain.into(),
        backend: Backend::Static {
            host: "127.0.0.1".into(),
        },
        ssh_port: 22,
        app_port: 8000,
        agent_port: 9999,
        agent_prefix: "shelley".into(),
        user: "debian".into(),
        client_keys: vec!["ssh-ed25519 AAAA test".into()],
        upstream_key: KeyPair {
            private_openssh: "secret".into(),
            public_openssh: "ssh-ed25519 BBBB".into(),
        },
        upstream_host_key: None,
        basic_auth: None,
        tls_mode: None,
        tls_cert_file: None,
        tls_key_file: None,
        status: SandboxStatus::Running,
        addresses: vec![],
        assigned_ipv4: None,
        egress: Default::default(),
        created_at: 0,
        updated_at: 0,
    }
}

#[test]
fn names_and_hosts_are_unique() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.insert(sandbox("a", "a.example.com")).unwrap();
    assert!(matches!(
        store.insert(sandbox("a", "other.example.com")),
        Err(Error::NameTaken(_))
    ));
    assert!(matches!(
        store.insert(sandbox("b", "a.example.com")),
        Err(Error::HostTaken { .. })
    ));
    // b's domain equals a's agent host.
    let err = store
        .insert(sandbox("b", "shelley.a.example.com"))
        .unwrap_err();
    assert!(
        matches!(err, Error::HostTaken { ref owner, .. } if owner == "a"),
        "{err}"
    );
    // b's agent host equals an existing domain: c owns example.org, b's
    // agent host would be shelley.example.org... use prefix collision.
    store.insert(sandbox("c", "x.example.org")).unwrap();
    let mut d = sandbox("d", "example.org");
    d.agent_prefix = "x".into();
    assert!(matches!(store.insert(d), Err(Error::HostTaken { .. })));
    assert_eq!(store.len(), 2);
    assert_eq!(
        store
            .owner_of_host("shelley.a.example.com")
            .unwrap()
            .as_deref(),
        Some("a")
    );
}

#[test]
fn update_moves_hosts_atomically_and_remove_frees_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.insert(sandbox("a", "a.example.com")).unwrap();
    store.insert(sandbox("b", "b.example.com")).unwrap();
    // Colliding update changes nothing.
    let err = store
        .update("a", |s| {
            s.domain = "b.example.com".into();
            Ok(())
        })
        .unwrap_err();
    assert!(matches!(err, Error::HostTaken { .. }));
    assert_eq!(store.get("a").unwrap().unwrap().domain, "a.example.com");
    assert_eq!(
        store.owner_of_host("a.example.com").unwrap().as_deref(),
        Some("a")
    );
    // A good update releases the old hosts.
    store
        .update("a", |s| {
            s.domain = "new.example.com".into();
            Ok(())
        })
        .unwrap();
    assert_eq!(store.owner_of_host("a.example.com").unwrap(), None);
    assert_eq!(
        store
            .owner_of_host("shelley.new.example.com")
            .unwrap()
            .as_deref(),
        Some("a")
    );
    // Invalid update rejected.
    assert!(matches!(
        store.update("a", |s| {
            s.app_port = 0;
            Ok(())
        }),
        Err(Error::Invalid { .. })
    ));
    store.remove("a").unwrap();
    assert!(matches!(store.remove("a"), Err(Error::NotFound(_))));
    store.insert(sandbox("c", "new.example.com")).unwrap();
}

#[test]
fn feed_reports_changes_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut rx = store.subscribe();
    let s1 = store.insert(sandbox("a", "a.example.com")).unwrap();
    let (_, s2) = store.remove("a").unwrap();
    assert!(s2 > s1);
    let c1 = rx.try_recv().unwrap();
    assert_eq!(c1.seq, s1);
    assert!(matches!(c1.kind, ChangeKind::Put(ref sb) if sb.name == "a"));
    let c2 = rx.try_recv().unwrap();
    assert!(matches!(c2.kind, ChangeKind::Removed(ref n) if n == "a"));
    assert_eq!(store.seq(), s2);
}

#[test]
fn update_if_writes_only_when_the_edit_asks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.insert(sandbox("a", "a.example.com")).unwrap();
    let before = store.get("a").unwrap().unwrap();
    let seq = store.seq();
    let mut rx = store.subscribe();
    // The edit declines: nothing written, nothing published, even though
    // it changed its copy.
    let (kept, written) = store
        .update_if("a", |sb| {
            sb.status = SandboxStatus::Stopped;
            Ok(false)
        })
        .unwrap();
    assert_eq!(written, None);
    assert_eq!(kept.status, SandboxStatus::Running);
    assert_eq!(
        store.get("a").unwrap().unwrap().status,
        SandboxStatus::Running
    );
    assert_eq!(
        store.get("a").unwrap().unwrap().updated_at,
        before.updated_at
    );
    assert_eq!(store.seq(), seq);
    assert!(rx.try_recv().is_err());
    // The edit accepts: written and published with the returned sequence.
    let (updated, written) = store
        .update_if("a", |sb| {
            sb.status = SandboxStatus::Stopped;
            Ok(true)
        })
        .unwrap();
    assert_eq!(updated.status, SandboxStatus::Stopped);
    assert_eq!(
        store.get("a").unwrap().unwrap().status,
        SandboxStatus::Stopped
    );
    assert_eq!(written, Some(store.seq()));
    assert_eq!(rx.try_recv().unwrap().seq, store.seq());
    // A missing record is still an error.
    assert!(matches!(
        store.update_if("nope", |_| Ok(false)),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn data_survives_reopen_and_second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    {
        let store = Store::open(&state).unwrap();
        store.insert(sandbox("a", "a.example.com")).unwrap();
        store
            .put_record("certs", "a.example.com", &serde_json::json!({"pem": "x"}))
            .unwrap();
        let second = Store::open(&state);
        assert!(
            matches!(second, Err(Error::Locked(_))),
            "second open allowed"
        );
        // The first one still works.
        store.insert(sandbox("b", "b.example.com")).unwrap();
    }
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let store = Store::open(&state).unwrap();
    assert_eq!(store.list().unwrap().len(), 2);
    assert_eq!(store.list_records("certs").unwrap().len(), 1);
}

#[test]
fn backup_and_restore_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(&dir.path().join("a")).unwrap();
    for i in 0..20 {
        a.insert(sandbox(&format!("s{i}"), &format!("s{i}.example.com")))
            .unwrap();
    }
    a.put_record(
        "acme-accounts",
        "https://ca/dir",
        &serde_json::json!({"k": 1}),
    )
    .unwrap();
    let backup = a.export().unwrap();
    let text = serde_json::to_string(&backup).unwrap();

    let b = Store::open(&dir.path().join("b")).unwrap();
    b.insert(sandbox("zz", "zz.example.com")).unwrap();
    let parsed: store::Backup = serde_json::from_str(&text).unwrap();
    assert!(matches!(
        b.import(&parsed, false, |_| {}),
        Err(Error::NotEmpty(1))
    ));
    let mut seen = 0;
    b.import(&parsed, true, |_| seen += 1).unwrap();
    assert_eq!(seen, 20);
    assert_eq!(b.export().unwrap(), backup);
    assert_eq!(b.owner_of_host("zz.example.com").unwrap(), None);

    // A bad backup changes nothing.
    let mut bad = backup.clone();
    bad.sandboxes[1].domain = bad.sandboxes[0].domain.clone();
    assert!(matches!(
        b.import(&bad, true, |_| {}),
        Err(Error::BadBackup(_))
    ));
    assert_eq!(b.export().unwrap(), backup);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path().join("db")).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema_version", &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(dir.path()).err().unwrap();
    assert!(
        matches!(err, Error::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}

#[test]
fn unversioned_data_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path().join("db")).unwrap();
        let mut v = serde_json::to_value(sandbox("old", "old.example.com")).unwrap();
        // A version-0 record lacks the fields added later.
        let obj = v.as_object_mut().unwrap();
        obj.remove("status");
        obj.remove("addresses");
        obj.remove("tls_mode");
        obj.remove("assigned_ipv4");
        obj.remove("egress");
        db.open_tree("sandboxes")
            .unwrap()
            .insert("old", serde_json::to_vec(&v).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let sb = store.get("old").unwrap().unwrap();
    assert_eq!(sb.status, SandboxStatus::Running);
    // Records from before egress policies get the default one.
    assert_eq!(sb.egress.mode, store::EgressMode::Restricted);
    assert_eq!(sb.assigned_ipv4, None);
}

/// The TLS mode is stored as the lowercase names it always had: records
/// written when it was a plain string load as the typed mode, a backup
/// carries the same strings, and a name no version wrote is a corrupt
/// record, not a silent default.
#[test]
fn tls_modes_keep_their_stored_names() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.insert(sandbox("new", "new.example.com")).unwrap();
    }
    {
        let db = sled::open(dir.path().join("db")).unwrap();
        let tree = db.open_tree("sandboxes").unwrap();
        for (name, mode) in [("a", "acme"), ("i", "internal"), ("m", "manual")] {
            let mut v =
                serde_json::to_value(sandbox(name, &format!("{name}.example.com"))).unwrap();
            v["tls_mode"] = serde_json::json!(mode);
            if mode == "manual" {
                v["tls_cert_file"] = serde_json::json!("/etc/c.pem");
                v["tls_key_file"] = serde_json::json!("/etc/k.pem");
            }
            tree.insert(name, serde_json::to_vec(&v).unwrap()).unwrap();
        }
        db.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let mode = |name: &str| store.get(name).unwrap().unwrap().tls_mode;
    assert_eq!(mode("a"), Some(TlsMode::Acme));
    assert_eq!(mode("i"), Some(TlsMode::Internal));
    assert_eq!(mode("m"), Some(TlsMode::Manual));
    assert_eq!(mode("new"), None);

    let backup = serde_json::to_value(store.export().unwrap()).unwrap();
    let modes: Vec<&serde_json::Value> = backup["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sb| &sb["tls_mode"])
        .collect();
    assert_eq!(
        modes,
        [
            &serde_json::json!("acme"),
            &serde_json::json!("internal"),
            &serde_json::json!("manual"),
            &serde_json::Value::Null
        ]
    );
    // The backup restores into an empty store with the same modes.
    let other = Store::open(&dir.path().join("other")).unwrap();
    let doc: store::Backup = serde_json::from_value(backup).unwrap();
    other.import(&doc, false, |_| {}).unwrap();
    assert_eq!(
        other.get("m").unwrap().unwrap().tls_mode,
        Some(TlsMode::Manual)
    );

    let mut v = serde_json::to_value(sandbox("x", "x.example.com")).unwrap();
    v["tls_mode"] = serde_json::json!("selfsigned");
    let err = serde_json::from_value::<Sandbox>(v).unwrap_err();
    assert!(
        err.to_string()
            .contains("tls mode \"selfsigned\": use acme, internal or manual"),
        "{err}"
    );
}

fn pool(first: &str, last: &str, preferred: Option<&str>, exclude: &[&str]) -> AddressPool {
    AddressPool {
        label: "test pool".into(),
        first: first.parse().unwrap(),
        last: last.parse().unwrap(),
        preferred: preferred.map(|p| p.parse().unwrap()),
        exclude: exclude.iter().map(|e| e.parse().unwrap()).collect(),
        start_offset: 0,
    }
}

#[test]
fn assigned_addresses_are_unique_and_follow_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for n in ["a", "b", "c"] {
        store
            .insert(sandbox(n, &format!("{n}.example.com")))
            .unwrap();
    }
    let p = pool("10.0.0.2", "10.0.0.4", None, &["10.0.0.2"]);
    let (a, _) = store.assign_ipv4("a", &p).unwrap();
    assert_eq!(a.assigned_ipv4.as_deref(), Some("10.0.0.3"));
    // Asking again keeps it; b may not take it even when preferring it.
    let (a, _) = store.assign_ipv4("a", &p).unwrap();
    assert_eq!(a.assigned_ipv4.as_deref(), Some("10.0.0.3"));
    let p_b = pool("10.0.0.2", "10.0.0.4", Some("10.0.0.3"), &["10.0.0.2"]);
    let (b, _) = store.assign_ipv4("b", &p_b).unwrap();
    assert_eq!(b.assigned_ipv4.as_deref(), Some("10.0.0.4"));
    assert!(matches!(
        store.assign_ipv4("c", &p),
        Err(Error::NoFreeAddress(_))
    ));
    // An edit cannot take another's address; a restore with a duplicate
    // is refused.
    let err = store
        .update("c", |sb| {
            sb.assigned_ipv4 = Some("10.0.0.3".into());
            Ok(())
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::AddressTaken { ref owner, .. } if owner == "a"),
        "{err}"
    );
    let mut backup = store.export().unwrap();
    backup.sandboxes[2].assigned_ipv4 = Some("10.0.0.3".into());
    assert!(matches!(
        Store::check_backup(&backup),
        Err(Error::BadBackup(_))
    ));
    // Removing a frees its address for c, and the index survives reopen.
    store.remove("a").unwrap();
    let (c, _) = store.assign_ipv4("c", &p).unwrap();
    assert_eq!(c.assigned_ipv4.as_deref(), Some("10.0.0.3"));
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.owner_of_address("10.0.0.3").unwrap().as_deref(),
        Some("c")
    );
    assert_eq!(
        store.owner_of_address("10.0.0.4").unwrap().as_deref(),
        Some("b")
    );
    // A pool that no longer holds the address (a renumbered bridge) moves it.
    let (c, _) = store
        .assign_ipv4("c", &pool("10.9.0.2", "10.9.0.9", None, &[]))
        .unwrap();
    assert_eq!(c.assigned_ipv4.as_deref(), Some("10.9.0.2"));
    assert_eq!(store.owner_of_address("10.0.0.3").unwrap(), None);
    // The search starts at the offset and wraps around.
    let mut p = pool("10.9.0.2", "10.9.0.9", None, &[]);
    p.start_offset = 7;
    let (b, _) = store.assign_ipv4("b", &p).unwrap();
    assert_eq!(b.assigned_ipv4.as_deref(), Some("10.9.0.9"));
    p.start_offset = 15;
    let (a2, _) = {
        store.insert(sandbox("a", "a.example.com")).unwrap();
        store.assign_ipv4("a", &p).unwrap()
    };
    assert_eq!(a2.assigned_ipv4.as_deref(), Some("10.9.0.3"));
}
