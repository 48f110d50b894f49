//! The routing table against a real store (sled on a temp dir): built from
//! the store, then kept in step by applying the store's change feed one
//! change at a time. After every change the gates' views (`SshRoutes`,
//! `HttpRoutes`) must show exactly the stored state: the changed sandbox's
//! new hosts, keys and status, none of its old hosts, and every other
//! sandbox's routes untouched (the same shared values).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use httpgate::RouteSource as _;
use sshgate::RouteSource as _;
use store::{Change, ChangeKind, Sandbox, SandboxStatus, Store};
use tokio::sync::broadcast;

use super::{Defaults, HttpRoutes, Routes, RoutingTable, Service, SshRoutes, Target};
use crate::keys;

/// A store on a temp dir and a subscription to its feed.
struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    feed: broadcast::Receiver<Change>,
    routes: Arc<Routes>,
}

impl Fixture {
    /// A store holding `sandboxes` (name, domain) and a table built from it.
    fn with(sandboxes: &[(&str, &str)]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (name, domain) in sandboxes {
            store.insert(sandbox(name, domain)).unwrap();
        }
        let feed = store.subscribe();
        let table = RoutingTable::build(
            store.list().unwrap(),
            store.seq(),
            Arc::new(Defaults::default()),
        );
        Fixture {
            _dir: dir,
            store,
            feed,
            routes: Routes::new(table),
        }
    }

    /// Applies the next change of the feed (which must be there); returns it.
    fn apply_next(&mut self) -> Change {
        let change = self.feed.try_recv().expect("a change in the feed");
        assert!(self.routes.apply(&change), "{change:?} not applied");
        change
    }

    fn ssh(&self) -> SshRoutes {
        SshRoutes(self.routes.clone())
    }

    fn http(&self) -> HttpRoutes {
        HttpRoutes(self.routes.clone())
    }

    /// Every HTTP host the HTTPS gate sees, with the sandbox it leads to.
    fn hosts(&self) -> BTreeSet<(String, String)> {
        self.http()
            .hosts()
            .into_iter()
            .map(|(host, route)| (host, route.sandbox.clone()))
            .collect()
    }

    /// The shared route value of `name` in the current snapshot.
    fn route_of(&self, name: &str) -> Arc<super::SandboxRoute> {
        self.routes.snapshot().by_user(name).unwrap().clone()
    }
}

/// A static sandbox on 127.0.0.1 with a real gateway key and one client
/// key, as the store keeps it.
fn sandbox(name: &str, domain: &str) -> Sandbox {
    let (private, public) = keys::generate_ed25519(name).unwrap();
    serde_json::from_value(serde_json::json!({
        "name": name,
        "domain": domain,
        "backend": {"kind": "static", "host": "127.0.0.1"},
        "ssh_port": 22,
        "app_port": 8000,
        "agent_port": 9999,
        "agent_prefix": "shelley",
        "user": "debian",
        "client_keys": [client_key(&format!("{name}-client"))],
        "upstream_key": {"private_openssh": private, "public_openssh": public},
        "upstream_host_key": null,
        "basic_auth": null,
        "created_at": 0,
        "updated_at": 0,
    }))
    .unwrap()
}

fn client_key(comment: &str) -> String {
    keys::generate_ed25519(comment).unwrap().1
}

/// `(host, sandbox)` pairs for the app and agent hosts of each (name, domain).
fn host_set(sandboxes: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    sandboxes
        .iter()
        .flat_map(|(name, domain)| {
            [
                (domain.to_string(), name.to_string()),
                (format!("shelley.{domain}"), name.to_string()),
            ]
        })
        .collect()
}

#[test]
fn a_table_built_from_the_store_routes_every_sandbox_by_user_and_host() {
    let f = Fixture::with(&[("a", "a.test"), ("b", "b.test")]);
    let table = f.routes.snapshot();
    assert_eq!(table.generation, f.store.seq());
    assert_eq!(table.len(), 2);
    assert_eq!(table.entries(), 2 + 4);
    assert_eq!(f.hosts(), host_set(&[("a", "a.test"), ("b", "b.test")]));

    let (route, service) = table.by_host("a.test").unwrap();
    assert_eq!((route.sandbox.name.as_str(), *service), ("a", Service::App));
    let (route, service) = table.by_host("shelley.b.test").unwrap();
    assert_eq!(
        (route.sandbox.name.as_str(), *service),
        ("b", Service::Agent)
    );
    assert!(table.by_host("c.test").is_none());

    let ssh = f.ssh().lookup("a").unwrap();
    assert_eq!(ssh.sandbox, "a");
    assert_eq!(ssh.user, "debian");
    assert_eq!(ssh.authorized_keys.len(), 1);
    assert_eq!(
        ssh.target,
        sshgate::Target::Addr {
            host: "127.0.0.1".into(),
            port: 22
        }
    );
    // The agent host has no login yet: closed; the app host is open.
    let agent = f.http().lookup("shelley.a.test").unwrap();
    assert_eq!(agent.kind, httpgate::RouteKind::Agent);
    assert!(matches!(agent.access, httpgate::Access::Closed));
    assert!(matches!(
        agent.target,
        httpgate::Target::Addr { ref host, port: 9999 } if host == "127.0.0.1"
    ));
    let app = f.http().lookup("a.test").unwrap();
    assert!(matches!(app.access, httpgate::Access::Open));
    assert!(f.ssh().lookup("c").is_none());
}

#[test]
fn an_added_sandbox_is_routed_and_the_others_are_untouched() {
    let mut f = Fixture::with(&[("a", "a.test")]);
    let a_before = f.route_of("a");
    f.store.insert(sandbox("c", "c.test")).unwrap();
    let change = f.apply_next();

    assert_eq!(f.routes.snapshot().generation, change.seq);
    assert_eq!(*f.routes.watch().borrow(), change.seq);
    assert_eq!(f.hosts(), host_set(&[("a", "a.test"), ("c", "c.test")]));
    assert_eq!(f.ssh().lookup("c").unwrap().sandbox, "c");
    assert!(Arc::ptr_eq(&a_before, &f.route_of("a")), "a was rebuilt");
}

#[test]
fn a_renamed_domain_leaves_no_stale_host() {
    let mut f = Fixture::with(&[("a", "a.test"), ("b", "b.test")]);
    let b_before = f.route_of("b");
    f.store
        .update("a", |s| {
            s.domain = "renamed.test".into();
            Ok(())
        })
        .unwrap();
    f.apply_next();

    assert_eq!(
        f.hosts(),
        host_set(&[("a", "renamed.test"), ("b", "b.test")])
    );
    assert!(f.http().lookup("a.test").is_none());
    assert!(f.http().lookup("shelley.a.test").is_none());
    assert_eq!(f.http().lookup("renamed.test").unwrap().sandbox, "a");
    assert_eq!(f.routes.snapshot().entries(), 2 + 4);
    assert!(Arc::ptr_eq(&b_before, &f.route_of("b")), "b was rebuilt");

    // The freed name can be taken by another sandbox at once.
    f.store.insert(sandbox("c", "a.test")).unwrap();
    f.apply_next();
    assert_eq!(f.http().lookup("a.test").unwrap().sandbox, "c");
    assert_eq!(f.http().lookup("shelley.a.test").unwrap().sandbox, "c");
}

#[test]
fn a_changed_agent_prefix_moves_only_the_agent_host() {
    let mut f = Fixture::with(&[("a", "a.test")]);
    f.store
        .update("a", |s| {
            s.agent_prefix = "agent".into();
            Ok(())
        })
        .unwrap();
    f.apply_next();
    let hosts: BTreeSet<String> = f.hosts().into_iter().map(|(h, _)| h).collect();
    assert_eq!(
        hosts,
        BTreeSet::from(["a.test".to_string(), "agent.a.test".to_string()])
    );
}

#[test]
fn added_and_removed_client_keys_reach_the_ssh_gate() {
    let mut f = Fixture::with(&[("a", "a.test"), ("b", "b.test")]);
    let b_ssh = f.ssh().lookup("b").unwrap();
    let extra = client_key("extra");
    let added = extra.clone();
    f.store
        .update("a", move |s| {
            s.client_keys.push(added.clone());
            Ok(())
        })
        .unwrap();
    f.apply_next();
    let route = f.ssh().lookup("a").unwrap();
    assert_eq!(route.authorized_keys.len(), 2);
    assert!(keys::same_key(&extra, &route.authorized_keys[1]));

    let removed = extra.clone();
    f.store
        .update("a", move |s| {
            s.client_keys.retain(|k| *k != removed);
            Ok(())
        })
        .unwrap();
    f.apply_next();
    let route = f.ssh().lookup("a").unwrap();
    assert_eq!(route.authorized_keys.len(), 1);
    assert!(!keys::same_key(&extra, &route.authorized_keys[0]));
    assert!(Arc::ptr_eq(&b_ssh, &f.ssh().lookup("b").unwrap()));
}

#[test]
fn a_status_change_reaches_both_gates_and_back() {
    let mut f = Fixture::with(&[("a", "a.test"), ("b", "b.test")]);
    let set_status = |f: &mut Fixture, status: SandboxStatus| {
        f.store
            .update("a", move |s| {
                s.status = status.clone();
                Ok(())
            })
            .unwrap();
        f.apply_next();
    };

    set_status(&mut f, SandboxStatus::Stopped);
    assert_eq!(
        f.ssh().lookup("a").unwrap().target,
        sshgate::Target::Stopped
    );
    assert!(matches!(
        f.http().lookup("a.test").unwrap().target,
        httpgate::Target::Stopped
    ));
    assert!(matches!(
        f.http().lookup("shelley.a.test").unwrap().target,
        httpgate::Target::Stopped
    ));
    // Still routed (the gates answer "stopped"), and b still runs.
    assert_eq!(f.hosts(), host_set(&[("a", "a.test"), ("b", "b.test")]));
    assert!(matches!(
        f.http().lookup("b.test").unwrap().target,
        httpgate::Target::Addr { .. }
    ));

    set_status(
        &mut f,
        SandboxStatus::Failed {
            reason: "disk full".into(),
        },
    );
    assert_eq!(
        f.ssh().lookup("a").unwrap().target,
        sshgate::Target::Unavailable {
            reason: "disk full".into()
        }
    );
    assert_eq!(
        f.route_of("a").http_target(Service::App),
        Target::Unavailable {
            reason: "disk full".into()
        }
    );

    set_status(&mut f, SandboxStatus::Running);
    assert_eq!(
        f.ssh().lookup("a").unwrap().target,
        sshgate::Target::Addr {
            host: "127.0.0.1".into(),
            port: 22
        }
    );
    assert!(matches!(
        f.http().lookup("a.test").unwrap().target,
        httpgate::Target::Addr { port: 8000, .. }
    ));
}

#[test]
fn a_removed_sandbox_leaves_nothing_behind_and_others_stay() {
    let mut f = Fixture::with(&[("a", "a.test"), ("b", "b.test")]);
    let a_before = f.route_of("a");
    f.store.remove("b").unwrap();
    let change = f.apply_next();
    assert!(matches!(change.kind, ChangeKind::Removed(ref n) if n == "b"));

    assert!(f.ssh().lookup("b").is_none());
    assert!(f.http().lookup("b.test").is_none());
    assert!(f.http().lookup("shelley.b.test").is_none());
    assert_eq!(f.hosts(), host_set(&[("a", "a.test")]));
    assert_eq!(f.routes.snapshot().entries(), 1 + 2);
    assert!(Arc::ptr_eq(&a_before, &f.route_of("a")));

    // Removing what is not there (a replayed change) changes nothing.
    assert!(f.routes.apply(&change));
    assert_eq!(f.hosts(), host_set(&[("a", "a.test")]));
}

#[test]
fn a_replayed_change_never_takes_a_host_another_sandbox_now_owns() {
    // b takes over a.test before a's move off it is applied (the feed
    // replays changes after a rebuild): dropping a's old hosts must not
    // drop b's.
    let f = Fixture::with(&[("a", "a.test")]);
    let mut b = sandbox("b", "a.test");
    b.agent_prefix = "agent".into();
    let seq = f.store.seq();
    f.routes.apply(&Change {
        seq: seq + 1,
        kind: ChangeKind::Put(Arc::new(b)),
    });
    let mut a = (*f.route_of("a").sandbox).clone();
    a.domain = "moved.test".into();
    f.routes.apply(&Change {
        seq: seq + 2,
        kind: ChangeKind::Put(Arc::new(a)),
    });

    assert_eq!(f.http().lookup("a.test").unwrap().sandbox, "b");
    assert_eq!(
        f.hosts(),
        BTreeSet::from([
            ("a.test".to_string(), "b".to_string()),
            ("agent.a.test".to_string(), "b".to_string()),
            ("moved.test".to_string(), "a".to_string()),
            ("shelley.moved.test".to_string(), "a".to_string()),
        ])
    );
    assert_eq!(f.routes.snapshot().generation, seq + 2);
}

#[test]
fn a_reset_is_not_applied_but_rebuilt_from_the_store() {
    let mut f = Fixture::with(&[("a", "a.test")]);
    f.store.insert(sandbox("b", "b.test")).unwrap();
    let reset = Change {
        seq: f.store.seq(),
        kind: ChangeKind::Reset,
    };
    assert!(!f.routes.apply(&reset));
    // Nothing changed by the refused change...
    assert_eq!(f.hosts(), host_set(&[("a", "a.test")]));
    // ...and a rebuild reads the whole store.
    f.routes.rebuild(&f.store).unwrap();
    assert_eq!(f.hosts(), host_set(&[("a", "a.test"), ("b", "b.test")]));
    assert_eq!(f.routes.snapshot().generation, f.store.seq());
    // The put still queued in the feed re-applies to the same result.
    f.apply_next();
    assert_eq!(f.hosts(), host_set(&[("a", "a.test"), ("b", "b.test")]));
}
