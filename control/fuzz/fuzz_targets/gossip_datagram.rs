//! Any datagrams on the gossip port, as host 1 of a three-host cluster receives them (see
//! `control_fuzz::gossip`): raw bytes against the envelope and the replay guard; payloads
//! sealed as a host of the cluster seals them, against SWIM's decoder (with the endpoint
//! records piggybacked on it) and the anti-entropy messages; anti-entropy records re-signed by
//! their owners, against the endpoint tables; any header under the cluster key; and the
//! timers the node arms. Nothing panics, what the node sends opens and fits a datagram, and no
//! host outside the directory is ever alive or holds endpoints here.
#![no_main]

use control_fuzz::gossip::Harness;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    Harness::new().run(data);
});
