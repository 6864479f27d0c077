//! What the gossip secrets' files in the state dir hold, read: the cluster key (`gossip.key`,
//! hex), which rotation of it that is (`gossip.key-generation`) and the epoch of the last start
//! (`gossip-epoch`). Apart from the rest of `gossip` (which runs the socket) so that the agent's
//! fuzz targets compile the very readers the daemon runs.

/// The cluster key's file.
pub const CLUSTER_KEY_FILE: &str = "gossip.key";
/// The cluster key's rotation's file (absent in a state dir from before key rotations).
pub const KEY_GENERATION_FILE: &str = "gossip.key-generation";
/// The last start's epoch's file.
pub const EPOCH_FILE: &str = "gossip-epoch";
/// How far above the last epoch the next one starts at least: room for the rejoins of a life
/// of the agent (each one is a generation).
pub const EPOCH_ROOM: u64 = 1_000_000;

/// The cluster key `gossip.key` holds (32 bytes in hex; `None`: it holds none).
pub fn cluster_key(text: &str) -> Option<[u8; 32]> {
    hex::decode(text.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok())
}

/// The rotation `gossip.key-generation` names.
pub fn key_generation(text: &str) -> Result<u64, std::num::ParseIntError> {
    text.trim().parse()
}

/// The epoch of a start at `now` (µs since 1970) after one whose epoch `gossip-epoch` holds
/// (`None`: no file, or one that holds no number): above it even if the clock went back.
/// `None` when no epoch above both leaves room for this life's rejoins: the file is damaged
/// (or the clock is half a million years on).
pub fn next_epoch(last: Option<&str>, now: u64) -> Option<u64> {
    let last = last.and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    let epoch = now.max(last.checked_add(EPOCH_ROOM)?);
    epoch.checked_add(EPOCH_ROOM).map(|_| epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_epoch_is_above_the_last_and_the_clock() {
        assert_eq!(next_epoch(None, 5_000_000), Some(5_000_000));
        assert_eq!(next_epoch(Some("7000000\n"), 5_000_000), Some(8_000_000), "the clock went back");
        assert_eq!(next_epoch(Some("garbage"), 5_000_000), Some(5_000_000), "unreadable counts as none");
    }

    /// A damaged `gossip-epoch` holding a number near `u64::MAX` overflowed `last + 1_000_000`:
    /// a panic in a debug build, and in a release build an epoch that wrapped below the last.
    #[test]
    fn an_epoch_file_with_no_room_above_is_refused_not_overflowed() {
        assert_eq!(next_epoch(Some(&u64::MAX.to_string()), 5), None);
        assert_eq!(next_epoch(Some(&(u64::MAX - EPOCH_ROOM).to_string()), 5), None, "no room for rejoins");
        let highest = u64::MAX - 2 * EPOCH_ROOM;
        assert_eq!(next_epoch(Some(&highest.to_string()), 5), Some(u64::MAX - EPOCH_ROOM));
    }

    #[test]
    fn a_cluster_key_is_32_bytes_of_hex() {
        let key = [0xab; 32];
        assert_eq!(cluster_key(&format!("{}\n", hex::encode(key))), Some(key));
        assert_eq!(cluster_key(&hex::encode([1; 31])), None);
        assert_eq!(cluster_key("zz"), None);
        assert_eq!(key_generation(" 3\n"), Ok(3));
        assert!(key_generation("-1").is_err());
    }
}
