//! The gossip decoders behind the envelope, fed directly: endpoint records (`Record::decode`,
//! then `verify`), anti-entropy messages (`SyncMessage::decode`), and a host's endpoint tables
//! under any sequence of decoded records and anti-entropy completions.
#![no_main]

use control::gossip::record::{Record, RecordError, SIGNATURE_LEN};
use control::gossip::sync::{self, SyncMessage};
use control::gossip::tables::{Applied, EndpointTables, Position};
use control_fuzz::Input;
use control_fuzz::gossip::{MEMBERS, signer};
use libfuzzer_sys::fuzz_target;

fn record(wire: &[u8]) {
    let Ok(r) = Record::decode(wire) else { return };
    assert_eq!(r.wire(), wire, "a record keeps the bytes it travels as");
    assert!(r.version > 0);
    for n in MEMBERS {
        match r.verify(&signer(n).public_key()) {
            Ok(()) => assert_eq!(r.owner, n, "only fixed seeds carry real signatures"),
            Err(e) => assert_eq!(e, RecordError::Forged),
        }
    }
    // Nothing is checked against a key that signed none of these: a small-order key (all
    // zeros, say) verifies crafted signatures, as Ed25519 allows. Hosts' keys come from ring.
    assert!(wire.len() > SIGNATURE_LEN);
    let _ = r.slot();
}

fn sync_message(payload: &[u8]) {
    let Some(m) = SyncMessage::decode(payload) else { return };
    let mut again = Vec::new();
    m.encode(&mut again);
    assert_eq!(SyncMessage::decode(&again).as_ref(), Some(&m), "a sync message round-trips");
    if let SyncMessage::Digest { summaries, .. } = &m {
        for s in summaries {
            let mut one = Vec::new();
            SyncMessage::Digest { buckets: 0, covered: vec![], summaries: vec![*s] }.encode(&mut one);
            let mut none = Vec::new();
            SyncMessage::Digest { buckets: 0, covered: vec![], summaries: vec![] }.encode(&mut none);
            assert_eq!(sync::summary_len(s), one.len() - none.len(), "summary_len is what a summary takes");
        }
    }
    if let SyncMessage::Records { items, .. } = &m {
        for item in items {
            record(&item.0);
        }
    }
}

/// A host's tables under a script: decoded records applied, anti-entropy completions, owners
/// forgotten. A replica never goes back in its epoch, and what it vouches for it knows.
fn tables(input: &mut Input<'_>) {
    let mut t = EndpointTables::new(1);
    while !input.is_empty() {
        let before: Vec<(u64, Position)> = t.positions().collect();
        match input.u8() % 3 {
            0 => {
                let Ok(r) = Record::decode(input.chunk()) else { continue };
                let (owner, epoch, version) = (r.owner, r.epoch, r.version);
                let knew = t.knows(owner, epoch, version);
                let applied = t.apply(r);
                assert_eq!(applied == Applied::Stale, knew, "stale exactly when known");
                assert!(t.knows(owner, epoch, version), "an applied record is known");
            }
            1 => {
                let (owner, epoch, from, upto) = (u64::from(input.u8() % 4), input.u64(), input.u64(), input.u64());
                if t.complete(owner, epoch, from, upto) {
                    let p = t.position(owner).expect("a completed replica");
                    assert!(
                        p.epoch == epoch && p.watermark >= upto,
                        "{p:?} after completing {epoch}: ({from}, {upto}]"
                    );
                }
            }
            _ => {
                t.forget(u64::from(input.u8() % 4));
                continue;
            }
        }
        for (owner, was) in before {
            if let Some(now) = t.position(owner) {
                assert!(now >= was, "owner {owner}'s replica went back: {was:?} to {now:?}");
                for v in [0, now.watermark / 2, now.watermark] {
                    assert!(v == 0 || t.knows(owner, now.epoch, v), "owner {owner} vouched for {v}");
                }
                let (records, watermark) = t.since(owner, now.epoch, 0).expect("its own epoch");
                assert_eq!(watermark, now.watermark);
                assert!(records.windows(2).all(|w| w[0].version <= w[1].version));
            }
        }
        for buckets in [1, 4, 128] {
            assert_eq!(t.bucket_hashes(buckets).len(), usize::from(buckets));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.u8() % 3 {
        0 => record(input.rest()),
        1 => sync_message(input.rest()),
        _ => tables(&mut input),
    }
});
