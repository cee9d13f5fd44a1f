//! The production threading model: traffic served by worker threads (own runtime, own accept
//! socket via SO_REUSEPORT, own connection pools), as `detour sidecar` runs it.

mod common;

use std::time::Duration;

use common::*;
use http::Method;

async fn start_with_workers(pods: usize, workers: usize) -> (Vec<SimPod>, SidecarHandle) {
    let mut sims = Vec::new();
    for i in 0..pods {
        sims.push(SimPod::start(format!("pod-{i}")).await.unwrap());
    }
    let addrs: Vec<_> = sims.iter().map(SimPod::addr).collect();
    let opts = Options {
        workers,
        ..Options::default()
    };
    let sidecar = Sidecar::start(config_for(&addrs, fast_policy()), opts)
        .await
        .expect("sidecar starts");
    (sims, sidecar)
}

#[tokio::test]
async fn workers_serve_concurrent_clients_and_absorb_a_dead_pod() {
    let (pods, sidecar) = start_with_workers(3, 2).await;
    let addr = sidecar.listener_addr(UPSTREAM).unwrap();
    // Many client connections: the kernel spreads them over both workers' sockets.
    let run = |n: usize| {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                tokio::spawn(async move {
                    let mut ok = 0;
                    let mut tx = connect(addr).await.expect("connect");
                    for _ in 0..20 {
                        let r = send_on(&mut tx, request(Method::GET, "/"))
                            .await
                            .expect("send");
                        if r.status == 200 {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        async move {
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap();
            }
            total
        }
    };
    let ok = within(PATIENCE, "healthy traffic", run(16)).await;
    assert_eq!(ok, 16 * 20);
    let served: u64 = pods.iter().map(SimPod::requests).sum();
    assert_eq!(served, 320, "every request reached exactly one pod");
    assert!(pods.iter().all(|p| p.requests() > 0), "load is spread");

    pods[2].set_fault(Fault::Refuse).await.unwrap();
    let ok = within(PATIENCE, "traffic with a dead pod", run(16)).await;
    assert_eq!(
        ok,
        16 * 20,
        "a dead pod is absorbed by retries on every worker"
    );
    let m = Metrics::parse(&sidecar.metrics_text()).unwrap();
    assert_eq!(
        m.sum(
            "detour_requests_total",
            &[("upstream", UPSTREAM), ("status", "200")]
        ),
        640.0
    );
    within(
        PATIENCE,
        "shutdown",
        sidecar.shutdown(Duration::from_secs(2)),
    )
    .await;
}

#[tokio::test]
async fn workers_pick_up_reloads_and_new_listeners() {
    let (pods, sidecar) = start_with_workers(2, 2).await;
    let addr = sidecar.listener_addr(UPSTREAM).unwrap();
    assert_eq!(
        send_fresh(addr, request(Method::GET, "/"))
            .await
            .unwrap()
            .status,
        200
    );
    // A second upstream on a new listener, and the first one down to one pod.
    let mut cfg = config_for(&[pods[0].addr()], fast_policy());
    let mut second = cfg.upstreams[0].clone();
    second.name = "test/second".into();
    second.endpoints = vec![Endpoint {
        address: pods[1].addr().to_string(),
        pod: Some("pod-1".into()),
        state: Default::default(),
    }];
    cfg.upstreams.push(second);
    sidecar.apply(cfg).await.unwrap();
    let second = sidecar.listener_addr("test/second").unwrap();
    let before = pods[1].requests();
    for _ in 0..10 {
        assert_eq!(
            send_fresh(addr, request(Method::GET, "/"))
                .await
                .unwrap()
                .status,
            200
        );
        assert_eq!(
            send_fresh(second, request(Method::GET, "/"))
                .await
                .unwrap()
                .status,
            200
        );
    }
    assert_eq!(
        pods[1].requests() - before,
        10,
        "the first upstream no longer uses pod-1"
    );
    within(
        PATIENCE,
        "shutdown",
        sidecar.shutdown(Duration::from_secs(2)),
    )
    .await;
}
