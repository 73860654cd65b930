//! Shard-aware clients over real sockets: HELLO announces a port per shard
//! (`server.shard_listen`); `ShardedClient` sends each asset's requests to the port of
//! the shard that owns it, and the appliance hands none of them to another core, while
//! a plain client on the shared port keeps working (its requests for the other shard's
//! assets cross cores, which the metric shows).

mod common;

use common::{asset, derive_body, http_get, runtime, TestAppliance};
use custody::client::{Client, ShardedClient};
use std::time::Duration;

/// custody_cross_core_requests_total over the cores, once the cores have published.
fn cross_core(app: &TestAppliance) -> f64 {
    std::thread::sleep(Duration::from_millis(400));
    let (_, m) = http_get(app.admin, "/metrics");
    m.lines()
        .filter(|l| l.starts_with("custody_cross_core_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[test]
fn a_shard_aware_client_never_crosses_cores_and_a_plain_one_still_works() {
    let mut app = TestAppliance::prepare_with("");
    let base = common::free_ports(2);
    app.set_server(&format!("shard_listen = \"127.0.0.1:{base}\"\n"));
    app.launch();
    let rt = runtime();

    let plain = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let hello = rt.block_on(plain.hello()).unwrap();
    assert_eq!(hello.shard_count, 2);
    assert_eq!(hello.shard_ports, vec![base, base + 1]);

    let sharded = rt
        .block_on(ShardedClient::connect(&app.client_config()))
        .unwrap();
    assert!(sharded.is_shard_aware());
    let assets: Vec<_> = (0..24).map(|i| asset(9_000 + i)).collect();
    rt.block_on(async {
        for a in &assets {
            sharded
                .call(&custody::op::Request::Register { asset: *a })
                .await
                .unwrap();
            let reply = sharded
                .call(&custody::op::Request::Derive(derive_body(
                    *a,
                    "m/44'/0'/0'/0'/1",
                )))
                .await
                .unwrap();
            let custody::op::Reply::Derived(d) = reply else {
                panic!("{reply:?}")
            };
            assert_eq!(
                d.receipt.shard,
                custody::placement::shard_of(a, hello.shard_count),
                "the receipt names the shard the client routed to"
            );
        }
    });
    // Both shards own some of the assets, and nothing crossed.
    let owners: std::collections::BTreeSet<u16> = assets
        .iter()
        .map(|a| custody::placement::shard_of(a, 2))
        .collect();
    assert_eq!(owners.len(), 2);
    assert_eq!(cross_core(&app), 0.0);

    // A plain client on the shared port: every request still answered; the ones for the
    // other core's assets are handed over (at least one, with 24 assets on 2 shards,
    // whichever core took the connection).
    rt.block_on(async {
        for a in &assets {
            plain
                .derive(derive_body(*a, "m/44'/0'/0'/0'/2"))
                .await
                .unwrap();
        }
    });
    assert!(cross_core(&app) > 0.0);
}

/// Without `server.shard_listen` HELLO announces no ports and the shard-aware client
/// falls back to the shared port.
#[test]
fn without_shard_ports_the_shard_aware_client_uses_the_shared_port() {
    let app = TestAppliance::start();
    let rt = runtime();
    let sharded = rt
        .block_on(ShardedClient::connect(&app.client_config()))
        .unwrap();
    assert!(!sharded.is_shard_aware());
    assert!(sharded.hello().shard_ports.is_empty());
    let a = asset(9_100);
    rt.block_on(async {
        sharded
            .call(&custody::op::Request::Register { asset: a })
            .await
            .unwrap();
        sharded
            .call(&custody::op::Request::Derive(derive_body(
                a,
                "m/44'/0'/0'/0'/1",
            )))
            .await
            .unwrap();
    });
}
