//! The resolv.conf of a named network namespace: `ip netns exec NAME` mounts
//! `/etc/netns/NAME/resolv.conf` over /etc/resolv.conf, so a container attached with
//! `overlayd attach --netns /run/netns/NAME` resolves through overlayd with no setup. overlayd
//! writes it with one `nameserver` per network of the namespace (its gateway, where that
//! network's resolver listens; at most 3, glibc's limit) and removes it with the namespace's
//! last endpoint.
//!
//! No `search` line: a container's names answer bare (`web1`) and as `web1.NETWORK`.
//! `options ndots:0`, as Docker writes: every name is asked as it is first, so `web1` is never
//! first tried as `web1.<a search domain>` (glibc takes one from the host name when there is
//! no search line), which would go to an upstream and wait for it.
//!
//! The first line marks the file as overlayd's, with the state dir of the daemon that wrote
//! it (several daemons may share a machine's /etc, as in the testbed): a file without it, or
//! with another daemon's, is never overwritten or removed. Delete the line to keep the file.

use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Where `ip netns exec` finds a namespace's own /etc files.
pub const NETNS_ETC: &str = "/etc/netns";
/// How our first line starts.
const MARKER: &str = "# Written by overlayd for network namespace ";
/// At most this many nameservers (glibc's MAXNS).
pub const MAX_NAMESERVERS: usize = 3;

/// The name of a namespace `ip netns` manages (`/run/netns/NAME` or `/var/run/netns/NAME`), if
/// `path` is one.
pub fn netns_name(path: &str) -> Option<&str> {
    let name = path.strip_prefix("/run/netns/").or_else(|| path.strip_prefix("/var/run/netns/"))?;
    (!name.is_empty() && name != "." && name != ".." && !name.contains('/')).then_some(name)
}

/// The file for `netns` with these nameservers, as the daemon of `state_dir` writes it.
pub fn render(netns: &str, state_dir: &Path, nameservers: &[Ipv4Addr]) -> String {
    let mut s = format!(
        "{MARKER}{netns} (state dir {}): the resolvers of its overlay networks.\n\
         # overlayd removes it when the namespace's last endpoint is detached; delete these lines to keep the file.\n",
        state_dir.display()
    );
    for ns in nameservers.iter().take(MAX_NAMESERVERS) {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    s.push_str("options ndots:0\n");
    s
}

/// Whether `text` is a file the daemon of `state_dir` wrote.
fn written_by(text: &str, state_dir: &Path) -> bool {
    let first = text.lines().next().unwrap_or_default();
    first.starts_with(MARKER) && first.contains(&format!(" (state dir {}):", state_dir.display()))
}

/// What [`sync`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    Written(PathBuf),
    Removed(PathBuf),
    /// Nothing to do.
    Unchanged,
    /// A file overlayd (this daemon) did not write is there: left alone.
    NotOurs(PathBuf),
}

/// Makes `<root>/NAME/resolv.conf` list `nameservers`, or removes it when there are none (and
/// the directory, if that leaves it empty). `root` is [`NETNS_ETC`] but in tests.
pub fn sync(root: &Path, netns: &str, state_dir: &Path, nameservers: &[Ipv4Addr]) -> std::io::Result<Synced> {
    let dir = root.join(netns);
    let path = dir.join("resolv.conf");
    let existing = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if existing.as_deref().is_some_and(|t| !written_by(t, state_dir)) {
        return Ok(Synced::NotOurs(path));
    }
    if nameservers.is_empty() {
        if existing.is_none() {
            return Ok(Synced::Unchanged);
        }
        std::fs::remove_file(&path)?;
        // Only if empty: the user's other files for the namespace stay.
        let _ = std::fs::remove_dir(&dir);
        return Ok(Synced::Removed(path));
    }
    let text = render(netns, state_dir, nameservers);
    if existing.as_deref() == Some(text.as_str()) {
        return Ok(Synced::Unchanged);
    }
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(".resolv.conf.overlayd");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(Synced::Written(path))
}

/// The namespaces under `root` whose resolv.conf the daemon of `state_dir` wrote.
pub fn written(root: &Path, state_dir: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(root) else { return Vec::new() };
    dir.flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("resolv.conf")).is_ok_and(|t| written_by(&t, state_dir)))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_named_namespaces_have_a_resolv_conf() {
        assert_eq!(netns_name("/run/netns/web1"), Some("web1"));
        assert_eq!(netns_name("/var/run/netns/web1"), Some("web1"));
        for other in ["/proc/42/ns/net", "/run/netns/", "/run/netns/..", "/run/netns/a/b", "web1", ""] {
            assert_eq!(netns_name(other), None, "{other}");
        }
    }

    #[test]
    fn written_rewritten_and_removed_but_never_someone_elses() {
        let root = tempfile::tempdir().unwrap();
        let (me, other) = (Path::new("/var/lib/overlayd"), Path::new("/tmp/another"));
        let gw = |i: u8| Ipv4Addr::new(10, 128 + i, 0, 1);
        let path = root.path().join("web1/resolv.conf");
        assert_eq!(sync(root.path(), "web1", me, &[gw(0)]).unwrap(), Synced::Written(path.clone()));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Written by overlayd for network namespace web1 (state dir /var/lib/overlayd)"));
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines, ["nameserver 10.128.0.1", "options ndots:0"]);
        assert_eq!(sync(root.path(), "web1", me, &[gw(0)]).unwrap(), Synced::Unchanged);
        let four = [gw(0), gw(1), gw(2), gw(3)];
        sync(root.path(), "web1", me, &four).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("nameserver").count(), MAX_NAMESERVERS, "{text}");
        assert_eq!(written(root.path(), me), ["web1"]);
        assert!(written(root.path(), other).is_empty(), "another daemon's files are not ours");
        assert_eq!(sync(root.path(), "web1", other, &[]).unwrap(), Synced::NotOurs(path.clone()));
        assert_eq!(sync(root.path(), "web1", me, &[]).unwrap(), Synced::Removed(path.clone()));
        assert!(!root.path().join("web1").exists(), "its directory went with it");
        assert_eq!(sync(root.path(), "web1", me, &[]).unwrap(), Synced::Unchanged);
        // The user's own file, and the user's other files, stay.
        std::fs::create_dir_all(root.path().join("db")).unwrap();
        std::fs::write(root.path().join("db/resolv.conf"), "nameserver 192.0.2.53\n").unwrap();
        std::fs::write(root.path().join("db/hosts"), "").unwrap();
        let db = root.path().join("db/resolv.conf");
        assert_eq!(sync(root.path(), "db", me, &[gw(0)]).unwrap(), Synced::NotOurs(db.clone()));
        assert_eq!(sync(root.path(), "db", me, &[]).unwrap(), Synced::NotOurs(db.clone()));
        assert_eq!(std::fs::read_to_string(&db).unwrap(), "nameserver 192.0.2.53\n");
        std::fs::remove_file(&db).unwrap();
        sync(root.path(), "db", me, &[gw(0)]).unwrap();
        sync(root.path(), "db", me, &[]).unwrap();
        assert!(root.path().join("db/hosts").exists());
    }
}
