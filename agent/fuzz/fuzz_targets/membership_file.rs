//! `cluster.json` in the state dir, read by `Membership::load` as the daemon reads it when it
//! resumes its cluster membership: any bytes load, or are refused naming the file; what loads
//! is saved as `init` and `join` save it (`statefile::write_atomic`) and loads back the same.
#![no_main]

use agent_fuzz::membership::{MEMBERSHIP_FILE, Membership};
use agent_fuzz::scratch_dir;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir();
    std::fs::write(dir.join(MEMBERSHIP_FILE), data).expect("the file is written");
    match Membership::load(dir) {
        Ok(Some(m)) => {
            m.save(dir).expect("a membership that loads saves");
            let again = Membership::load(dir).expect("what was saved loads").expect("it is there");
            let json = |m: &Membership| serde_json::to_string(m).expect("encodes");
            assert_eq!(json(&again), json(&m), "a membership saved loads back the same");
        }
        Ok(None) => panic!("the file is there"),
        Err(e) => assert!(format!("{e:#}").contains(MEMBERSHIP_FILE), "a damaged file is named: {e:#}"),
    }
});
