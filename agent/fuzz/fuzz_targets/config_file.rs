//! The daemon's config file under any command line: the file's bytes, then (after a zero byte)
//! the daemon's arguments (zero-separated), read by `config::load` as `overlayd daemon` reads
//! them: flags over the file over the defaults, then validated. A configuration that loads is
//! one the daemon can start with: static mode exactly when it has an underlay address, each
//! network's VNI, name and interfaces its own; and its settings survive the JSON round trip
//! the layering makes of them.
#![no_main]

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;

use agent_fuzz::config::{self, DaemonSettings, FlagNetwork, MAX_NAME_LEN};
use agent_fuzz::{daemon_command, scratch_dir};
use clap::FromArgMatches as _;
use libfuzzer_sys::fuzz_target;

/// Most arguments one input gives.
const MAX_ARGS: usize = 24;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |b| *b == 0);
    let file = parts.next().unwrap_or_default();
    let args: Vec<OsString> = parts
        .next()
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .take(MAX_ARGS)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    let Ok(given) = daemon_command().try_get_matches_from(args) else { return };
    let (Ok(cli), Ok(flags)) = (DaemonSettings::from_arg_matches(&given), FlagNetwork::from_arg_matches(&given)) else {
        return;
    };
    let path = scratch_dir().join("overlayd.toml");
    std::fs::write(&path, file).expect("the config file is written");
    let Ok(cfg) = config::load(Some(&path), cli, &given, flags) else { return };

    assert_eq!(cfg.is_static(), cfg.settings.underlay_addr.is_some(), "static mode is networks and an underlay");
    let (mut vnis, mut names, mut ifnames) = (HashSet::new(), HashSet::new(), HashSet::new());
    for n in &cfg.networks {
        assert!(u32::from(n.vni) != 0, "{n:?}");
        assert!(vnis.insert(n.vni) && names.insert(&n.name), "{n:?} is not the only one");
        assert!(!n.name.is_empty() && n.name.len() <= MAX_NAME_LEN, "{n:?}");
        for dev in [&n.bridge, &n.tap] {
            assert!(!dev.is_empty() && dev.len() <= 15 && ifnames.insert(dev), "{dev:?} of {n:?}");
        }
    }
    let json = serde_json::to_value(&cfg.settings).expect("settings encode");
    let back: DaemonSettings = serde_json::from_value(json).expect("settings decode as they encoded");
    assert_eq!(back, cfg.settings, "the settings survive the layering's round trip");
});
