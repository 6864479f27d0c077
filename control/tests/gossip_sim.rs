//! The gossip layer at cluster scale: real `GossipNode`s of 200 hosts over the simulated
//! network of `control::gossip::sim`, asserting the convergence bounds the `gossip` benchmark
//! measures at 1,000 and 10,000 hosts — an endpoint change reaches every host within 1 s
//! (p99), a killed host is withdrawn everywhere within 5 s, under 10 KB/s of gossip per host —
//! and that partitions, loss, restarts, forgeries and replays leave every table as its owner
//! has it.
//!
//! Each test prints what it measured (`cargo test --test gossip_sim -- --nocapture`).

use std::time::Duration;

use control::gossip::record::{Change, Record};
use control::gossip::seal::{Header, Kind};
use control::gossip::sim::{SimConfig, Simulation, UDP_IPV4_HEADERS, WatchId, endpoint_key, percentiles};
use control::gossip::sync::{SyncMessage, serde_bytes_vec::Bytes};
use control::gossip::{GossipConfig, GossipCounters, GossipKey, Signer};

const HOSTS: usize = 200;
/// The goals.
const CHANGE_P99: Duration = Duration::from_secs(1);
const DOWN_MAX: Duration = Duration::from_secs(5);
const BYTES_PER_HOST_PER_S: f64 = 10_000.0;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A converged cluster of `hosts`, settled for two seconds.
fn cluster(hosts: usize, loss: f64, seed: u64) -> Simulation {
    let gossip = GossipConfig { cluster_size: hosts as u32, ..GossipConfig::default() };
    let mut sim = Simulation::new(SimConfig { hosts, loss, seed, gossip, ..SimConfig::default() });
    sim.run_for(secs(2.0));
    sim.tables_agree().expect("a warm cluster starts converged");
    sim
}

/// `count` changes `every` apart on distinct hosts (`first` on): puts of a new endpoint and
/// deletes of an existing one, alternately.
fn churn(sim: &mut Simulation, first: usize, count: usize, every: Duration) -> Vec<WatchId> {
    let mut watches = Vec::new();
    for c in 0..count {
        let host = (first + c * 37) % sim.hosts();
        watches.push(if c % 2 == 0 {
            sim.put(host, endpoint_key(host, 10 + c), &format!("new-{c}"))
        } else {
            sim.delete(host, endpoint_key(host, 0))
        });
        sim.run_for(every);
    }
    watches
}

/// Per (change, host) delays, and per change the delay until the last host had it.
fn spread(sim: &Simulation, watches: &[WatchId]) -> (Vec<Option<Duration>>, Vec<Option<Duration>>) {
    let per_host: Vec<Vec<Option<Duration>>> = watches.iter().map(|w| sim.watch_delays(*w)).collect();
    let to_all = per_host.iter().map(|d| d.iter().try_fold(Duration::ZERO, |m, x| x.map(|x| m.max(x)))).collect();
    (per_host.into_iter().flatten().collect(), to_all)
}

fn show(what: &str, delays: &[Option<Duration>]) -> (Duration, Duration, Duration, usize) {
    let p = percentiles(delays.iter().copied());
    println!("{what}: p50 {:?} p99 {:?} max {:?} missing {} of {}", p.0, p.1, p.2, p.3, delays.len());
    p
}

/// Runs in steps of 250 ms until `done` holds or `limit` passed; returns how long it took.
fn until(sim: &mut Simulation, limit: Duration, mut done: impl FnMut(&Simulation) -> bool) -> Option<Duration> {
    let t0 = sim.now();
    while sim.now() < t0 + limit {
        sim.run_for(secs(0.25));
        if done(sim) {
            return Some(sim.now() - t0);
        }
    }
    None
}

/// Bytes per host per second sent over the next `d` (UDP payloads, and with IP+UDP headers).
fn bandwidth(sim: &mut Simulation, d: Duration, during: impl FnOnce(&mut Simulation)) -> (f64, f64) {
    let (b0, n0) = sim.sent_total();
    let end = sim.now() + d;
    during(sim);
    sim.run_until(end);
    let (b1, n1) = sim.sent_total();
    let per = |bytes: u64| bytes as f64 / sim.hosts() as f64 / d.as_secs_f64();
    (per(b1 - b0), per(b1 - b0 + (n1 - n0) * UDP_IPV4_HEADERS))
}

#[test]
fn endpoint_puts_and_deletes_reach_every_host_within_a_second() {
    let mut sim = cluster(HOSTS, 0.0, 1);
    let watches = churn(&mut sim, 0, 40, secs(0.1));
    sim.run_for(secs(3.0));
    let (per_host, to_all) = spread(&sim, &watches);
    let (_, p99, _, missing) = show("change to a host", &per_host);
    let (_, p99_all, _, _) = show("change to every host", &to_all);
    assert_eq!(missing, 0, "every change reaches every host");
    assert!(p99 < CHANGE_P99 && p99_all < CHANGE_P99, "p99 {p99:?}, to every host {p99_all:?}");
    sim.tables_agree().unwrap();
    let c = sim.counters();
    assert_eq!(
        (c.rx_bad_auth, c.rx_not_gossip, c.rx_malformed, c.records_forged, c.records_malformed),
        (0, 0, 0, 0, 0),
        "{c:?}"
    );
    let swim_refused = (
        c.probe_cycles_incomplete,
        c.probe_timers_disconnected,
        c.swim_unencodable,
        c.records_not_piggybacked,
        c.cluster_size_refused,
        c.swim_unexpected,
    );
    assert_eq!(swim_refused, (0, 0, 0, 0, 0, 0), "SWIM refused nothing in a healthy cluster: {c:?}");
    assert!(sim.log.is_empty(), "no host went down or came up: {:?}", sim.log);
}

#[test]
fn a_killed_host_is_withdrawn_everywhere_and_comes_back_as_a_new_incarnation() {
    let mut sim = cluster(HOSTS, 0.0, 2);
    let k = 17;
    let old_key = endpoint_key(k, 5);
    let w = sim.put(k, old_key, "before-the-kill");
    sim.run_for(secs(2.0));
    assert!(sim.watch_delays(w).iter().all(Option::is_some));
    let old_epoch = sim.node(0).unwrap().position(sim.id(k)).unwrap().epoch;

    let t0 = sim.now();
    sim.kill(k);
    sim.run_for(DOWN_MAX + secs(1.0));
    let down = sim.event_delays(k, t0, false);
    let (_, _, max, missing) = show("killed host seen down", &down);
    assert_eq!(missing, 0, "every live host saw it down");
    assert!(max < DOWN_MAX, "{max:?}");
    for i in (0..sim.hosts()).filter(|i| *i != k) {
        assert!(!sim.node(i).unwrap().is_alive(sim.id(k)), "host {i} still has {k} alive");
    }
    let others_down =
        sim.log.iter().filter(|(t, _, ev)| *t >= t0 && *ev != control::gossip::Event::PeerDown(sim.id(k)));
    assert_eq!(others_down.count(), 0, "nobody else went down or came up");

    // While it is down one container goes and another comes: the restart publishes its
    // endpoints as they are now, in a new epoch that voids the old table everywhere.
    let gone = sim.delete(k, old_key);
    let came = sim.put(k, endpoint_key(k, 6), "after-the-restart");
    let t1 = sim.now();
    sim.restart(k);
    sim.run_for(secs(10.0));
    let up = sim.event_delays(k, t1, true);
    let (_, _, up_max, missing) = show("restarted host seen up", &up);
    assert_eq!(missing, 0, "every host saw it up");
    assert!(up_max < DOWN_MAX, "{up_max:?}");
    let (_, _, _, missing) = show("restarted host's table", &[sim.watch_delays(gone), sim.watch_delays(came)].concat());
    assert_eq!(missing, 0);
    let epoch = sim.node(k).unwrap().position(sim.id(k)).unwrap().epoch;
    assert!(epoch > old_epoch);
    for i in 0..sim.hosts() {
        assert_eq!(sim.node(i).unwrap().position(sim.id(k)).map(|p| p.epoch), Some(epoch), "host {i}");
    }
    sim.tables_agree().unwrap();
}

#[test]
fn a_restarted_host_sees_every_member_alive_within_5s() {
    let mut sim = cluster(HOSTS, 0.0, 9);
    let k = 31;
    sim.kill(k);
    sim.run_for(secs(20.0));
    sim.restart(k);
    let all = until(&mut sim, secs(60.0), |sim| sim.node(k).unwrap().alive().count() == sim.hosts() - 1);
    println!("restarted host saw every member alive after {all:?}");
    assert!(all.is_some_and(|d| d < DOWN_MAX), "took {all:?} (None: more than 60 s)");
}

#[test]
fn a_graceful_leave_is_seen_everywhere_at_once() {
    let mut sim = cluster(HOSTS, 0.0, 3);
    let k = 23;
    let t0 = sim.now();
    sim.leave(k);
    sim.run_for(DOWN_MAX);
    let (_, _, max, missing) = show("left host seen down", &sim.event_delays(k, t0, false));
    assert_eq!(missing, 0, "every host saw it leave");
    // Leaving is news gossiped at once, not a probe timing out: well under the kill bound.
    assert!(max < secs(1.0), "{max:?}");
}

#[test]
fn on_a_lossy_network_every_change_arrives_and_anti_entropy_repairs() {
    let loss = 0.1;
    let mut sim = cluster(HOSTS, loss, 4);
    let watches = churn(&mut sim, 5, 40, secs(0.1));
    sim.run_for(secs(10.0));
    let (per_host, to_all) = spread(&sim, &watches);
    let (_, p99, _, missing) = show(&format!("change to a host at {loss} loss"), &per_host);
    show("change to every host", &to_all);
    assert_eq!(missing, 0, "every change reaches every host");
    assert!(p99 < CHANGE_P99, "{p99:?}");
    sim.tables_agree().unwrap();
    let c = sim.counters();
    println!("sync rounds {}, repaired {}, records sent {}", c.sync_rounds, c.sync_repaired, c.sync_records_sent);
    assert!(c.sync_repaired > 0, "anti-entropy repaired what the loss dropped");
    let downs = sim.log.iter().filter(|(_, _, ev)| matches!(ev, control::gossip::Event::PeerDown(_))).count();
    println!("false PeerDowns: {downs}");
}

/// Host 42 cut off for 30 s while containers come and go on both sides; then healed.
/// Returns when the cut ended.
fn partition(sim: &mut Simulation, p: usize) -> Duration {
    let t0 = sim.now();
    sim.cut(p, true);
    for s in 0..30 {
        let other = (p + 1 + s * 13) % sim.hosts();
        let other = if other == p { other + 1 } else { other };
        match s % 3 {
            0 => sim.put(p, endpoint_key(p, 10 + s), "cut-side"),
            1 => sim.delete(p, endpoint_key(p, 10 + s - 1)),
            _ => sim.put(other, endpoint_key(other, 10 + s), "main-side"),
        };
        if s == 10 {
            sim.delete(p, endpoint_key(p, 0));
            sim.delete(other, endpoint_key(other, 1));
        }
        sim.run_for(secs(1.0));
    }
    let (_, _, _, missing) = show("cut-off host seen down", &sim.event_delays(p, t0, false));
    assert_eq!(missing, 0, "it was declared down while cut off");
    assert!(sim.tables_agree().is_err(), "the cut side's changes could not arrive");
    sim.cut(p, false);
    sim.now()
}

#[test]
fn a_host_cut_off_for_30s_converges_within_30s_of_healing() {
    let mut sim = cluster(HOSTS, 0.0, 5);
    let p = 42;
    let healed = partition(&mut sim, p);
    let agreed = until(&mut sim, secs(30.0), |sim| sim.tables_agree().is_ok());
    println!("tables identical everywhere {agreed:?} after healing");
    assert!(agreed.is_some(), "not converged 30 s after healing: {:?}", sim.tables_agree());
    let back = |sim: &Simulation| sim.event_delays(p, healed, true).iter().all(Option::is_some);
    let left = healed + secs(30.0) - sim.now();
    until(&mut sim, left, back);
    let (_, _, _, missing) = show("healed host seen up", &sim.event_delays(p, healed, true));
    assert_eq!(missing, 0, "every host saw it come back within 30 s");
    sim.tables_agree().unwrap();
}

#[test]
fn healing_a_partition_takes_no_healthy_host_down_and_restores_every_view() {
    let mut sim = cluster(HOSTS, 0.0, 5);
    let p = 42;
    let healed = partition(&mut sim, p);
    let everyone = until(&mut sim, secs(30.0), |sim| {
        (0..sim.hosts()).all(|i| sim.node(i).unwrap().alive().count() == sim.hosts() - 1)
    });
    println!("every host saw every other alive {everyone:?} after healing");
    let innocent: Vec<_> = sim
        .log
        .iter()
        .filter(|(t, _, ev)| *t >= healed && matches!(ev, control::gossip::Event::PeerDown(n) if *n != sim.id(p)))
        .collect();
    println!("PeerDown of healthy hosts after healing: {}", innocent.len());
    assert!(innocent.is_empty(), "healthy hosts declared down: {:?}", &innocent[..innocent.len().min(5)]);
    assert!(
        everyone.is_some(),
        "30 s after healing host {p} sees {} of {}",
        sim.node(p).unwrap().alive().count(),
        sim.hosts() - 1
    );
}

#[test]
fn a_false_suspicion_is_refuted_and_nothing_changes() {
    let mut sim = cluster(HOSTS, 0.0, 6);
    let p = 77;
    let t0 = sim.now();
    // Long enough to be suspected, shorter than it takes to be declared down.
    sim.cut(p, true);
    sim.run_for(secs(1.0));
    sim.cut(p, false);
    let suspecting = (0..sim.hosts())
        .filter_map(|i| sim.node(i).unwrap().peers().into_iter().find(|s| s.node == sim.id(p)))
        .filter(|s| s.state == "suspect")
        .count();
    println!("hosts suspecting it when the cut ended: {suspecting}");
    assert!(suspecting > 0, "the cut raised a suspicion");
    sim.run_for(secs(5.0));
    let changes: Vec<_> = sim.log.iter().filter(|(t, _, _)| *t >= t0).collect();
    println!("PeerDown/PeerUp events after the cut: {}", changes.len());
    assert!(changes.is_empty(), "no host went down: {:?}", &changes[..changes.len().min(5)]);
    for i in 0..sim.hosts() {
        assert_eq!(sim.node(i).unwrap().alive().count(), sim.hosts() - 1, "host {i}");
    }
    sim.tables_agree().unwrap();
}

#[test]
fn gossip_costs_under_10_kb_per_host_per_second() {
    let mut sim = cluster(HOSTS, 0.0, 7);
    let steady = bandwidth(&mut sim, secs(10.0), |_| {});
    println!("steady: {:.0} B/s per host, {:.0} B/s with IP+UDP headers", steady.0, steady.1);
    // Five changes a second somewhere in the cluster (18,000 container starts and stops an
    // hour), measured over the 10 s they span.
    let busy = bandwidth(&mut sim, secs(10.0), |sim| {
        churn(sim, 0, 50, secs(0.2));
    });
    println!("churn (5 changes/s): {:.0} B/s per host, {:.0} B/s with headers", busy.0, busy.1);
    assert!(steady.1 < BYTES_PER_HOST_PER_S && busy.1 < BYTES_PER_HOST_PER_S, "{steady:?} {busy:?}");
    sim.run_for(secs(2.0));
    sim.tables_agree().unwrap();
}

#[test]
fn forged_records_and_foreign_datagrams_change_nothing_and_are_counted() {
    let mut sim = cluster(HOSTS, 0.0, 8);
    let (a, b, v) = (3, 4, 10);
    let owner = sim.id(a);
    let node = sim.node(v).unwrap();
    let before = node.position(owner).unwrap();
    let counters = node.counters();
    let victim = sim.endpoints(a)[0].0;

    // Host B, a member holding the cluster key, deletes one of A's endpoints with its own
    // signing key; and a newer epoch of A's table signed with a stranger's key, which would
    // wipe it.
    let tombstone = Record::sign(&sim.signer(b), owner, before.epoch, before.watermark + 1, Change::Delete(victim));
    let wipe = Record::sign(&Signer::generate(), owner, before.epoch + 1, 1, Change::Epoch);
    for (r, from) in [(&tombstone, before.watermark), (&wipe, 0)] {
        let m = SyncMessage::Records {
            owner,
            epoch: r.epoch,
            from,
            upto: r.version,
            items: vec![Bytes(r.wire().to_vec())],
        };
        let mut payload = Vec::new();
        m.encode(&mut payload);
        sim.inject(b, v, Kind::Sync, &payload);
    }
    // A datagram sealed under another cluster's key, and line noise.
    let mut foreign = Vec::new();
    let header = Header { sender: sim.id(b), generation: 1, counter: 0, receiver: sim.id(v) };
    GossipKey::new(&GossipKey::generate()).seal(&header, Kind::Sync, b"anything", &mut foreign);
    sim.inject_raw(sim.addr(b), v, foreign);
    sim.inject_raw(sim.addr(b), v, vec![0x5a; 120]);

    let node = sim.node(v).unwrap();
    let after = node.counters();
    assert_eq!(after.records_forged - counters.records_forged, 2, "{after:?}");
    assert_eq!(after.rx_bad_auth - counters.rx_bad_auth, 1);
    assert_eq!(after.rx_not_gossip - counters.rx_not_gossip, 1);
    assert_eq!(node.position(owner), Some(before), "the replica did not move");
    let mut held = Vec::new();
    node.for_each_endpoint(owner, |k, _| held.push(*k));
    assert!(held.contains(&victim));

    // Nothing spread, and A's real next version (the one the forgery claimed) still goes through.
    let w = sim.put(a, endpoint_key(a, 9), "real");
    sim.run_for(secs(3.0));
    let (_, _, _, missing) = percentiles(sim.watch_delays(w));
    assert_eq!(missing, 0);
    sim.tables_agree().unwrap();
    assert_eq!(sim.counters().records_forged, 2, "only the host it was sent to saw the forgery");
}

/// Issue 12, item 7: everything one host sent for five seconds, captured on the wire and
/// replayed twenty times over, to each datagram's own receiver and to another host: nothing
/// is answered, nothing changes, and every replay is counted.
#[test]
fn captured_gossip_replayed_is_refused_counted_and_never_answered() {
    let mut sim = cluster(HOSTS, 0.0, 10);
    let s = 11;
    sim.capture(s);
    churn(&mut sim, s, 20, secs(0.1));
    sim.run_for(secs(3.0));
    let captured = sim.captured();
    println!("captured {} datagrams host {s} sent", captured.len());
    assert!(captured.len() > 50, "{}", captured.len());
    sim.tables_agree().unwrap();
    let t0 = sim.now();
    let before = sim.counters();
    let sent = sim.sent_total();
    let from = sim.addr(s);
    let elsewhere = |to: usize| (1..HOSTS).map(|k| (to + k) % HOSTS).find(|j| *j != s).expect("another host");
    for _ in 0..20 {
        for (to, d) in &captured {
            sim.inject_raw(from, *to, d.clone());
            sim.inject_raw(from, elsewhere(*to), d.clone());
        }
    }
    let replays = 40 * captured.len() as u64;
    let (b0, n0) = sent;
    let (b1, n1) = sim.sent_total();
    println!("{replays} replays answered with {} datagrams ({} bytes)", n1 - n0, b1 - b0);
    assert_eq!((n1 - n0, b1 - b0), (0, 0), "replays were answered");
    let after = sim.counters();
    assert_eq!(after.rx_datagrams - before.rx_datagrams, replays);
    let refused = |c: &GossipCounters| (c.rx_replayed, c.rx_misdirected, c.rx_stale_generation, c.rx_bad_auth);
    let (r0, r1) = (refused(&before), refused(&after));
    assert_eq!((r1.0 - r0.0, r1.1 - r0.1, r1.2 - r0.2, r1.3 - r0.3), (replays / 2, replays / 2, 0, 0), "{after:?}");
    let applied = |c: &GossipCounters| (c.records_applied, c.records_stale, c.sync_repaired, c.rx_malformed);
    assert_eq!(applied(&after), applied(&before), "{after:?}");
    sim.run_for(secs(3.0));
    sim.tables_agree().unwrap();
    assert!(sim.log.iter().all(|(t, _, _)| *t < t0), "no host went down or came up: {:?}", sim.log);

    // The sender restarts: what it sent in its previous life stays refused, as of an older
    // generation wherever its new life has been heard.
    sim.kill(s);
    sim.restart(s);
    sim.run_for(secs(5.0));
    let before = sim.counters();
    let (_, n0) = sim.sent_total();
    for (to, d) in &captured {
        sim.inject_raw(from, *to, d.clone());
    }
    let after = sim.counters();
    let (_, n1) = sim.sent_total();
    let (replayed, stale) =
        (after.rx_replayed - before.rx_replayed, after.rx_stale_generation - before.rx_stale_generation);
    println!("after the restart: {replayed} refused as replays, {stale} as of the previous life");
    assert_eq!(n1 - n0, 0, "replays were answered");
    assert_eq!(replayed + stale, captured.len() as u64);
    assert!(stale > 0, "{after:?}");
    sim.run_for(secs(3.0));
    sim.tables_agree().unwrap();
}

/// A bucket of owners whose summaries do not fit one datagram (as some do near 10,000 hosts
/// with real, 5-byte epochs) is still repaired: here datagrams are made so small that no bucket
/// of 100 hosts fits one, records do not ride on SWIM's messages, and only anti-entropy's
/// stretches of those buckets bring the changes everywhere.
#[test]
fn buckets_larger_than_a_datagram_are_still_repaired() {
    let hosts = 100;
    let gossip = GossipConfig { cluster_size: hosts as u32, max_datagram: 200, ..GossipConfig::default() };
    let mut sim = Simulation::new(SimConfig { hosts, loss: 0.2, seed: 12, gossip, ..SimConfig::default() });
    sim.run_for(secs(2.0));
    let watches = churn(&mut sim, 5, 10, secs(0.2));
    sim.run_for(secs(60.0));
    let (per_host, _) = spread(&sim, &watches);
    let (_, _, _, missing) = show("change to a host, buckets larger than a datagram", &per_host);
    let c = sim.counters();
    println!("sync rounds {}, repaired {}, records sent {}", c.sync_rounds, c.sync_repaired, c.sync_records_sent);
    assert_eq!(missing, 0, "every change reaches every host");
    assert!(c.sync_repaired > 0, "by anti-entropy: {c:?}");
    sim.tables_agree().unwrap();
}
