//! The cursor and the classification, driven by events alone.

use super::*;
use crate::wire::Refusal;

const NOT_ACTIVE: EndpointFailure = EndpointFailure::NotActive { active: None };

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Endpoints in order, no wait within a round, the backoff after each round.
#[test]
fn goes_round_in_order_and_waits_between_rounds() {
    let mut c = EndpointCursor::new(3);
    assert_eq!(c.current(), 0);
    let moves: Vec<(usize, Duration)> = (0..9)
        .map(|_| c.failed(EndpointFailure::Unreachable))
        .map(|m| (m.endpoint, m.wait))
        .collect();
    assert_eq!(
        moves,
        [
            (1, ms(0)),
            (2, ms(0)),
            (0, ms(20)),
            (1, ms(0)),
            (2, ms(0)),
            (0, ms(40)),
            (1, ms(0)),
            (2, ms(0)),
            (0, ms(80)),
        ]
    );
}

/// The wait doubles to its bound and stays there, however long the search.
#[test]
fn the_backoff_is_bounded() {
    let mut c = EndpointCursor::new(1);
    let waits: Vec<Duration> = (0..8).map(|_| c.failed(NOT_ACTIVE).wait).collect();
    assert_eq!(
        waits,
        [
            ms(20),
            ms(40),
            ms(80),
            ms(160),
            ms(320),
            ms(500),
            ms(500),
            ms(500)
        ]
    );
    for _ in 0..1000 {
        let m = c.failed(EndpointFailure::Closed);
        assert_eq!(
            m,
            EndpointMove {
                endpoint: 0,
                wait: FAILOVER_BACKOFF_MAX
            }
        );
    }
}

/// An answer ends the search: the next failure starts a fresh round at the first wait.
#[test]
fn an_answer_resets_the_round_and_the_wait() {
    let mut c = EndpointCursor::new(2);
    for _ in 0..6 {
        c.failed(EndpointFailure::Unreachable);
    }
    assert_eq!(c.current(), 0);
    c.answered();
    assert_eq!(
        c.failed(EndpointFailure::Closed),
        EndpointMove {
            endpoint: 1,
            wait: ms(0)
        }
    );
    assert_eq!(
        c.failed(NOT_ACTIVE),
        EndpointMove {
            endpoint: 0,
            wait: ms(20)
        }
    );
}

/// NOT_ACTIVE naming another endpoint goes there next, then in order from there.
#[test]
fn a_named_active_is_tried_next() {
    let mut c = EndpointCursor::new(4);
    let m = c.failed(EndpointFailure::NotActive { active: Some(2) });
    assert_eq!(
        m,
        EndpointMove {
            endpoint: 2,
            wait: ms(0)
        }
    );
    assert_eq!(c.current(), 2);
    let m = c.failed(EndpointFailure::Closed);
    assert_eq!(m.endpoint, 3);
}

/// A name that is the endpoint itself, or out of range, moves in order instead.
#[test]
fn a_useless_name_moves_in_order() {
    let mut c = EndpointCursor::new(3);
    assert_eq!(
        c.failed(EndpointFailure::NotActive { active: Some(0) })
            .endpoint,
        1
    );
    assert_eq!(
        c.failed(EndpointFailure::NotActive { active: Some(9) })
            .endpoint,
        2
    );
}

/// Two standbys that name each other (stale leases) cannot make the client spin: the
/// jumps count towards the round, and the round ends in a wait.
#[test]
fn standbys_naming_each_other_still_back_off() {
    let mut c = EndpointCursor::new(3);
    let mut waited = Duration::ZERO;
    let mut moves = 0;
    while waited < ms(1000) {
        let other = if c.current() == 0 { 1 } else { 0 };
        let m = c.failed(EndpointFailure::NotActive {
            active: Some(other),
        });
        waited += m.wait;
        moves += 1;
        assert!(moves < 100, "no wait after {moves} moves");
    }
    // 20 + 40 + 80 + 160 + 320 + 500 ≥ 1000 ms after six rounds of three.
    assert_eq!(moves, 18);
}

/// A standby's name for the active is matched against the endpoints as an address.
#[test]
fn named_addresses_map_to_endpoints() {
    let endpoints: Vec<SocketAddr> = vec![
        "10.0.0.1:7443".parse().unwrap(),
        "10.0.0.2:7443".parse().unwrap(),
        "[::1]:7443".parse().unwrap(),
    ];
    assert_eq!(endpoint_named(&endpoints, Some("10.0.0.2:7443")), Some(1));
    assert_eq!(endpoint_named(&endpoints, Some("[::1]:7443")), Some(2));
    assert_eq!(endpoint_named(&endpoints, Some("10.0.0.3:7443")), None);
    assert_eq!(
        endpoint_named(&endpoints, Some("custody-b.example:7443")),
        None
    );
    assert_eq!(endpoint_named(&endpoints, Some("")), None);
    assert_eq!(endpoint_named(&endpoints, None), None);
}

/// What is retried elsewhere (not run), what is unknown (in flight), what is final.
#[test]
fn results_are_classified() {
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let named = Refusal::not_active("a standby", Some("10.0.0.2:7443".into()));
    let cases: Vec<(Result<Reply, ClientError>, CallClass)> = vec![
        (
            Ok(Reply::Refused(named.clone())),
            CallClass::NotActive {
                active: Some("10.0.0.2:7443".into()),
            },
        ),
        (
            Ok(Reply::Refused(Refusal::not_active("a standby", None))),
            CallClass::NotActive { active: None },
        ),
        // A standby that refuses the connection itself with NOT_ACTIVE: nothing ran.
        (
            Err(ClientError::Refused(named)),
            CallClass::NotActive {
                active: Some("10.0.0.2:7443".into()),
            },
        ),
        (
            Ok(Reply::Refused(Refusal::new(Status::Busy, "full"))),
            CallClass::Answered,
        ),
        (
            Ok(Reply::Refused(Refusal::new(Status::Sealed, "sealed"))),
            CallClass::Answered,
        ),
        (
            Err(ClientError::Connect {
                addr,
                source: std::io::ErrorKind::ConnectionRefused.into(),
            }),
            CallClass::Unreachable,
        ),
        (
            Err(ClientError::Handshake {
                addr,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            }),
            CallClass::Unreachable,
        ),
        (Err(ClientError::Closed), CallClass::Lost),
        (
            Err(ClientError::OutcomeUnknown {
                endpoint: addr,
                request: Opcode::Derive,
            }),
            CallClass::Lost,
        ),
        (
            Err(ClientError::Refused(Refusal::new(
                Status::ConnectionLimit,
                "per identity",
            ))),
            CallClass::Final,
        ),
        (
            Err(ClientError::UnexpectedReply(Opcode::Derive)),
            CallClass::Final,
        ),
    ];
    for (result, want) in cases {
        assert_eq!(classify(&result), want, "{result:?}");
    }
}

/// Endpoints that refuse every connection: the call gives up at its deadline with
/// NoActive (several endpoints) or the connect error itself (one), having backed off.
#[test]
fn unreachable_endpoints_give_up_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::tls::write_dev_certs(dir.path(), "client").unwrap();
    let closed: Vec<SocketAddr> = (0..2).map(|_| closed_port()).collect();
    let base = ClientConfig {
        addr: closed[0],
        server_name: "localhost".into(),
        ca: certs.ca_cert.clone(),
        cert: certs.client_cert.clone(),
        key: certs.client_key.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut config = FailoverConfig::new(closed.clone(), &base);
        config.call_deadline = ms(300);
        let client = FailoverClient::new(config).unwrap();
        let started = Instant::now();
        let e = client.hello().await.unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(&e, ClientError::NoActive { endpoints: 2, last, .. }
            if matches!(**last, ClientError::Connect { .. })),
            "{e:?}"
        );
        // Rounds of 20, 40, 80 ms fit in 300 ms; the 160 ms one would end past it.
        assert!(took >= ms(140) && took < ms(300), "{took:?}");

        let mut one = FailoverConfig::new(vec![closed[0]], &base);
        one.call_deadline = Duration::ZERO;
        let client = FailoverClient::new(one).unwrap();
        let e = client.hello().await.unwrap_err();
        assert!(
            matches!(e, ClientError::Connect { addr, .. } if addr == closed[0]),
            "{e:?}"
        );
    });
}

/// A local port nothing listens on (bound, then closed).
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
