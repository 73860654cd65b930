//! The compliance region switch over real TLS sockets: an admin disables a region, every
//! core refuses derivations in it from the moment the switch answers, the switch is
//! audited and survives a restart, and only admins may flip it.

mod common;

use common::{asset, derive_body, read_audit, runtime, TestAppliance, TEST_ROLES};
use custody::audit::AuditEvent;
use custody::client::Client;
use custody::wire::Status;

fn body_in(a: uuid::Uuid, region: &str) -> custody::op::DeriveBody {
    let mut b = derive_body(a, "m/44'/0'/0'/0'/1");
    b.region = region.into();
    b
}

#[test]
fn a_disabled_region_is_refused_on_every_core_at_once_durably_and_audited() {
    let mut app = TestAppliance::start_with(&format!(
        "[policy]\n{TEST_ROLES}admins = [\"test-client\"]\n"
    ));
    let assets: Vec<uuid::Uuid> = (0..16).map(|n| asset(9100 + n)).collect();
    let rt = runtime();
    rt.block_on(async {
        let admin = Client::connect(&app.client_config()).await.unwrap();
        for a in &assets {
            admin.register(*a).await.unwrap();
        }
        // Several connections, so that requests land on both cores and both shards.
        let mut clients = Vec::new();
        for _ in 0..6 {
            clients.push(Client::connect(&app.client_config()).await.unwrap());
        }
        for c in &clients {
            for a in &assets {
                c.derive(body_in(*a, "EU-WEST")).await.unwrap();
            }
        }
        let list = admin.set_region("EU-WEST", false).await.unwrap();
        assert!(list.contains(&("EU-WEST".to_string(), false)), "{list:?}");
        // From the answer on: refused everywhere, with no audit record; others still serve.
        for c in &clients {
            for a in &assets {
                let e = c.derive(body_in(*a, "EU-WEST")).await.unwrap_err();
                assert_eq!(e.status(), Some(Status::RegionDisabled));
                c.derive(body_in(*a, "US-EAST")).await.unwrap();
            }
        }
        let e = admin.set_region("MARS", false).await.unwrap_err();
        assert_eq!(e.status(), Some(Status::InvalidRegion));
    });
    app.kill9();
    app.launch();
    rt.block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        let list = c.regions().await.unwrap();
        assert_eq!(
            list,
            [
                ("US-EAST".to_string(), true),
                ("EU-WEST".to_string(), false),
                ("APAC".to_string(), true)
            ]
        );
        let e = c.derive(body_in(assets[0], "EU-WEST")).await.unwrap_err();
        assert_eq!(e.status(), Some(Status::RegionDisabled));
        c.set_region("EU-WEST", true).await.unwrap();
        c.derive(body_in(assets[0], "EU-WEST")).await.unwrap();
    });
    let switches: Vec<(AuditEvent, Option<String>, String)> = read_audit(&app.db_path())
        .into_iter()
        .filter(|r| {
            matches!(
                r.event,
                AuditEvent::RegionEnable | AuditEvent::RegionDisable
            )
        })
        .map(|r| (r.event, r.region, r.requester))
        .collect();
    assert_eq!(
        switches,
        [
            (
                AuditEvent::RegionDisable,
                Some("EU-WEST".into()),
                "test-client".into()
            ),
            (
                AuditEvent::RegionEnable,
                Some("EU-WEST".into()),
                "test-client".into()
            ),
        ]
    );
}

#[test]
fn only_admins_switch_regions_and_any_role_lists_them() {
    let app = TestAppliance::start();
    runtime().block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        let e = c.set_region("APAC", false).await.unwrap_err();
        assert_eq!(e.status(), Some(Status::Forbidden));
        assert!(c
            .regions()
            .await
            .unwrap()
            .iter()
            .all(|(_, enabled)| *enabled));
    });
    // Through the CLI.
    let out = app.custody(&[
        "--addr",
        &app.addr.to_string(),
        "--certs",
        &app.certs().display().to_string(),
        "regions",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("APAC enabled"), "{text}");
}
