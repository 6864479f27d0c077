//! Network namespaces: create, delete, run commands inside (`ip netns exec`), and run Rust code
//! inside (a thread that `setns`es), for sockets the test itself drives.

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Runs a command and fails, with its stderr, unless it succeeds.
pub fn run<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = || format!("{program} {}", args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    let out = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}` (is it installed?)", shown()))?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", shown(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// `ip <args>`.
pub fn ip<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run("ip", args)
}

/// `ip -n <ns> -batch -` with `commands` (one `ip` command per line, without the `ip`) on
/// standard input: many changes for the price of one process.
pub fn ip_batch(ns: &str, commands: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `ip` (is iproute2 installed?)")?;
    child
        .stdin
        .take()
        .context("ip's standard input")?
        .write_all(commands.as_bytes())
        .context("writing to `ip -batch`")?;
    let out = child.wait_with_output().context("waiting for `ip -batch`")?;
    if !out.status.success() {
        bail!("`ip -n {ns} -batch -` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Creates a namespace with its loopback up.
pub fn add(name: &str) -> Result<()> {
    ip(["netns", "add", name])?;
    ip(["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a namespace (its interfaces go with it); already gone is fine.
pub fn delete(name: &str) {
    let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
}

/// Every namespace on the machine.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

/// PIDs of the processes inside a namespace.
pub fn pids(name: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Runs `program args` inside namespace `ns` and fails unless it succeeds.
pub fn exec<I, S>(ns: &str, program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut all: Vec<std::ffi::OsString> = vec!["netns".into(), "exec".into(), ns.into(), program.into()];
    all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
    run("ip", all)
}

/// A `Command` that runs `program` inside `ns` (for processes the caller manages).
pub fn command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// Runs `f` on a thread that has entered namespace `ns`; sockets it creates belong to `ns`.
pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("no namespace {ns}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns with a valid namespace fd affects only the calling thread, which is
        // this short-lived one.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread inside namespace {ns} panicked"))?
}
