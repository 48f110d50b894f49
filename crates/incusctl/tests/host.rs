//! Storage pools, networks and profiles against the real incusd: create,
//! read back, update a profile's devices, delete; a missing object reads
//! as `None`, a second create is a conflict.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use testsupport::{require, Component};

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn pool_network_and_profile_round_trip() {
    if !require(&[Component::Incus]) {
        return;
    }
    let incus = testsupport::incus::client().await;
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let pool = format!("t-incusctl-p-{tag}");
    let bridge = format!("tic{tag}");
    let profile = format!("t-incusctl-pr-{tag}");

    assert!(incus.storage_pool(&pool).await.unwrap().is_none());
    assert!(incus.network(&bridge).await.unwrap().is_none());
    assert!(incus.profile(&profile).await.unwrap().is_none());

    incus
        .create_storage_pool(&pool, "dir", &BTreeMap::new())
        .await
        .unwrap();
    let err = incus
        .create_storage_pool(&pool, "dir", &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(err.is_conflict() || err.status().is_some(), "{err}");
    let p = incus.storage_pool(&pool).await.unwrap().unwrap();
    assert_eq!(p.driver, "dir");

    let cidr = format!("198.19.{}.1/24", 1 + rand::random::<u8>() % 250);
    incus
        .create_bridge(
            &bridge,
            &map(&[
                ("ipv4.address", &cidr),
                ("ipv4.nat", "false"),
                ("ipv6.address", "none"),
            ]),
        )
        .await
        .unwrap();
    let n = incus.network(&bridge).await.unwrap().unwrap();
    assert_eq!(n.kind, "bridge");
    assert!(n.managed);
    assert_eq!(n.config["ipv4.address"], cidr);

    let mut prof = incusctl::Profile {
        name: profile.clone(),
        description: "test".into(),
        devices: [(
            "eth0".to_string(),
            map(&[("type", "nic"), ("name", "eth0"), ("network", &bridge)]),
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    incus.create_profile(&prof).await.unwrap();
    prof.devices.insert(
        "root".into(),
        map(&[("type", "disk"), ("path", "/"), ("pool", &pool)]),
    );
    incus.update_profile(&prof).await.unwrap();
    let got = incus.profile(&profile).await.unwrap().unwrap();
    assert_eq!(got.devices["eth0"]["network"], bridge);
    assert_eq!(got.devices["root"]["pool"], pool);
    assert_eq!(got.description, "test");

    incus.delete_profile(&profile).await.unwrap();
    incus.delete_network(&bridge).await.unwrap();
    incus.delete_storage_pool(&pool).await.unwrap();
    assert!(incus.profile(&profile).await.unwrap().is_none());
    assert!(incus.network(&bridge).await.unwrap().is_none());
    assert!(incus.storage_pool(&pool).await.unwrap().is_none());
}
