//! The key files of the state dir and the certificates a host is handed: its identity
//! (`node.key`, `node.crt`, `ca.crt`, as `NodeIdentity::load` reads them), the cluster CA a
//! manager rebuilds from the replicated secrets, the gossip signing key, and the peer
//! certificate the control port reads a node's id and role from. An identity that loads makes
//! the TLS configurations it is loaded for.
#![no_main]

use control::gossip::Signer;
use control::pki::{ClusterCa, NodeIdentity, peer_identity};
use control_fuzz::{Input, split_parts};
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or("")
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let which = input.u8();
    let rest = input.rest();
    match which % 4 {
        0 => {
            let parts = split_parts(rest, 3);
            let Ok(id) = NodeIdentity::from_pem(text(parts[0]), text(parts[1]), text(parts[2])) else { return };
            id.server_config().expect("an identity that loads serves TLS");
            id.client_config().expect("an identity that loads connects with TLS");
            let _ = (id.node_id(), id.role(), id.ca_digest());
        }
        1 => {
            let parts = split_parts(rest, 2);
            let Ok(ca) = ClusterCa::from_pem(text(parts[0]), text(parts[1])) else { return };
            let _ = ca.digest();
            let again = ClusterCa::from_pem(&ca.cert_pem(), &ca.key_pem()).expect("a CA that loads loads again");
            assert_eq!(again.digest(), ca.digest());
        }
        2 => {
            if let Ok(s) = Signer::from_pkcs8(rest) {
                let again = Signer::from_pkcs8(s.pkcs8()).expect("a key that loads loads again");
                assert_eq!(again.public_key(), s.public_key());
            }
        }
        _ => {
            let certs = [CertificateDer::from(rest)];
            let _ = peer_identity(Some(&certs));
        }
    }
});
