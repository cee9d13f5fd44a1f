//! The production threading model: traffic served by worker threads (own runtime, own accept
//! socket via SO_REUSEPORT, own connection pools), as `detour sidecar` runs it.

mod support;

use std::time::Duration;

use http::Method;
use support::{sidecar::*, *};

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
    let retries = Metrics::parse(&sidecar.metrics_text())
        .unwrap()
        .sum("detour_retries_total", &[]);
    // On a loaded machine a slow answer can time out and be retried: each retry is one more.
    assert_eq!(served, 320 + retries as u64, "one pod request per try");
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
    let retries = |s: &SidecarHandle| {
        Metrics::parse(&s.metrics_text())
            .unwrap()
            .sum("detour_retries_total", &[])
    };
    let (p0, p1, r0) = (pods[0].requests(), pods[1].requests(), retries(&sidecar));
    for _ in 0..10 {
        let r = send_fresh(addr, request(Method::GET, "/first"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let r = send_fresh(second, request(Method::GET, "/second"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    // Each upstream now has one pod: pod-0 serves the first, pod-1 the second (plus a retry on
    // the same pod if a loaded machine made an answer time out).
    let extra = (retries(&sidecar) - r0) as u64;
    assert_eq!(
        pods[0].requests() - p0 + pods[1].requests() - p1,
        20 + extra
    );
    assert_eq!(pods[1].last_request().unwrap().uri.path(), "/second");
    assert_eq!(pods[0].last_request().unwrap().uri.path(), "/first");
    within(
        PATIENCE,
        "shutdown",
        sidecar.shutdown(Duration::from_secs(2)),
    )
    .await;
}
